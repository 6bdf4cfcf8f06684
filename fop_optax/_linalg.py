"""Symmetric eigensolvers, Cholesky and QR that never run as batched LAPACK calls on XLA:CPU.

Under ``jax.vmap`` (one optimiser state per seed or ensemble member) JAX turns
``jnp.linalg.eigh`` (likewise ``cholesky`` and ``qr``) into one batched LAPACK
call, which on XLA:CPU splits its batch over the intra-op thread pool
(``ParallelBatchMap``) and blocks until the pieces are done. When every worker
of that pool is itself running such a call, nobody is left to run the pieces
and the program deadlocks (``--xla_cpu_multi_thread_eigen=false`` does not
avoid it; the troubleshooting page of the docs has the symptoms and a
reproducer).

The functions here batch by a loop instead (``jax.lax.map``: one unbatched
LAPACK call per member, which runs inline) on CPU, and as usual on other
platforms, whose batched solvers are fast and safe. FOP's matrices are small
(at most ``max_full_dim``² or (2r)²), so the loop costs little. Derivatives are
JAX's own (``custom_jvp`` with the unwrapped function's JVP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ['eigh', 'eigvalsh', 'cholesky', 'qr', 'orthonormal_basis']


def _looped_under_vmap(fn: Callable) -> Callable:
  """``fn`` (array arguments) whose ``vmap`` is a ``lax.map`` loop on CPU."""

  @jax.custom_batching.custom_vmap
  def looped(*args):
    return fn(*args)

  @looped.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = tuple(a if batched else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
                 for a, batched in zip(args, in_batched))
    out = jax.lax.platform_dependent(
        *args,
        cpu=lambda *xs: jax.lax.map(lambda x: looped(*x), xs),   # nested vmaps loop too
        default=jax.vmap(fn))
    return out, jax.tree.map(lambda _: True, out)

  @jax.custom_jvp
  @functools.wraps(fn)
  def wrapped(*args):
    return looped(*args)

  @wrapped.defjvp
  def _jvp(primals, tangents):
    return jax.jvp(fn, primals, tangents)

  return wrapped


eigh = _looped_under_vmap(lambda p: tuple(jnp.linalg.eigh(p)))
eigh.__doc__ = '``(λ, Q)`` of a symmetric matrix (``jnp.linalg.eigh``), looped under ``vmap`` on CPU.'
eigvalsh = _looped_under_vmap(lambda p: jnp.linalg.eigvalsh(p))
eigvalsh.__doc__ = 'Eigenvalues of a symmetric matrix, ascending, looped under ``vmap`` on CPU.'
cholesky = _looped_under_vmap(lambda p: jnp.linalg.cholesky(p))
cholesky.__doc__ = ('Lower Cholesky factor (NaNs where ``p`` is not positive definite), '
                    'looped under ``vmap`` on CPU.')
qr = _looped_under_vmap(lambda b: tuple(jnp.linalg.qr(b)))
qr.__doc__ = ('``(Q, R)``: reduced Householder QR of a tall matrix (LAPACK ``geqrf``), looped '
              'under ``vmap`` on CPU.')


# The first pass of orthonormal_basis scales directions whose squared singular value is below
# this many ε·k (relative to the largest) down instead of up; the second pass drops those
# that stay below _KEEP.
_SHIFT = 1e-2
_KEEP = 0.25


@jax.custom_jvp
def orthonormal_basis(b: jax.Array) -> jax.Array:
  """``Q`` (a×k): orthonormal columns spanning ``b``'s columns (a×k, unit or zero norm), or zeros.

  Two passes of an eigendecomposition of the small Gram matrix ("CholeskyQR2"
  with ``eigh`` in place of Cholesky, so that rank-deficient ``b`` are served):
  ``BᵀB = SΛSᵀ`` gives ``Y = B S Λ^{-1/2}`` (``Λ`` floored at ``1e-2·k·ε·λ_max``,
  which scales directions below it down instead of amplifying their
  rounding), and the eigendecomposition of ``YᵀY`` orthonormalises ``Y`` again
  to rounding, dropping the directions that stayed small (columns of zeros).
  ``Q`` is orthonormal to rounding (about ``10ε``); a column's component outside
  ``span(Q)`` is below about ``√(1e-2·k·ε)`` (3e-5 in float32 for ``k = 16``),
  and at rounding level unless ``b`` is that close to rank-deficient.

  Every LAPACK call is a (k×k) ``eigh``; a Householder QR of the tall ``b``
  (LAPACK ``geqrf``/``orgqr``) runs multi-threaded in OpenBLAS, which stalls
  for milliseconds per call when XLA:CPU's own threads are busy (``OPENBLAS_NUM_THREADS=1``
  avoided it); the products here are XLA's own.

  Derivatives follow the span, not the basis (an eigenbasis of a Gram matrix
  with repeated eigenvalues has none): ``dQ = (I − QQᵀ) dB R⁺`` with
  ``R = QᵀB`` (``B = QR``), the motion of ``span(B)`` carried by ``Q``, so that
  whatever depends only on the span and on ``Q``'s products with it is
  differentiated exactly.
  """
  k = b.shape[1]
  eps = jnp.finfo(b.dtype).eps
  lam, s = eigh(b.T @ b)
  floor = _SHIFT * k * eps * jnp.maximum(lam[-1], jnp.finfo(b.dtype).tiny)
  y = b @ (s / jnp.sqrt(jnp.maximum(lam, floor)))
  lam2, s2 = eigh(y.T @ y)
  keep = lam2 > _KEEP
  return y @ (s2 * jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, lam2, 1.0)), 0.0))


@orthonormal_basis.defjvp
def _orthonormal_basis_jvp(primals, tangents):
  (b,), (db,) = primals, tangents
  q = orthonormal_basis(b)
  r_pinv = jnp.linalg.pinv(q.T @ b)
  return q, (db - q @ (q.T @ db)) @ r_pinv
