"""How a parameter leaf becomes a matrix, and which preconditioner it gets.

FOP (Moskovitz et al., 2019) preconditions a leaf's gradient ``g`` with a
learned positive semi-definite ``P = MᵀM``. To do so the leaf is *viewed* as a
matrix ``G`` of shape ``(a, b)``: its leading ``row_axes`` axes become the rows
(the side ``P`` acts on), the remaining axes the columns. A *structure* says
which view and which parametrisation of ``M`` a leaf gets, and owns the three
pieces of maths that depend on it:

* ``init``: an ``M`` with ``P = I`` (so FOP's first step is the base optimiser's),
* ``precondition``: ``P·G`` mapped back to the leaf's shape,
* ``hypergradient``: the exact gradient of ``J(θ_t)`` with respect to the ``M``
  that produced ``θ_t = θ_{t-1} − η·P·G_{t-1}``:

  .. math::
    \\frac{∂J(θ_t)}{∂M_{t-1}} = −η\\, M_{t-1} (G_t G_{t-1}^⊤ + G_{t-1} G_t^⊤).

Structures:

============  =========================  ===============  ====================
name          leaf view / M              memory of M      typical leaf
============  =========================  ===============  ====================
``none``      no preconditioning         0                biases, norms
``scalar``    ``P = m²``, one per leaf   1                S-HD style
``diagonal``  ``P = diag(m²)``           leaf size        PP-HD style
``full``      dense ``M`` (a×a)          a²               small dense kernels
``spatial``   dense ``M`` over k×k       (k²)²            conv kernels
``low_rank``  ``M = I + UVᵀ`` (a×r)      2·a·r            large dense kernels
============  =========================  ===============  ====================

``full``, ``spatial`` and ``low_rank`` accept ``normalize=True`` (FOP-norm, the
paper's Appendix A.2): ``P`` is rescaled to ``a·P / tr(P)``, i.e. to unit mean
eigenvalue (trace = nuclear norm for a PSD matrix, so this is the normalised
``P`` of the paper in the norm that keeps ``P = I`` fixed). FOP then only
rotates the gradient and never changes the effective learning rate.

The default rule (:func:`default_structure`): 0-d and 1-d leaves get ``none``;
2-d leaves ``(in, out)`` get ``full`` on the input side when ``in ≤
max_full_dim``, else ``low_rank``; leaves of rank ≥ 3 are taken to be conv
kernels in Flax layout ``(*spatial, in, out)`` and get ``spatial``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

__all__ = [
    'Structure', 'NoPreconditioner', 'Scalar', 'Diagonal', 'Full', 'Spatial',
    'LowRank', 'default_structure', 'resolve_structures', 'as_structure',
    'STRUCTURE_NAMES',
]

Shape = tuple[int, ...]


def _rows(shape: Shape, row_axes: int) -> int:
  return math.prod(shape[:row_axes])


def _explicit_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types


def _replicated():
  """``out_sharding`` for FOP's small matrices (a×a, a×r): replicated.

  Under a mesh with explicit axes JAX cannot guess the sharding of a product
  that contracts a (possibly sharded) leaf axis; FOP's matrices are small, so
  they are replicated on every device. Elsewhere ``None`` leaves the choice to
  the compiler.
  """
  return jax.sharding.PartitionSpec() if _explicit_mesh() else None


def _spec(x: jax.Array, drop_rows: int = 0, lead: int = 0):
  """``out_sharding`` for a leaf-like product: ``x``'s spec (explicit mesh only).

  The first ``drop_rows`` axes of ``x`` are replaced by ``lead`` unsharded
  axes, for products ``(k, *columns)`` that contract the rows away.
  """
  if not _explicit_mesh():
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  return jax.sharding.PartitionSpec(*((None,) * lead + spec[drop_rows:]))


# FOP's products are einsums over the leaf's own axes (rows first, then
# columns), never over a reshaped (a, b) view: reshaping a sharded leaf would
# need a resharding, and XLA:CPU materialises the transpose in ``x @ y.T`` of
# a large view (5-10x slower for FOP's skinny products).
def _labels(ndim: int, row_axes: int) -> tuple[str, str, str]:
  """Einsum labels: the leaf's rows, a second copy of the rows, its columns."""
  assert ndim <= 12
  return 'abcdefghijkl'[:row_axes], 'ABCDEFGHIJKL'[:row_axes], 'mnopqrstuvwx'[row_axes:ndim]


def _gram(x: jax.Array, y: jax.Array, row_axes: int) -> jax.Array:
  """``X Yᵀ`` (a×a) of two leaves viewed as (a, b): sums over the columns."""
  rows, rows2, cols = _labels(x.ndim, row_axes)
  a = _rows(x.shape, row_axes)
  out = jnp.einsum(f'{rows}{cols},{rows2}{cols}->{rows}{rows2}', x, y,
                   out_sharding=_replicated())
  return out.reshape(a, a)


def _apply_left(p: jax.Array, x: jax.Array, row_axes: int) -> jax.Array:
  """``P X`` for a small ``p`` (a×a) and a leaf ``x`` viewed as (a, b); leaf-shaped."""
  rows, rows2, cols = _labels(x.ndim, row_axes)
  p = p.reshape(x.shape[:row_axes] * 2)
  return jnp.einsum(f'{rows}{rows2},{rows2}{cols}->{rows}{cols}', p, x, out_sharding=_spec(x))


def _contract_rows(w: jax.Array, x: jax.Array, row_axes: int) -> jax.Array:
  """``Wᵀ X`` for ``w`` (a×k): shape ``(k, *columns)``, sharded like ``x``'s columns."""
  rows, _, cols = _labels(x.ndim, row_axes)
  w = w.reshape(*x.shape[:row_axes], w.shape[-1])
  return jnp.einsum(f'{rows}z,{rows}{cols}->z{cols}', w, x,
                    out_sharding=_spec(x, drop_rows=row_axes, lead=1))


def _contract_cols(x: jax.Array, z: jax.Array, row_axes: int) -> jax.Array:
  """``X Zᵀ`` for ``z`` of shape ``(k, *columns)``: an (a×k) matrix, replicated."""
  rows, _, cols = _labels(x.ndim, row_axes)
  out = jnp.einsum(f'{rows}{cols},z{cols}->{rows}z', x, z, out_sharding=_replicated())
  return out.reshape(_rows(x.shape, row_axes), z.shape[0])


def _expand_rows(w: jax.Array, z: jax.Array, like: jax.Array, row_axes: int) -> jax.Array:
  """``W Z`` for ``w`` (a×k), ``z`` ``(k, *columns)``: leaf-shaped, sharded like ``like``."""
  rows, _, cols = _labels(like.ndim, row_axes)
  w = w.reshape(*like.shape[:row_axes], w.shape[-1])
  return jnp.einsum(f'{rows}z,z{cols}->{rows}{cols}', w, z, out_sharding=_spec(like))


def as_matrix(x: jax.Array, row_axes: int) -> jax.Array:
  """Views a leaf as an ``(a, b)`` matrix, rows = its first ``row_axes`` axes."""
  return x.reshape(_rows(x.shape, row_axes), math.prod(x.shape[row_axes:]))


class Structure:
  """Base class: how one leaf is preconditioned. Subclasses are frozen dataclasses.

  Every method is pure and shape-static, so it can run inside ``jax.jit``.
  ``m`` is the learned parameter of the preconditioner (the state's entry for
  the leaf), ``g`` and ``g_prev`` the leaf's current and previous gradient.
  """

  name: ClassVar[str]

  def validate(self, shape: Shape) -> None:
    """Raises ``ValueError`` if the structure cannot serve a leaf of ``shape``."""

  def init(self, shape: Shape, dtype: Any, key: jax.Array) -> jax.Array:
    """Returns ``m`` such that ``P = I``."""
    raise NotImplementedError

  def precondition(self, m: jax.Array, g: jax.Array) -> jax.Array:
    """Returns ``P·g`` with ``g``'s shape and dtype."""
    raise NotImplementedError

  def hypergradient(self, m: jax.Array, g: jax.Array, g_prev: jax.Array,
                    learning_rate: jax.Array) -> jax.Array:
    """Returns ``∂J(θ_t)/∂m`` for ``θ_t = θ_{t-1} − η·P(m)·g_prev``, ``g = ∇J(θ_t)``."""
    raise NotImplementedError

  def matrix(self, m: jax.Array, shape: Shape) -> jax.Array:
    """Returns ``P`` for diagnostics: dense (a×a), or elementwise for diagonal forms."""
    raise NotImplementedError

  def hyper_step_scale(self, shape: Shape) -> float:
    """Factor on the default (Adam) hyper step of this leaf's ``m``.

    Adam moves every entry of ``m`` by about its learning rate per step, and the
    entries of a hypergradient share their signs, so a dense (a×a) ``M`` can move
    by up to ``lr·a`` in spectral norm per step: a 64×64 ``P`` would change 7×
    faster than the 3×3 spatial ones the paper tuned Adam(1e-4) on. Structures
    with such coherent entries return the factor that brings them back to that
    rate; 1 for the others.
    """
    del shape
    return 1.0

  def clip(self, m: jax.Array, max_scale: float) -> jax.Array:
    """Rescales ``m`` so that ``P`` amplifies gradients by at most ``max_scale``.

    The bound is on each eigenvalue for ``scalar``/``diagonal``/``low_rank``
    and on the mean eigenvalue ``tr(P)/a`` for ``full``/``spatial`` (their
    identity start has ``tr(P)/a = 1``). An ``m`` within the bound is unchanged.
    """
    del max_scale
    return m


@dataclasses.dataclass(frozen=True)
class NoPreconditioner(Structure):
  """``P = I``: the leaf passes through unchanged.

  Its ``m`` is a scalar placeholder (not a zero-size array, which Orbax
  refuses to checkpoint).
  """

  name: ClassVar[str] = 'none'

  def init(self, shape, dtype, key):
    del shape, key
    return jnp.zeros((), dtype)

  def precondition(self, m, g):
    del m
    return g

  def hypergradient(self, m, g, g_prev, learning_rate):
    del g, g_prev, learning_rate
    return jnp.zeros_like(m)

  def matrix(self, m, shape):
    del m
    return jnp.ones(shape)


@dataclasses.dataclass(frozen=True)
class Scalar(Structure):
  """One learned scale per leaf: ``P = m²·I`` (a layer-wise learning rate, as S-HD)."""

  name: ClassVar[str] = 'scalar'

  def init(self, shape, dtype, key):
    del shape, key
    return jnp.ones((), dtype)

  def precondition(self, m, g):
    return (jnp.square(m) * g.astype(m.dtype)).astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    # ∂/∂m of −η m² ⟨g, g_prev⟩.
    inner = jnp.vdot(g.astype(m.dtype), g_prev.astype(m.dtype))
    return -2 * learning_rate * m * inner

  def matrix(self, m, shape):
    return jnp.square(m) * jnp.ones(shape, m.dtype)

  def clip(self, m, max_scale):
    bound = jnp.sqrt(jnp.asarray(max_scale, m.dtype))
    return jnp.clip(m, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Diagonal(Structure):
  """One learned scale per parameter: ``P = diag(m²)`` (per-parameter rates, as PP-HD)."""

  name: ClassVar[str] = 'diagonal'

  def init(self, shape, dtype, key):
    del key
    return jnp.ones(shape, dtype)

  def precondition(self, m, g):
    return (jnp.square(m) * g.astype(m.dtype)).astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    return -2 * learning_rate * m * g.astype(m.dtype) * g_prev.astype(m.dtype)

  def matrix(self, m, shape):
    del shape
    return jnp.square(m)

  clip = Scalar.clip


@dataclasses.dataclass(frozen=True)
class Full(Structure):
  """A dense learned ``M`` (a×a) acting on the rows of the leaf's matrix view.

  Attributes:
    row_axes: how many leading axes form the rows; 1 gives ``a = in`` for a
      dense kernel ``(in, out)``, and ``a = n`` (one column) for a vector.
    normalize: FOP-norm: use ``a·P/tr(P)`` instead of ``P``.
  """

  name: ClassVar[str] = 'full'
  row_axes: int = 1
  normalize: bool = False

  def _row_axes(self, shape: Shape) -> int:
    return self.row_axes

  def validate(self, shape):
    if not 1 <= self._row_axes(shape) <= len(shape):
      raise ValueError(
          f'{self!r} needs a leaf with at least {self.row_axes} axes, got shape {shape}')

  def init(self, shape, dtype, key):
    del key
    return jnp.eye(_rows(shape, self._row_axes(shape)), dtype=dtype)

  def _p(self, m):
    p = m.T @ m
    if self.normalize:
      p = p * (m.shape[0] / _trace_of_mtm(m))
    return p

  def precondition(self, m, g):
    # One product per leaf: P (a×a) is formed first (a ≤ max_full_dim, or k²).
    out = _apply_left(self._p(m), g.astype(m.dtype), self._row_axes(g.shape))
    return out.astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    # One product per leaf for C = G_t G_pᵀ; the rest is a×a.
    c = _gram(g.astype(m.dtype), g_prev.astype(m.dtype), self._row_axes(g.shape))
    grad = m @ (c + c.T)
    if self.normalize:
      # P̃ = s·P with s = a/t, t = tr(P) = ‖M‖²_F, so
      # ∂J/∂M = −η s [M(C + Cᵀ) − (2/t)⟨C, P⟩ M].
      t = _trace_of_mtm(m)
      grad = (m.shape[0] / t) * (grad - (2 / t) * jnp.vdot(c, m.T @ m) * m)
    return -learning_rate * grad

  def matrix(self, m, shape):
    del shape
    return self._p(m)

  def hyper_step_scale(self, shape):
    # ‖ΔM‖₂ ≤ lr·a for Adam's sign-like steps; the paper's 3×3 kernels have a = 9.
    return min(1.0, REFERENCE_ROWS / max(_rows(shape, self._row_axes(shape)), 1))

  def clip(self, m, max_scale):
    mean_eig = _trace_of_mtm(m) / max(m.shape[0], 1)
    return m * jnp.sqrt(jnp.minimum(1.0, max_scale / mean_eig)).astype(m.dtype)


@dataclasses.dataclass(frozen=True)
class Spatial(Full):
  """Dense ``M`` over the spatial taps of a conv kernel ``(*spatial, in, out)``.

  For a ``k×k`` kernel ``a = k²``: one small matrix per layer, shared across the
  input and output channels (81 numbers for 3×3), as in the paper's conv nets.
  """

  name: ClassVar[str] = 'spatial'
  row_axes: int = dataclasses.field(default=-1, repr=False)

  def _row_axes(self, shape):
    return len(shape) - 2

  def validate(self, shape):
    if len(shape) < 3:
      raise ValueError(
          f'spatial FOP needs a conv kernel of shape (*spatial, in, out) with rank '
          f'>= 3, got shape {shape}; use full/low_rank/diagonal for it instead')


@dataclasses.dataclass(frozen=True)
class LowRank(Structure):
  """``M = I + UVᵀ`` with ``U, V`` of shape (a×r): O(a·r) memory, O(a·r·b) work.

  ``U`` starts as a random orthonormal basis and ``V`` at zero (so ``P = I``,
  and the hypergradient of ``V`` is nonzero from the first step, like LoRA). ``m``
  stores ``U`` and ``V`` stacked as an array of shape ``(2, a, r)``.

  Attributes:
    rank: ``r``; clipped to ``a``.
    row_axes: as for :class:`Full`.
    normalize: FOP-norm, as for :class:`Full`.
  """

  name: ClassVar[str] = 'low_rank'
  rank: int = 8
  row_axes: int = 1
  normalize: bool = False

  def validate(self, shape):
    if self.rank < 1:
      raise ValueError(f'low_rank needs rank >= 1, got {self.rank}')
    if not 1 <= self.row_axes <= len(shape):
      raise ValueError(
          f'{self!r} needs a leaf with at least {self.row_axes} axes, got shape {shape}')

  def init(self, shape, dtype, key):
    a = _rows(shape, self.row_axes)
    r = min(self.rank, a)
    u, _ = jnp.linalg.qr(jax.random.normal(key, (a, r), jnp.float32))
    return jnp.stack([u, jnp.zeros_like(u)]).astype(dtype)

  @staticmethod
  def _m(m, x):   # M·x
    return x + m[0] @ (m[1].T @ x)

  def _scale(self, m):
    """Returns (s, t): P̃ = s·P, t = tr(P) = ‖I + UVᵀ‖²_F (s = 1 without normalize)."""
    if not self.normalize:
      return 1.0, None
    u, v = m[0], m[1]
    t = u.shape[0] + 2 * jnp.vdot(u, v) + jnp.vdot(u.T @ u, v.T @ v)
    return u.shape[0] / t, t

  @staticmethod
  def _factors(m):
    """``L = [U, V]`` and ``R = [V, MᵀU]`` (a×2r) with ``P = I + L Rᵀ``.

    ``MᵀM = (I + VUᵀ)(I + UVᵀ) = I + UVᵀ + V(U + VUᵀU)ᵀ`` and ``MᵀU = U + V(UᵀU)``.
    """
    u, v = m[0], m[1]
    mtu = u + v @ (u.T @ u)
    return jnp.concatenate([u, v], axis=1), jnp.concatenate([v, mtu], axis=1)

  def precondition(self, m, g):
    s, _ = self._scale(m)
    left, right = self._factors(m)
    x = g.astype(m.dtype)
    # P·G = G + L (Rᵀ G): two (a×2r)-wide products, each one pass over G.
    out = s * (x + _expand_rows(left, _contract_rows(right, x, self.row_axes), x, self.row_axes))
    return out.astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    gt, gp = g.astype(m.dtype), g_prev.astype(m.dtype)
    rows = self.row_axes
    u, v = m[0], m[1]
    # With H = ∂J/∂M = −η M S, S = G_t G_pᵀ + G_p G_tᵀ (never formed):
    # ∂J/∂U = H V = −η M (S V) and ∂J/∂V = Hᵀ U = −η S (Mᵀ U); with
    # X = [V, MᵀU] both come from S X = G_t (G_pᵀ X) + G_p (G_tᵀ X).
    left, x = self._factors(m)
    xgp = _contract_rows(x, gp, rows)
    sx = _contract_cols(gt, xgp, rows) + _contract_cols(gp, _contract_rows(x, gt, rows), rows)
    r = u.shape[1]
    du, dv = self._m(m, sx[:, :r]), sx[:, r:]
    s, t = self._scale(m)
    if self.normalize:
      # Extra term of ∂J/∂M: −(2/t)⟨C, P⟩ M, with
      # ⟨C, P⟩ = ⟨G_t, P G_p⟩ = ⟨G_t, G_p⟩ + ⟨Lᵀ G_t, Rᵀ G_p⟩.
      cp = jnp.vdot(gt, gp) + jnp.vdot(_contract_rows(left, gt, rows), xgp)
      du = du - (2 / t) * cp * self._m(m, v)
      dv = dv - (2 / t) * cp * x[:, r:]
    return -learning_rate * s * jnp.stack([du, dv])

  def matrix(self, m, shape):
    mm = self._m(m, jnp.eye(m.shape[1], dtype=m.dtype))
    s, _ = self._scale(m)
    return s * (mm.T @ mm)

  def hyper_step_scale(self, shape):
    # ‖Δ(UVᵀ)‖₂ ≤ lr·√(a·r) for Adam's sign-like steps on the (a×r) factors.
    a = _rows(shape, self.row_axes)
    return min(1.0, REFERENCE_ROWS / math.sqrt(max(a * min(self.rank, a), 1)))

  def clip(self, m, max_scale):
    # ‖M‖₂ ≤ 1 + ‖UVᵀ‖_F, so ‖UVᵀ‖_F ≤ √max_scale − 1 bounds every eigenvalue of P.
    u, v = m[0], m[1]
    norm = jnp.sqrt(jnp.maximum(jnp.vdot(u.T @ u, v.T @ v), 0.0))
    limit = jnp.maximum(jnp.sqrt(jnp.asarray(max_scale, m.dtype)) - 1, 0.0)
    c = jnp.minimum(1.0, limit / jnp.maximum(norm, jnp.finfo(m.dtype).tiny))
    return jnp.stack([u, c * v])


def _trace_of_mtm(m):
  # tr(MᵀM) = ‖M‖²_F; the floor only matters for an all-zero M.
  return jnp.maximum(jnp.vdot(m, m), jnp.finfo(m.dtype).tiny)


_BY_NAME: dict[str, Callable[[], Structure]] = {
    'none': NoPreconditioner, 'scalar': Scalar, 'diagonal': Diagonal,
    'full': Full, 'spatial': Spatial, 'low_rank': LowRank,
}
STRUCTURE_NAMES: tuple[str, ...] = ('auto',) + tuple(_BY_NAME)


DEFAULT_MAX_FULL_DIM = 64
# Rows of the matrices the paper's hyper learning rate was tuned on (3×3 spatial).
REFERENCE_ROWS = 9
DEFAULT_RANK = 8


def default_structure(shape: Shape, *, max_full_dim: int | None = None,
                      rank: int | None = None, normalize: bool = False) -> Structure:
  """The default rule: see the module docstring (``None`` means the default value)."""
  max_full_dim = DEFAULT_MAX_FULL_DIM if max_full_dim is None else max_full_dim
  rank = DEFAULT_RANK if rank is None else rank
  if len(shape) <= 1 or math.prod(shape) == 0:
    return NoPreconditioner()
  if len(shape) == 2:
    if shape[0] <= max_full_dim:
      return Full(normalize=normalize)
    return LowRank(rank=rank, normalize=normalize)
  return Spatial(normalize=normalize)


def as_structure(spec: Any, shape: Shape, **rule_kwargs) -> Structure:
  """Turns a label (``'auto'``, ``'full'``, ...) or a :class:`Structure` into one."""
  if isinstance(spec, Structure):
    return spec
  if isinstance(spec, str):
    if spec == 'auto':
      return default_structure(shape, **rule_kwargs)
    if spec in _BY_NAME:
      normalize = rule_kwargs.get('normalize', False)
      if spec == 'low_rank':
        rank = rule_kwargs.get('rank')
        return LowRank(rank=DEFAULT_RANK if rank is None else rank, normalize=normalize)
      if spec in ('full', 'spatial'):
        return _BY_NAME[spec](normalize=normalize)
      return _BY_NAME[spec]()
  raise ValueError(
      f'unknown FOP structure {spec!r}; expected a fop_optax.structures.Structure '
      f'or one of {STRUCTURE_NAMES}')


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or '<root>'


def check_leaf_dtype(path, leaf, what: str = 'FOP') -> None:
  """Raises ``TypeError`` for a leaf that is not real floating point; ``what`` names the method."""
  dtype = jnp.dtype(leaf.dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
        f'parameter {_path_str(path)} is complex ({dtype}); {what} needs real '
        'floating-point leaves (split complex parameters into real and imaginary parts)')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'parameter {_path_str(path)} has dtype {dtype}; {what} needs floating-point '
        'leaves (integer or boolean leaves have no gradient: mask them out with '
        'optax.masked or optax.partition)')


def resolve_structures(params: Any, structures: Any = None, **rule_kwargs) -> Any:
  """Returns a params-shaped tree of :class:`Structure`, one per leaf.

  Args:
    params: parameters (arrays or anything with ``.shape`` and ``.dtype``,
      e.g. ``jax.ShapeDtypeStruct``).
    structures: ``None`` (the default rule for every leaf); a label or a
      :class:`Structure` for every leaf; a pytree prefix of ``params`` whose
      leaves are labels or structures; or a callable ``params -> such a tree``
      (as for ``optax.masked``). Labels: ``'auto'`` (the default rule),
      ``'none'``, ``'scalar'``, ``'diagonal'``, ``'full'``, ``'spatial'``,
      ``'low_rank'``.
    **rule_kwargs: ``max_full_dim``, ``rank``, ``normalize`` for the default
      rule and for labels.

  Raises:
    TypeError: a leaf is not a real floating-point array.
    ValueError: a structure does not fit its leaf's shape, or the tree of
      structures does not match the parameters.
  """
  for name in ('max_full_dim', 'rank'):
    value = rule_kwargs.get(name)
    if value is not None and not isinstance(value, int):
      raise TypeError(
          f'{name} must be a Python int (it sets array shapes), got {value!r}; '
          f'with optax.inject_hyperparams pass static_args=({name!r},)')
  if callable(structures) and not isinstance(structures, Structure):
    structures = structures(params)
  if structures is None:
    structures = 'auto'

  is_spec = lambda x: isinstance(x, (Structure, str))
  try:
    # Broadcast the (prefix) tree of labels to one label per parameter leaf.
    specs = jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: spec, sub),
                         structures, params, is_leaf=is_spec)
  except ValueError as e:
    raise ValueError(
        'the tree of FOP structures must be a prefix of the parameters tree; '
        f'got structures {jax.tree.structure(structures, is_leaf=is_spec)} for '
        f'parameters {jax.tree.structure(params)}') from e

  def one(path, leaf, spec):
    check_leaf_dtype(path, leaf)
    structure = as_structure(spec, tuple(leaf.shape), **rule_kwargs)
    try:
      structure.validate(tuple(leaf.shape))
    except ValueError as e:
      raise ValueError(f'parameter {_path_str(path)}: {e}') from None
    return structure

  return jax.tree_util.tree_map_with_path(one, params, specs)


def leaf_paths(tree: Any) -> list[str]:
  """Readable paths of a tree's leaves, for error messages."""
  return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_variable(x: Any) -> bool:
  # Flax NNX wraps parameters in Variables that carry sharding metadata; only
  # look for the class if flax is already imported (it is not a dependency).
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Variable)


def unwrapped_treedef(tree: Any) -> jax.tree_util.PyTreeDef:
  """The tree's structure with Flax ``Variable`` wrappers dropped.

  State that is not shaped like its parameter (FOP's matrices, per-leaf
  scalars) is built on this structure, so that frameworks which copy a
  parameter's sharding annotation onto every state entry under its
  ``Variable`` (``nnx.Optimizer``) leave these entries unannotated
  (replicated) instead of forcing a rank-mismatched partition spec on them.
  """
  treedef = jax.tree.structure(tree, is_leaf=_is_variable)
  if treedef.num_leaves != jax.tree.structure(tree).num_leaves:
    raise ValueError('every Variable in the parameters must hold exactly one array')
  return treedef
