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

__all__ = ['eigh', 'eigvalsh', 'cholesky', 'qr']


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
