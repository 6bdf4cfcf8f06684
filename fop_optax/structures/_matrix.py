"""Linear algebra shared by the matrix structures (``full``, ``spatial``, ``low_rank``).

FOP's products are einsums over the leaf's own axes (rows first, then columns),
never over a reshaped ``(a, b)`` view: reshaping a sharded leaf would need a
resharding, and XLA:CPU materialises the transpose in ``x @ y.T`` of a large
view, which makes FOP's skinny products several times slower. The small matrices (a×a, a×r)
are replicated under a mesh with explicit axes (``fop_optax._sharding``).

The guard's maths (see the package docstring) lives here too: the spectral clip
``Q min(Λ, B) Qᵀ``, its Daleckii–Krein derivative through the divided
differences of ``min(·, B)``, and the Cholesky certificate that skips the
eigensolver when ``λ_max ≤ B``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fop_optax import _grouping
from fop_optax import _linalg
from fop_optax._sharding import replicated, spec_like

Shape = tuple[int, ...]

# Rows of the matrices the paper's hyper learning rate was tuned on (3×3 spatial).
REFERENCE_ROWS = 9
# Eigenvalues within this relative distance of the bound count as at the bound (rounding).
_KINK_RTOL = 1e-5


def _rows(shape: Shape, row_axes: int) -> int:
  return math.prod(shape[:row_axes])


def _labels(ndim: int, row_axes: int) -> tuple[str, str, str]:
  """Einsum labels: the leaf's rows, a second copy of the rows, its columns."""
  assert ndim <= 12
  return 'abcdefghijkl'[:row_axes], 'ABCDEFGHIJKL'[:row_axes], 'mnopqrstuvwx'[row_axes:ndim]


def _gram(x: jax.Array, y: jax.Array, row_axes: int) -> jax.Array:
  """``X Yᵀ`` (a×a) of two leaves viewed as (a, b): sums over the columns."""
  rows, rows2, cols = _labels(x.ndim, row_axes)
  a = _rows(x.shape, row_axes)
  out = jnp.einsum(f'{rows}{cols},{rows2}{cols}->{rows}{rows2}', x, y,
                   out_sharding=replicated(x, y))
  return out.reshape(a, a)


def _apply_left(p: jax.Array, x: jax.Array, row_axes: int) -> jax.Array:
  """``P X`` for a small ``p`` (a×a) and a leaf ``x`` viewed as (a, b); leaf-shaped."""
  rows, rows2, cols = _labels(x.ndim, row_axes)
  p = p.reshape(x.shape[:row_axes] * 2)
  return jnp.einsum(f'{rows}{rows2},{rows2}{cols}->{rows}{cols}', p, x, out_sharding=spec_like(x))


def _contract_rows(w: jax.Array, x: jax.Array, row_axes: int) -> jax.Array:
  """``Wᵀ X`` for ``w`` (a×k): shape ``(k, *columns)``, sharded like ``x``'s columns."""
  rows, _, cols = _labels(x.ndim, row_axes)
  w = w.reshape(*x.shape[:row_axes], w.shape[-1])
  return jnp.einsum(f'{rows}z,{rows}{cols}->z{cols}', w, x,
                    out_sharding=spec_like(x, drop=row_axes, lead=1))


def _contract_cols(x: jax.Array, z: jax.Array, row_axes: int) -> jax.Array:
  """``X Zᵀ`` for ``z`` of shape ``(k, *columns)``: an (a×k) matrix, replicated."""
  rows, _, cols = _labels(x.ndim, row_axes)
  out = jnp.einsum(f'{rows}{cols},z{cols}->{rows}z', x, z, out_sharding=replicated(x, z))
  return out.reshape(_rows(x.shape, row_axes), z.shape[0])


def _expand_rows(w: jax.Array, z: jax.Array, like: jax.Array, row_axes: int) -> jax.Array:
  """``W Z`` for ``w`` (a×k), ``z`` ``(k, *columns)``: leaf-shaped, sharded like ``like``."""
  rows, _, cols = _labels(like.ndim, row_axes)
  w = w.reshape(*like.shape[:row_axes], w.shape[-1])
  return jnp.einsum(f'{rows}z,z{cols}->{rows}{cols}', w, z, out_sharding=spec_like(like))


def _pair(z: jax.Array, y: jax.Array) -> jax.Array:
  """``Z Yᵀ`` (k×l) of two ``(k, *columns)``, ``(l, *columns)`` products: sums over the columns."""
  cols = 'mnopqrstuvwx'[:z.ndim - 1]
  return jnp.einsum(f'z{cols},y{cols}->zy', z, y, out_sharding=replicated(z, y))


def as_matrix(x: jax.Array, row_axes: int) -> jax.Array:
  """Views a leaf as an ``(a, b)`` matrix, rows = its first ``row_axes`` axes."""
  return x.reshape(_rows(x.shape, row_axes), math.prod(x.shape[row_axes:]))


def _top_eigenpair(p):
  """``(λ_max, v)`` of a symmetric ``p``: its largest eigenvalue and a unit eigenvector."""
  w, z = _linalg.eigh(p)
  return w[-1], z[:, -1]


def _exceeds(p, bound):
  """Whether the symmetric ``p`` may have an eigenvalue above ``bound·(1 + _KINK_RTOL)``.

  ``False`` is a certificate, at the cost of one Cholesky factorisation (a third of
  a matrix product, far less than an eigensolver): ``bound·(1 + _KINK_RTOL)·I − p`` is
  positive definite exactly when every eigenvalue of ``p`` is below that level, and
  its factorisation then succeeds (JAX returns NaNs where it fails). Eigenvalues
  within ``_KINK_RTOL`` of the bound count as at the bound, as in ``_snap``, so a
  ``P`` that the projection (``Full.clip``) left at the bound, up to rounding, is
  applied, and differentiated, without an eigensolver.
  """
  level = jnp.asarray(bound, p.dtype) * (1 + _KINK_RTOL)
  factor = _linalg.cholesky(level * jnp.eye(p.shape[0], dtype=p.dtype) - p)
  return ~jnp.all(jnp.isfinite(factor))


def _orthonormal_columns(b):
  """Classical Gram–Schmidt, twice per column (CGS2): orthonormal ``Q``, ``span(Q) ⊇ span(b)`` to ``√ε``.

  A column whose remainder after the first pass is below ``√ε`` of its norm (ε the
  dtype's precision) is numerically in the span of the columns before it and is
  left zero: its remainder is rounding noise, and normalising noise (say for the
  seven dependent columns of ``[U, V]`` when Adam's sign-like steps give ``V``
  rank one) leaves ``Q`` far from orthonormal (large off-diagonals of ``QᵀQ`` in
  float32). Dropping it moves ``span(Q)`` by at most ``√ε`` relative.
  """
  if b.size == 0:
    return b
  tol = math.sqrt(float(jnp.finfo(b.dtype).eps))
  def column(j, q):
    x = jax.lax.dynamic_index_in_dim(b, j, axis=1, keepdims=False)
    n0 = jnp.sqrt(jnp.sum(jnp.square(x)))
    x = x - q @ (q.T @ x)
    keep = jnp.sqrt(jnp.sum(jnp.square(x))) > tol * n0
    x = x - q @ (q.T @ x)
    n = jnp.sqrt(jnp.sum(jnp.square(x)))
    x = jnp.where(keep & (n > 0), x / jnp.where(n > 0, n, 1.0), 0.0)
    return jax.lax.dynamic_update_index_in_dim(q, x, j, axis=1)
  return jax.lax.fori_loop(0, b.shape[1], column, jnp.zeros_like(b))


def _scale_rows(w, z):
  """``diag(w)·z`` for ``z`` of shape ``(k, *columns)``."""
  return w.reshape(-1, *(1,) * (z.ndim - 1)) * z


def _snap(lam, bound):
  """Eigenvalues within ``_KINK_RTOL`` of ``bound`` set to ``bound`` (see ``_divided_differences``)."""
  return jnp.where(jnp.abs(lam - bound) <= _KINK_RTOL * bound, bound, lam)


def _divided_differences(lam, bound):
  """``L_ij = (f(λ_i) − f(λ_j))/(λ_i − λ_j)`` for ``f = min(·, bound)`` (``f'`` on the diagonal).

  ``f'(λ) = 1`` for ``λ ≤ bound`` (so ``P = I`` at ``bound = 1`` is unclipped), else 0.
  Eigenvalues within ``_KINK_RTOL`` (relative) of the bound are snapped onto it first:
  they sit there up to rounding (where the projection or the clip put them) and count as
  unclipped, so the hypergradient does not jump with the last bits of an eigensolver.
  """
  lam = _snap(lam, bound)
  li, lj = lam[:, None], lam[None, :]
  num = jnp.minimum(li, bound) - jnp.minimum(lj, bound)
  den = li - lj
  slope = (jnp.maximum(li, lj) <= bound).astype(lam.dtype)
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), slope)


def _spectral_clip(p, bound):
  """``Q min(Λ, bound) Qᵀ`` for ``p = QΛQᵀ``; ``p`` itself when ``λ_max ≤ bound`` (``_exceeds``)."""
  def clip(p):
    lam, q = _linalg.eigh(p)
    return (q * jnp.minimum(lam, bound)) @ q.T
  return _grouping.cond(_exceeds(p, bound), clip, lambda p: p, p)


def _clipped_derivative(p, c, bound):
  """``∂⟨C, f(P)⟩/∂P = Q (L ∘ QᵀCQ) Qᵀ`` for ``f = min(·, bound)``; ``C`` when nothing is clipped."""
  def clipped(pc):
    p, c = pc
    lam, q = _linalg.eigh(p)
    return q @ (_divided_differences(lam, bound) * (q.T @ c @ q)) @ q.T
  return _grouping.cond(_exceeds(p, bound), clipped, lambda pc: pc[1], (p, c))
