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
``none``      no preconditioning         0                biases, norms,
                                                          embedding tables
``scalar``    ``P = m²``, one per leaf   1                S-HD style
``diagonal``  ``P = diag(m²)``           leaf size        PP-HD style
``full``      dense ``M`` (a×a)          a²               small dense and
                                                          attention kernels
``spatial``   dense ``M`` over k×k       (k²)²            conv kernels
``low_rank``  ``M = I + UVᵀ`` (a×r)      2·a·r            large dense and
                                                          attention kernels
============  =========================  ===============  ====================

``full``, ``spatial`` and ``low_rank`` accept ``normalize=True`` (FOP-norm): ``P``
is divided by its spectral norm, ``P̃ = P/‖P‖₂``, the normalisation of the
paper's convergence argument (Theorem 1, ``γ(t) = ‖P‖₂`` at ``δ = 1``). Every
eigenvalue of ``P̃`` is then at most 1: FOP-norm can shorten the step along
some directions and rotate it, but never lengthen it along any direction.
(An earlier version divided by the mean eigenvalue ``tr(P)/a``, which let a
single direction grow without bound while the mean stayed at 1.)

The guard (``max_scale = B`` of :func:`fop_optax.scale_by_fop`, default 1)
bounds the *largest* eigenvalue of every ``P`` that is applied, so no direction's
step is ever more than ``B`` times the base optimiser's. ``full``/``spatial`` and
``low_rank`` clip ``P``'s eigenvalues at ``B`` where ``P`` is applied,
``P̃ = Q min(Λ, B) Qᵀ`` (exactly: the (a×a) eigenvalues, skipped when a
Cholesky factorisation of ``B(1 + 10⁻⁵)·I − P`` proves ``λ_max ≤ B`` up to
rounding, as it does after the projection of each hyper step, so a step costs
one eigensolver per matrix at most; for ``low_rank`` the (2r×2r)
eigenvalues of ``P`` on ``span(U, V)``, where ``P = I`` on the complement: with
``Q`` a Householder basis of ``[U, V]``, ``P̃ = I + Q·min(A, B − 1)·Qᵀ`` for
``A = Qᵀ(P − I)Q``, applied with the same two passes over the gradient as ``P``), and
their hypergradient is that of ``P̃`` (divided differences of ``min(·, B)``,
Daleckii–Krein), so a clipped direction receives no push to grow further while
the others keep learning. ``scalar``/``diagonal`` project ``m²`` onto ``[0, B]``.
At ``B = 1`` FOP can shorten the step along some directions and rotate it, never
lengthen it.

The default rule (:func:`default_structure`) follows what a leaf *is*, read
from its path (its own name, the last entry; for an attention kernel also its
layer's name and that layer's siblings; a Flax NNX ``Variable``'s trailing
``.value`` is dropped) and its shape, as :func:`leaf_role` reports it. Below,
"dense over ``k`` axes" means rows = the leaf's first ``k`` axes, ``a`` their
product: ``full`` (``Full(row_axes=k)``) when ``a ≤ max_full_dim`` (default
32), else ``low_rank`` (``LowRank(rank, row_axes=k)``).

=====================================  ====================================  =========================
leaf                                   role                                  default structure
=====================================  ====================================  =========================
0-d, 1-d or empty                      any                                   ``none``
named ``bias`` or ``scale``            ``'norm_or_bias'`` (LayerNorm,        ``none``
(any rank)                             RMSNorm, BatchNorm, LinearGeneral
                                       biases ``(heads, head_dim)``)
name ends in ``embedding``             ``'embedding'`` (``nnx.Embed``        ``none``
                                       table ``(vocab, features)``)
``kernel`` of ``query``/``key``/       ``'attention_input'``                 dense over 1 axis (the
``value`` in an attention block        ``(in, heads, head_dim)``             input features)
``kernel`` of ``out`` in an            ``'attention_output'``                dense over ``ndim − 1``
attention block                        ``(heads, head_dim, out)``            axes (heads × head_dim)
other rank ≥ 3 under an attention-     ``'ambiguous'`` (``nnx.Einsum``       ``none``, and one warning
like or stacked-layers node            heads, a K/V stack, an ``nnx.scan``   per resolution naming the
(:func:`suspect_node`)                 layer axis)                           leaves
other 2-d ``(in, out)``                ``'other'`` (``nnx.Linear``)          dense over 1 axis
other rank ≥ 3 ``(*lead, in, out)``    ``'other'``: a conv kernel when       ``spatial`` (one
with ``∏ lead ≤ MAX_SPATIAL_TAPS``     its leading axes are few taps         ``∏lead × ∏lead`` M)
other rank ≥ 3, ``∏ lead`` larger      ``'other'`` (e.g. an unnamed          dense over ``ndim − 2``
                                       ``(in, heads, head_dim)`` kernel)     axes
=====================================  ====================================  =========================

An *attention block* is a node of the tree with children named ``query``,
``key``, ``value`` and ``out`` (Flax's ``nnx.MultiHeadAttention`` and linen's
``MultiHeadDotProductAttention``); a lone ``out`` layer (say a UNet's last
conv) is not one. Why these choices:

* Embedding tables get ``none``: a preconditioner over the vocabulary axis
  (what the shape-only rule gave a ``(vocab, features)`` table) mixes rows, so
  rows of tokens that were never in a batch would move. A feature-axis
  preconditioner (``G·P``) would keep rows apart but acts on the side none of
  these structures act on (they all multiply the rows, ``P·G``); ``none``
  leaves each row to its own gradient, as the base optimiser does.
* ``spatial`` is for genuine convolution kernels: its matrix is over the
  kernel taps, e.g. 9×9 for 3×3. ``MAX_SPATIAL_TAPS`` (64) admits 1-D kernels
  of up to 64 taps, 2-D up to 8×8 (7×7 stems, 8×8 patch embeddings) and 3-D
  up to 4×4×4; a kernel whose leading axes hold more than 64 "taps" is far more
  likely features (an attention or ``LinearGeneral`` kernel) and a full
  ``(∏lead)²`` matrix could be huge (512² for ``in = 512``), so it is treated
  as a dense kernel over its leading axes. For a rank-3 leaf both views have
  the same rows, its first axis (``spatial`` over a 1-D kernel's taps is
  ``Full(row_axes=1)``); they differ only in that more than 64 rows get a
  low-rank ``M`` (with the default ``max_full_dim``).
* Attention kernels are dense kernels whose input is one axis (``query``/
  ``key``/``value``: ``in``) or two (``out``: ``heads × head_dim``), so FOP
  preconditions the same side it preconditions for ``nnx.Linear``.

* A rank ≥ 3 leaf under an *attention-like* node (a path element ``attn``,
  ``attention``, or ending in ``attn``, ``attention`` or ``einsum``; the leaf's
  own name counts, e.g. Gemma's ``gating_einsum``) or a
  *stacked-layers* node (an element ``layers``, ``scan``, ``stack`` or ``blocks``
  with no integer index after it: ``layers/0/...`` is a list of separate
  layers, ``layers/...`` one stacked by ``nnx.scan``), other than the
  query/key/value/out kernels of an attention block, gets ``none``: its leading
  axes are likely heads (``nnx.Einsum``'s ``(heads, embed, head_dim)``), a
  key/value stack ``(2, kv_heads, embed, head_dim)`` or layers ``(L, in, out)``,
  which the shape rule would read as conv taps, i.e. a ``P`` mixing heads,
  keys with values, or layers. Leaving them to the base optimiser is safe; one
  warning per resolution names them and points to
  :func:`fop_optax.structures_for`, which reads the layers themselves.

Explicit dimension numbers (:class:`FopDimensionNumbers`, like
``optax.contrib.MuonDimensionNumbers``) read a leaf through any axes:
``rows`` (the contracted input axes ``P`` acts on), ``batch`` (one ``P`` per
index) and the remaining columns. :class:`WithDimensions` applies any structure
that way (transposing the rows to the front and ``jax.vmap``-ing over the batch
axes), and a bare ``FopDimensionNumbers`` given as a leaf's structure means dense
over those rows (``full`` up to ``max_full_dim`` rows, else ``low_rank``).
:func:`fop_optax.structures_for` builds them from a Flax NNX model, and
:func:`fop_optax.describe` reports how each leaf is read.

Any ``LinearGeneral`` layout the names do not reveal (say ``(h, d, out)``
outside an attention block, where the shape-only rule would take ``h`` alone
as the rows) is set per leaf, as for any override: ``Full(row_axes=2)`` or
``LowRank(rank, row_axes=2)``. Plain dicts, tuples and ``jax.ShapeDtypeStruct``
leaves without these names get the shape-only rows of the table.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from fop_optax import _linalg

__all__ = [
    'Structure', 'NoPreconditioner', 'Scalar', 'Diagonal', 'Full', 'Spatial',
    'LowRank', 'default_structure', 'resolve_structures', 'as_structure',
    'leaf_role', 'leaf_names', 'STRUCTURE_NAMES', 'ROLES', 'MAX_SPATIAL_TAPS',
    'FopDimensionNumbers', 'WithDimensions', 'with_dimensions', 'Layout',
    'normalize_dimensions', 'find_attention_blocks', 'suspect_node',
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


def _pair(z: jax.Array, y: jax.Array) -> jax.Array:
  """``Z Yᵀ`` (k×l) of two ``(k, *columns)``, ``(l, *columns)`` products: sums over the columns."""
  cols = 'mnopqrstuvwx'[:z.ndim - 1]
  return jnp.einsum(f'z{cols},y{cols}->zy', z, y, out_sharding=_replicated())


def as_matrix(x: jax.Array, row_axes: int) -> jax.Array:
  """Views a leaf as an ``(a, b)`` matrix, rows = its first ``row_axes`` axes."""
  return x.reshape(_rows(x.shape, row_axes), math.prod(x.shape[row_axes:]))


class FopDimensionNumbers(NamedTuple):
  """Which axes of a leaf ``P`` acts on, which get their own ``P``, which share it.

  Like ``optax.contrib.MuonDimensionNumbers``: a leaf ``W`` of any rank is read
  as a stack of matrices. ``rows`` are the axes ``P`` acts on (the contracted
  *input* axes of the layer: ``x·W`` sums over them), ``batch`` are axes with
  one independent ``P`` per index (the layer axis of an ``nnx.scan`` stack, the
  K/V axis of a stacked key/value kernel), and every other axis is a column
  sharing that ``P``. For each batch index ``i`` the leaf's slice is viewed as
  the matrix ``(∏ rows, ∏ columns)`` (rows and columns each in their axis
  order) and preconditioned as ``P_i·G_i``.

  Attributes:
    rows: an axis or a sequence of axes (negative axes count from the end);
      must not be empty for a matrix structure.
    batch: an axis or a sequence of axes; default none.
  """

  rows: Sequence[int] | int = 0
  batch: Sequence[int] | int = ()


def _axes(x: Sequence[int] | int) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


def normalize_dimensions(dims: FopDimensionNumbers, ndim: int) -> tuple[
    tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """``(rows, batch, columns)`` as non-negative axes of a rank-``ndim`` leaf.

  Raises ``ValueError`` for an axis out of range or named twice.
  """
  rows, batch = _axes(dims.rows), _axes(dims.batch)
  for ax in rows + batch:
    if not -ndim <= ax < ndim:
      raise ValueError(f'{dims} names axis {ax}, out of range for a leaf of rank {ndim}')
  rows = tuple(ax % ndim for ax in rows)
  batch = tuple(ax % ndim for ax in batch)
  if len(set(rows + batch)) != len(rows + batch):
    raise ValueError(f'{dims} names an axis twice (rows {rows}, batch {batch})')
  columns = tuple(ax for ax in range(ndim) if ax not in rows + batch)
  return rows, batch, columns


class Layout(NamedTuple):
  """How a structure reads a leaf (:meth:`Structure.layout`), for reports.

  Attributes:
    rows: the axes ``P`` acts on.
    batch: axes with one ``P`` per index.
    columns: the axes sharing ``P``.
    matrix: the shape of ``P`` as :meth:`Structure.matrix` returns it
      (``(*batch, a, a)``; leaf-shaped for ``diagonal``; ``()`` for
      ``scalar``); ``None`` for ``none``.
    floats: the number of floats in the learned ``m``.
  """

  rows: tuple[int, ...]
  batch: tuple[int, ...]
  columns: tuple[int, ...]
  matrix: tuple[int, ...] | None
  floats: int


def _state_floats(structure: 'Structure', shape: Shape) -> int:
  out = jax.eval_shape(lambda: structure.init(tuple(shape), jnp.float32, jax.random.key(0)))
  return math.prod(out.shape)


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
    """Projects ``m`` so that ``P = m²`` is at most ``max_scale`` (``scalar``/``diagonal``).

    Applied to the state after each hyper step (projected hypergradient descent).
    ``full``/``spatial`` clip ``M``'s singular values at ``√max_scale``;
    ``low_rank`` keeps its raw ``λ_max`` within ``2·max_scale`` (the applied
    ``P`` is clipped at ``max_scale`` by :meth:`precondition`, see
    :meth:`with_bound`). This default returns ``m`` unchanged.
    """
    del max_scale
    return m

  def clip_and_precondition(self, m: jax.Array, max_scale: float,
                            g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(clip(m, max_scale), precondition(clipped m, g))``, sharing what both need.

    The hyper step's projection and the step's preconditioning act on the same
    new ``M``; ``low_rank`` computes its span basis once for both.
    """
    m = self.clip(m, max_scale)
    return m, self.precondition(m, g)

  def with_bound(self, max_scale: float | None) -> 'Structure':
    """This structure with the guard ``max_scale`` if it bounds ``P`` where it is applied.

    ``full``/``spatial``/``low_rank`` clip ``P``'s eigenvalues at ``max_scale``
    (keeping one given explicitly); the others are returned as they are and
    bounded by :meth:`clip` instead.
    """
    del max_scale
    return self

  def top_eigen(self, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(λ, ∂λ/∂m)``: ``λ = λ_max(MᵀM)`` of the raw ``M`` (no FOP-norm, no guard) and its gradient.

    Where ``λ_max`` is not simple the gradient is a subgradient. Used by the
    time-dependent normalisation of :func:`fop_optax.scale_by_fop`'s ``gamma``.
    """
    lam = jnp.max(jnp.square(m))
    return lam, jax.grad(lambda x: jnp.max(jnp.square(x)))(m)

  def max_eigenvalue(self, m: jax.Array) -> jax.Array:
    """``λ_max`` of the ``P`` this structure applies (after FOP-norm and the guard)."""
    return jnp.max(jnp.square(m)) if m.ndim else jnp.square(m)

  def layout(self, shape: Shape) -> Layout:
    """How this structure reads a leaf of ``shape``: its axes, ``P``'s shape and ``m``'s size."""
    return Layout((), (), tuple(range(len(shape))), None, _state_floats(self, shape))


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

  def max_eigenvalue(self, m):
    return jnp.ones((), m.dtype)

  def top_eigen(self, m):
    return jnp.ones((), m.dtype), jnp.zeros_like(m)

  def layout(self, shape):
    return Layout((), (), tuple(range(len(shape))), None, 0)   # m: a scalar placeholder


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

  def layout(self, shape):
    return Layout((), (), tuple(range(len(shape))), (), 1)

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

  def layout(self, shape):
    return Layout((), (), tuple(range(len(shape))), tuple(shape), math.prod(shape))

  clip = Scalar.clip


@dataclasses.dataclass(frozen=True)
class Full(Structure):
  """A dense learned ``M`` (a×a) acting on the rows of the leaf's matrix view.

  Attributes:
    row_axes: how many leading axes form the rows; 1 gives ``a = in`` for a
      dense kernel ``(in, out)``, and ``a = n`` (one column) for a vector.
    normalize: FOP-norm: use ``P/‖P‖₂`` instead of ``P``.
    max_scale: the guard ``B``: ``P``'s eigenvalues above ``B`` are clipped to
      ``B`` where it is applied (``P̃ = Q min(Λ, B) Qᵀ``; the hypergradient is
      that of ``P̃``, exactly). ``None``: unbounded. Set from
      :func:`fop_optax.scale_by_fop`'s ``max_scale`` unless given here.
  """

  name: ClassVar[str] = 'full'
  row_axes: int = 1
  normalize: bool = False
  max_scale: float | None = None

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
    if m.shape[0] == 0:   # a zero-size leaf: nothing to normalise or clip
      return p
    if self.normalize:
      return p / _linalg.eigvalsh(p)[-1]
    if self.max_scale is None:
      return p
    return _spectral_clip(p, self.max_scale)

  def precondition(self, m, g):
    # One product per leaf: P (a×a) is formed first (a ≤ max_full_dim, or k²).
    out = _apply_left(self._p(m), g.astype(m.dtype), self._row_axes(g.shape))
    return out.astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    # One product per leaf for C = G_t G_pᵀ; the rest is a×a.
    c = _gram(g.astype(m.dtype), g_prev.astype(m.dtype), self._row_axes(g.shape))
    if self.normalize and m.shape[0] > 0:
      # P̃ = P/λ, λ = λ_max(P) = vᵀPv with ∂λ/∂M = 2 M v vᵀ (v its unit
      # eigenvector; a subgradient where λ_max is not simple), so
      # ∂J/∂M = −(η/λ) [M(C + Cᵀ) − (2/λ)⟨C, P⟩ M v vᵀ].
      p = m.T @ m
      lam, v = _top_eigenpair(p)
      grad = (m @ (c + c.T) - (2 * jnp.vdot(c, p) / lam) * jnp.outer(m @ v, v)) / lam
    elif self.max_scale is not None and m.shape[0] > 0:
      # P̃ = f(P) with f = min(·, B) on the eigenvalues: ∂⟨C, f(P)⟩/∂P = Z =
      # Q (L ∘ QᵀCQ) Qᵀ with L the divided differences of f (Daleckii–Krein), so
      # ∂J/∂M = −η M (Z + Zᵀ); Z = C when no eigenvalue exceeds B.
      z = _clipped_derivative(m.T @ m, c, self.max_scale)
      grad = m @ (z + z.T)
    else:
      grad = m @ (c + c.T)
    return -learning_rate * grad

  def matrix(self, m, shape):
    del shape
    return self._p(m)

  def max_eigenvalue(self, m):
    if m.shape[0] == 0:
      return jnp.ones((), m.dtype)
    return _linalg.eigvalsh(self._p(m))[-1]

  def top_eigen(self, m):
    if m.shape[0] == 0:
      return jnp.ones((), m.dtype), jnp.zeros_like(m)
    lam, v = _top_eigenpair(m.T @ m)   # ∂(vᵀMᵀMv)/∂M = 2 M v vᵀ
    return lam, 2 * jnp.outer(m @ v, v)

  def hyper_step_scale(self, shape):
    # ‖ΔM‖₂ ≤ lr·a for Adam's sign-like steps; the paper's 3×3 kernels have a = 9.
    return min(1.0, REFERENCE_ROWS / max(_rows(shape, self._row_axes(shape)), 1))

  def with_bound(self, max_scale):
    return dataclasses.replace(self, max_scale=max_scale) if self.max_scale is None else self

  def layout(self, shape):
    k = self._row_axes(tuple(shape))
    a = _rows(shape, k)
    return Layout(tuple(range(k)), (), tuple(range(k, len(shape))), (a, a), a * a)

  def clip(self, m, max_scale):
    # Projected hypergradient descent: M's singular values are clipped at √B
    # (M ← M Q diag(min(1, √(B/λ))) Qᵀ for MᵀM = QΛQᵀ), so P = MᵀM keeps its
    # eigenvectors and every eigenvalue below B, and a direction at the bound can
    # come back down. FOP-norm's P̃ = P/λ_max is scale-invariant: there M is only
    # rescaled as a whole to keep λ_max(MᵀM) ≤ B, leaving P̃ unchanged.
    if m.shape[0] == 0:
      return m
    p = m.T @ m
    bound = jnp.asarray(max_scale, p.dtype)

    def project(p):
      lam, q = _linalg.eigh(p)
      if self.normalize:
        return jnp.eye(p.shape[0], dtype=p.dtype) * jnp.sqrt(bound / lam[-1])
      return (q * jnp.sqrt(jnp.minimum(1.0, bound / jnp.maximum(lam, bound)))) @ q.T

    return m @ jax.lax.cond(_exceeds(p, bound), project,
                            lambda p: jnp.eye(p.shape[0], dtype=p.dtype), p).astype(m.dtype)


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

  def __repr__(self):
    return (f'Spatial(rows=taps (all but the last two axes), normalize={self.normalize}, '
            f'max_scale={self.max_scale})')

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
    max_scale: the guard, as for :class:`Full` (``P``'s eigenvalues in
      ``span(U, V)`` above ``B`` clipped; ``P = I`` elsewhere).
  """

  name: ClassVar[str] = 'low_rank'
  rank: int = 8
  row_axes: int = 1
  normalize: bool = False
  max_scale: float | None = None

  def validate(self, shape):
    if self.rank < 1:
      raise ValueError(f'low_rank needs rank >= 1, got {self.rank}')
    if not 1 <= self.row_axes <= len(shape):
      raise ValueError(
          f'{self!r} needs a leaf with at least {self.row_axes} axes, got shape {shape}')

  def init(self, shape, dtype, key):
    a = _rows(shape, self.row_axes)
    r = min(self.rank, a)
    # Gram–Schmidt rather than jnp.linalg.qr: under jax.vmap (one optimiser state per
    # seed) a batched LAPACK QR can deadlock XLA:CPU's thread pool (jax 0.10, 2 cores:
    # its workers wait in ParallelBatchMap for tasks queued behind themselves).
    u = _orthonormal_columns(jax.random.normal(key, (a, r), jnp.float32))
    return jnp.stack([u, jnp.zeros_like(u)]).astype(dtype)

  @staticmethod
  def _m(m, x):   # M·x
    return x + m[0] @ (m[1].T @ x)

  @staticmethod
  def _basis(m):
    """``(Q, T)``: an orthonormal basis ``Q`` (a×k) of a space holding ``span(U, V)``, ``T = Qᵀ[U, V]``.

    ``span(U, V)`` is invariant under ``P = MᵀM`` and ``P = I`` on its complement,
    so ``P``'s eigenpairs other than 1 are those of ``Qᵀ P Q`` (k×k), with
    eigenvectors ``Q·y``. ``Q`` is the Householder QR (LAPACK) of ``[U, V]`` with
    unit-norm columns (``M`` only depends on ``UVᵀ``, so ``U`` and ``V`` can differ in
    scale by orders of magnitude): orthonormal to rounding and spanning every column
    to rounding, also where ``[U, V]`` is rank-deficient (``V = 0`` at the start, or
    of rank one after Adam's sign-like first steps), where its extra columns are
    directions with ``P = I``. ``[U, V] = Q T`` with ``T = R·diag(‖column‖)``, so every
    other small matrix of the guard comes from ``T`` without another pass over the
    (a×2r) factors. ``k = 2r``, or ``Q = I`` (``k = a``) when ``2r ≥ a``.
    (CGS2 in a ``fori_loop`` took 0.5–1 ms for a 1024×16 matrix on XLA:CPU, where
    each iteration's small products pay a fixed cost; the QR takes 0.15–0.3 ms.)
    """
    b = jnp.concatenate([m[0], m[1]], axis=1)
    if b.shape[1] >= b.shape[0]:   # span(U, V) may be everything: take Q = I
      return jnp.eye(b.shape[0], dtype=m.dtype), b
    d = jnp.sqrt(jnp.sum(jnp.square(b), axis=0))
    q, r = _linalg.qr(b / jnp.where(d > 0, d, 1.0))
    return q, r * d

  @staticmethod
  def _core(t, c=1.0):
    """``A = Qᵀ(P − I)Q = c(T_U T_Vᵀ + T_V T_Uᵀ) + c² T_V (UᵀU) T_Vᵀ`` for ``M = I + c·UVᵀ``.

    ``P − I = UVᵀ + VUᵀ + V(UᵀU)Vᵀ`` with ``[U, V] = Q T``; ``UᵀU = T_Uᵀ T_U``. Formed
    without the ``I`` it is added to, so small eigenvalues keep their precision.
    """
    r = t.shape[1] // 2
    tu, tv = t[:, :r], t[:, r:]
    cross = c * (tu @ tv.T)
    a = cross + cross.T + (c * c) * (tv @ ((tu.T @ tu) @ tv.T))
    return 0.5 * (a + a.T)

  def _span(self, m):
    """``(Q, T, μ, W)``: ``P = I + Q (W diag(μ) Wᵀ) Qᵀ`` with ``Q, T`` from :meth:`_basis`.

    ``μ`` (ascending) and ``W`` are the eigenpairs of :meth:`_core`; ``P``'s
    eigenvalues on ``span(Q)`` are ``1 + μ`` with eigenvectors ``Φ = Q W``.
    """
    q, t = self._basis(m)
    mu, w = _linalg.eigh(self._core(t))
    return q, t, mu, w

  def _eigen(self, m):
    """``(λ, Φ)``: ``P``'s eigenvalues on ``span(Q)`` (ascending) and unit eigenvectors (a×k)."""
    q, _, mu, w = self._span(m)
    return 1 + mu, q @ w

  def _top(self, m):
    """``(λ_max(P), v)``: ``v`` its unit eigenvector in ``span(U, V)``, or 0 where ``λ_max = 1``.

    ``λ_max = max(λ_span)``, and at least 1 whenever ``a > 2r`` (``P = I`` on the complement).
    """
    if self._empty(m):
      return jnp.ones((), m.dtype), jnp.zeros(m.shape[1], m.dtype)
    lam, phi = self._eigen(m)
    has_complement = phi.shape[0] > phi.shape[1]
    grows = lam[-1] > 1 if has_complement else jnp.array(True)
    top = jnp.maximum(lam[-1], 1.0) if has_complement else lam[-1]
    return top, jnp.where(grows, phi[:, -1], jnp.zeros_like(phi[:, -1]))

  def _scale(self, m):
    """``(s, λ, v)``: ``P̃ = s·P`` (``s = 1/λ_max`` with normalize, else 1)."""
    if not self.normalize:
      return 1.0, None, None
    lam, v = self._top(m)
    return 1.0 / lam, lam, v

  def _clipped_core(self, mu, w):
    """``W diag(min(μ, B − 1)) Wᵀ``: the guard's ``P̃ = I + Q (·) Qᵀ``, ``λ(P̃) = min(λ(P), B)``."""
    return (w * jnp.minimum(mu, self.max_scale - 1)) @ w.T

  @property
  def _clips(self):
    return self.max_scale is not None and not self.normalize

  @staticmethod
  def _empty(m):
    return m.shape[1] == 0 or m.shape[2] == 0   # a zero-size leaf

  @staticmethod
  def _factors(m):
    """``L = [U, V]`` and ``R = [V, MᵀU]`` (a×2r) with ``P = I + L Rᵀ``.

    ``MᵀM = (I + VUᵀ)(I + UVᵀ) = I + UVᵀ + V(U + VUᵀU)ᵀ`` and ``MᵀU = U + V(UᵀU)``.
    """
    u, v = m[0], m[1]
    mtu = u + v @ (u.T @ u)
    return jnp.concatenate([u, v], axis=1), jnp.concatenate([v, mtu], axis=1)

  def precondition(self, m, g):
    x = g.astype(m.dtype)
    rows = self.row_axes
    if self._clips and not self._empty(m):
      q, _, mu, w = self._span(m)
      return self._clipped_apply(q, mu, w, g)
    s, _, _ = self._scale(m)
    left, right = self._factors(m)
    # P·G = G + L (Rᵀ G): two (a×2r)-wide products, each one pass over G.
    out = s * (x + _expand_rows(left, _contract_rows(right, x, rows), x, rows))
    return out.astype(g.dtype)

  def _clipped_apply(self, q, mu, w, g):
    """``P̃·G = G + Q (W min(μ, B − 1) Wᵀ)(QᵀG)``: the same two passes over ``G`` as ``P·G``.

    ``λ_max(P̃) ≤ B`` by construction (``Q`` orthonormal), whatever the rounding in ``Q``.
    """
    x = g.astype(q.dtype)
    z = jnp.tensordot(self._clipped_core(mu, w), _contract_rows(q, x, self.row_axes), 1)
    return (x + _expand_rows(q, z, x, self.row_axes)).astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    gt, gp = g.astype(m.dtype), g_prev.astype(m.dtype)
    rows = self.row_axes
    u, v = m[0], m[1]
    # With H = ∂J/∂M = −η M S, S = G_t G_pᵀ + G_p G_tᵀ (never formed):
    # ∂J/∂U = H V = −η M (S V) and ∂J/∂V = Hᵀ U = −η S (Mᵀ U); with
    # X = [V, MᵀU] both come from S X = G_t (G_pᵀ X) + G_p (G_tᵀ X).
    r = u.shape[1]
    if self._clips and not self._empty(m):
      sx = self._clipped_sx(m, gt, gp)   # takes X̃ = QᵀX from the span basis
    else:
      left, x = self._factors(m)
      xgp = _contract_rows(x, gp, rows)
      sx = _contract_cols(gt, xgp, rows) + _contract_cols(gp, _contract_rows(x, gt, rows), rows)
    du, dv = self._m(m, sx[:, :r]), sx[:, r:]
    s, lam, top = self._scale(m)
    if self.normalize:
      # P̃ = P/λ: H = −(η/λ)[M S − (2/λ)⟨C, P⟩ M v vᵀ] (see Full.hypergradient), with
      # ⟨C, P⟩ = ⟨G_t, P G_p⟩ = ⟨G_t, G_p⟩ + ⟨Lᵀ G_t, Rᵀ G_p⟩; the extra term's
      # U-part is (Mv)(vᵀV) and its V-part v((Mv)ᵀU).
      cp = jnp.vdot(gt, gp) + jnp.vdot(_contract_rows(left, gt, rows), xgp)
      mv = self._m(m, top[:, None])[:, 0]
      du = du - (2 * cp / lam) * jnp.outer(mv, top @ v)
      dv = dv - (2 * cp / lam) * jnp.outer(top, mv @ u)
    return -learning_rate * s * jnp.stack([du, dv])

  def _clipped_sx(self, m, gt, gp):
    """``(Z + Zᵀ) X`` for the guard's ``P̃ = f(P)``, ``f = min(·, B)``, ``Z = ∂⟨C, f(P)⟩/∂P``.

    ``C = G_t G_pᵀ`` (never formed). Daleckii–Krein in ``P``'s eigenbasis
    ``[Φ, Ω]`` (``Φ = QW`` on ``span(Q)``, ``Ω`` the complement where ``P = I``):
    ``Z = C − Δ``, ``Δ = Φ A Φᵀ + Q₁ D Φᵀ + Φ D Q₂ᵀ`` with ``A = (1 − L) ∘ ΦᵀCΦ``
    (``L`` the divided differences of ``f`` on ``1 + μ``), ``D = diag((λ − B)₊/(λ − 1))``
    (one minus the divided difference between ``λ`` and the complement's 1),
    ``Q₁ = (I − ΦΦᵀ) C Φ`` and ``Q₂ = (I − ΦΦᵀ) Cᵀ Φ``. ``X = [V, MᵀU]`` lies in
    ``span(Q)`` (``X = Q X̃``), so ``(I − ΦΦᵀ)X = 0`` and every product with ``G_t``
    or ``G_p`` goes through ``QᵀG_t``, ``QᵀG_p``, ``CQ`` and ``CᵀQ``: four passes, as
    without the guard.
    """
    rows = self.row_axes
    q, t, mu, w = self._span(m)
    lam = 1 + mu
    tt, tp = _contract_rows(q, gt, rows), _contract_rows(q, gp, rows)   # QᵀG_t, QᵀG_p
    cq, ctq = _contract_cols(gt, tp, rows), _contract_cols(gp, tt, rows)   # C Q, Cᵀ Q
    qcq = _pair(tt, tp)                                                    # Qᵀ C Q
    r = t.shape[1] // 2
    tu, tv = t[:, :r], t[:, r:]
    xt = jnp.concatenate([tv, tu + tv @ (tu.T @ tu)], axis=1)              # X̃ = QᵀX
    fx = w.T @ xt                                                          # Φᵀ X
    a = (1 - _divided_differences(lam, self.max_scale)) * (w.T @ qcq @ w)   # on ΦᵀCΦ
    snapped = _snap(lam, self.max_scale)
    d = jnp.where(snapped > self.max_scale,
                  (snapped - self.max_scale) / jnp.where(snapped > 1, snapped - 1, 1.0), 0.0)
    dfx = w @ (d[:, None] * fx)
    # (C + Cᵀ)X − (Δ + Δᵀ)X = (CQ + CᵀQ)(X̃ − W D ΦᵀX) + Q[(QᵀCQ + QᵀCᵀQ) W D ΦᵀX − W (A + Aᵀ) ΦᵀX].
    return (cq + ctq) @ (xt - dfx) + q @ ((qcq + qcq.T) @ dfx - w @ ((a + a.T) @ fx))

  def matrix(self, m, shape):
    mm = self._m(m, jnp.eye(m.shape[1], dtype=m.dtype))
    s, _, _ = self._scale(m)
    p = s * (mm.T @ mm)
    if self._clips and not self._empty(m):
      q, _, mu, w = self._span(m)
      return jnp.eye(q.shape[0], dtype=q.dtype) + q @ self._clipped_core(mu, w) @ q.T
    return p

  def top_eigen(self, m):
    # ∂λ/∂M = 2 M v vᵀ; on U: (2 M v vᵀ) V, on V: (2 M v vᵀ)ᵀ U (v = 0 where λ_max = 1).
    lam, v = self._top(m)
    mv = self._m(m, v[:, None])[:, 0]
    return lam, 2 * jnp.stack([jnp.outer(mv, v @ m[1]), jnp.outer(v, mv @ m[0])])

  def max_eigenvalue(self, m):
    if self.normalize:
      return jnp.ones((), m.dtype)
    top = self._top(m)[0]
    return top if self.max_scale is None else jnp.minimum(top, self.max_scale)

  def layout(self, shape):
    a = _rows(shape, self.row_axes)
    return Layout(tuple(range(self.row_axes)), (), tuple(range(self.row_axes, len(shape))),
                  (a, a), 2 * a * min(self.rank, a))

  def hyper_step_scale(self, shape):
    # ‖Δ(UVᵀ)‖₂ ≤ lr·√(a·r) for Adam's sign-like steps on the (a×r) factors.
    a = _rows(shape, self.row_axes)
    return min(1.0, REFERENCE_ROWS / math.sqrt(max(a * min(self.rank, a), 1)))

  def with_bound(self, max_scale):
    return dataclasses.replace(self, max_scale=max_scale) if self.max_scale is None else self

  def clip(self, m, max_scale):
    # The applied P is clipped at B (precondition); this keeps the raw M = I + UVᵀ
    # within λ_max(MᵀM) ≤ 2B, so that clipping stays accurate in float32 and an
    # adaptive hyper-optimiser cannot drift UVᵀ far into the clipped region
    # (clipping M's singular values exactly is not possible in rank r).
    if self._empty(m):
      return m
    return jnp.stack([m[0], self._shrink(self._basis(m)[1], max_scale) * m[1]])

  def clip_and_precondition(self, m, max_scale, g):
    if self._empty(m) or not self._clips:
      return super().clip_and_precondition(m, max_scale, g)
    # One basis for both: shrinking V to c·V leaves span(U, V), and so Q, as it is.
    q, t = self._basis(m)
    c = self._shrink(t, max_scale)
    mu, w = _linalg.eigh(self._core(t, c))
    return jnp.stack([m[0], c * m[1]]), self._clipped_apply(q, mu, w, g)

  def _shrink(self, t, max_scale):
    """The largest ``c ∈ [0, 1]`` with ``λ_max(M(c)ᵀM(c)) ≤ 2B`` for ``M(c) = I + c·UVᵀ`` (1 within it).

    ``‖M(c)‖₂²`` is convex in ``c`` with value 1 at ``c = 0``, so such ``c`` form an
    interval ``[0, c*]`` and bisection (``_BISECTION_STEPS``) keeps its feasible end.
    """
    bound = _STATE_BOUND_FACTOR * jnp.asarray(max_scale, t.dtype)

    def lam(c):   # λ_max(M(c)ᵀM(c)) on span(Q); 1 on the complement
      return 1 + _linalg.eigvalsh(self._core(t, c))[-1]

    def shrink(_):
      def body(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        ok = lam(mid) <= bound
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
      lo, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, body,
                                (jnp.zeros((), t.dtype), jnp.ones((), t.dtype)))
      return lo

    return jax.lax.cond(lam(jnp.ones((), t.dtype)) > bound, shrink,
                        lambda _: jnp.ones((), t.dtype), None)


def _batched(fn: Callable, n: int, in_axes) -> Callable:
  """``fn`` vmapped ``n`` times over the leading axis of the arguments ``in_axes`` marks 0."""
  for _ in range(n):
    fn = jax.vmap(fn, in_axes=in_axes)
  return fn


@dataclasses.dataclass(frozen=True)
class WithDimensions(Structure):
  """A structure applied along explicit dimension numbers (:class:`FopDimensionNumbers`).

  The leaf's axes are moved to ``(*batch, *rows, *columns)`` (a transpose, no
  reshape), ``inner`` is applied to each batch index's slice with its rows set
  to ``len(dims.rows)`` (``Full``/``LowRank`` get ``row_axes = len(rows)``;
  ``Spatial``, which is ``Full`` over all but the last two axes, becomes that
  ``Full``), through ``jax.vmap`` over the batch axes, and the result is moved
  back. ``m`` is the inner ``m`` with leading batch dimensions, so a scanned
  ``(L, in, out)`` kernel with ``rows=1, batch=0`` has ``L`` independent
  ``in×in`` matrices and no ``P`` mixes two layers.

  Every method of :class:`Structure` is the inner one's, per batch index:
  ``matrix`` returns ``(*batch, a, a)``; ``max_eigenvalue`` and ``top_eigen``
  report the largest over the batch (the spectral norm of the block-diagonal
  ``P`` of the whole leaf; ``top_eigen``'s gradient is nonzero on that block
  only); ``hyper_step_scale`` is the inner one's for one slice.

  Attributes:
    inner: the structure of each slice (a :class:`Structure`).
    dims: the :class:`FopDimensionNumbers`.
  """

  name: ClassVar[str] = 'with_dimensions'
  inner: Structure = dataclasses.field(default_factory=lambda: Full())
  dims: FopDimensionNumbers = FopDimensionNumbers()

  def __post_init__(self):
    if not isinstance(self.inner, Structure):
      raise TypeError(f'WithDimensions needs a Structure as inner, got {self.inner!r}')
    if isinstance(self.inner, WithDimensions):
      raise TypeError('WithDimensions cannot wrap another WithDimensions')
    dims = self.dims
    if not isinstance(dims, FopDimensionNumbers):
      dims = FopDimensionNumbers(*dims)
    # Hashable and comparable: tuples of ints.
    object.__setattr__(self, 'dims', FopDimensionNumbers(_axes(dims.rows), _axes(dims.batch)))

  @property
  def max_scale(self) -> float | None:
    """The inner structure's guard (read by :func:`fop_optax.scale_by_fop`)."""
    return getattr(self.inner, 'max_scale', None)

  @property
  def normalize(self) -> bool:
    return getattr(self.inner, 'normalize', False)

  def _split(self, shape: Shape):
    """``(rows, batch, columns, perm, inner, inner_shape, batch_shape)`` for a leaf of ``shape``."""
    rows, batch, columns = normalize_dimensions(self.dims, len(shape))
    perm = batch + rows + columns
    inner = self.inner
    if isinstance(inner, Spatial):
      inner = Full(row_axes=len(rows), normalize=inner.normalize, max_scale=inner.max_scale)
    elif isinstance(inner, (Full, LowRank)):
      inner = dataclasses.replace(inner, row_axes=len(rows))
    inner_shape = tuple(shape[ax] for ax in rows + columns)
    batch_shape = tuple(shape[ax] for ax in batch)
    return rows, batch, columns, perm, inner, inner_shape, batch_shape

  def _to_inner(self, x, perm):
    return jnp.transpose(x, perm)

  @staticmethod
  def _from_inner(x, perm):
    return jnp.transpose(x, tuple(int(i) for i in _inverse(perm)))

  def validate(self, shape):
    rows, batch, columns, _, inner, inner_shape, _ = self._split(tuple(shape))
    if not rows and isinstance(inner, (Full, LowRank)):
      raise ValueError(f'{self!r}: a matrix structure needs at least one row axis')
    inner.validate(inner_shape)

  def init(self, shape, dtype, key):
    _, batch, _, _, inner, inner_shape, batch_shape = self._split(tuple(shape))
    keys = jax.random.split(key, max(math.prod(batch_shape), 1))[:math.prod(batch_shape)]
    keys = keys.reshape(batch_shape) if batch else key
    return _batched(lambda k: inner.init(inner_shape, dtype, k), len(batch), 0)(keys)

  def precondition(self, m, g):
    _, batch, _, perm, inner, _, _ = self._split(g.shape)
    out = _batched(inner.precondition, len(batch), 0)(m, self._to_inner(g, perm))
    return self._from_inner(out, perm)

  def hypergradient(self, m, g, g_prev, learning_rate):
    _, batch, _, perm, inner, _, _ = self._split(g.shape)
    fn = _batched(inner.hypergradient, len(batch), (0, 0, 0, None))
    return fn(m, self._to_inner(g, perm), self._to_inner(g_prev, perm), learning_rate)

  def matrix(self, m, shape):
    _, batch, _, perm, inner, inner_shape, batch_shape = self._split(tuple(shape))
    out = _batched(lambda x: inner.matrix(x, inner_shape), len(batch), 0)(m)
    if out.shape == batch_shape + inner_shape:   # elementwise (diagonal, scalar): leaf layout
      return self._from_inner(out, perm)
    return out

  def clip(self, m, max_scale):
    # The inner structure's projection per slice (shape-free for every built-in one).
    inner = self._split_m(m)
    return _batched(lambda x: inner.clip(x, max_scale), len(self.dims.batch), 0)(m)

  def clip_and_precondition(self, m, max_scale, g):
    _, batch, _, perm, inner, _, _ = self._split(g.shape)
    fn = _batched(lambda x, y: inner.clip_and_precondition(x, max_scale, y), len(batch), 0)
    m, out = fn(m, self._to_inner(g, perm))
    return m, self._from_inner(out, perm)

  def _split_m(self, m):
    """The inner structure for the shape-free methods (its rows only matter through ``m``)."""
    inner = self.inner
    if isinstance(inner, Spatial):
      return Full(row_axes=max(len(self.dims.rows), 1), normalize=inner.normalize,
                  max_scale=inner.max_scale)
    if isinstance(inner, (Full, LowRank)):
      return dataclasses.replace(inner, row_axes=max(len(self.dims.rows), 1))
    return inner

  def with_bound(self, max_scale):
    return dataclasses.replace(self, inner=self.inner.with_bound(max_scale))

  def top_eigen(self, m):
    n = len(self.dims.batch)
    lam, dlam = _batched(self._split_m(m).top_eigen, n, 0)(m)
    if not n:
      return lam, dlam
    flat = lam.reshape(-1)
    top = jnp.argmax(flat)
    mask = (jnp.arange(flat.shape[0]) == top).reshape(lam.shape)
    return flat[top], dlam * mask.reshape(lam.shape + (1,) * (dlam.ndim - lam.ndim))

  def max_eigenvalue(self, m):
    n = len(self.dims.batch)
    return jnp.max(_batched(self._split_m(m).max_eigenvalue, n, 0)(m))

  def hyper_step_scale(self, shape):
    _, _, _, _, inner, inner_shape, _ = self._split(tuple(shape))
    return inner.hyper_step_scale(inner_shape)

  def layout(self, shape):
    rows, batch, columns, _, inner, inner_shape, batch_shape = self._split(tuple(shape))
    inner_layout = inner.layout(inner_shape)
    matrix = None if inner_layout.matrix is None else batch_shape + inner_layout.matrix
    return Layout(rows, batch, columns, matrix, math.prod(batch_shape) * inner_layout.floats)


def _inverse(perm: Sequence[int]) -> list[int]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return inv


def with_dimensions(inner: Structure, dims: FopDimensionNumbers | None) -> Structure:
  """``inner`` along ``dims``; ``inner`` itself where no wrapper is needed.

  ``NoPreconditioner`` and ``dims = None`` return ``inner``; so do rows that are
  the leading axes with no batch axis for ``Full``/``LowRank`` (then
  ``row_axes = len(rows)`` is the same view).
  """
  if dims is None or isinstance(inner, NoPreconditioner):
    return inner
  rows, batch = _axes(dims.rows), _axes(dims.batch)
  if (not batch and rows and rows == tuple(range(len(rows)))
      and type(inner) in (Full, LowRank)):
    return dataclasses.replace(inner, row_axes=len(rows))
  return WithDimensions(inner, FopDimensionNumbers(rows, batch))


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


# Low rank keeps its raw M within λ_max(MᵀM) ≤ 2B (LowRank.clip), found by bisection to 2⁻¹⁶.
_STATE_BOUND_FACTOR = 2.0
# Eigenvalues within this relative distance of the bound count as at the bound (rounding).
_KINK_RTOL = 1e-5
_BISECTION_STEPS = 16


def _orthonormal_columns(b):
  """Classical Gram–Schmidt, twice per column (CGS2): orthonormal ``Q``, ``span(Q) ⊇ span(b)`` to ``√ε``.

  A column whose remainder after the first pass is below ``√ε`` of its norm (ε the
  dtype's precision) is numerically in the span of the columns before it and is
  left zero: its remainder is rounding noise, and normalising noise (say for the
  seven dependent columns of ``[U, V]`` when Adam's sign-like steps give ``V``
  rank one) leaves ``Q`` far from orthonormal (off-diagonals of ``QᵀQ`` up to 0.6
  measured in float32). Dropping it moves ``span(Q)`` by at most ``√ε`` relative.
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
  return jax.lax.cond(_exceeds(p, bound), clip, lambda p: p, p)


def _clipped_derivative(p, c, bound):
  """``∂⟨C, f(P)⟩/∂P = Q (L ∘ QᵀCQ) Qᵀ`` for ``f = min(·, bound)``; ``C`` when nothing is clipped."""
  def clipped(pc):
    p, c = pc
    lam, q = _linalg.eigh(p)
    return q @ (_divided_differences(lam, bound) * (q.T @ c @ q)) @ q.T
  return jax.lax.cond(_exceeds(p, bound), clipped, lambda pc: pc[1], (p, c))


_BY_NAME: dict[str, Callable[[], Structure]] = {
    'none': NoPreconditioner, 'scalar': Scalar, 'diagonal': Diagonal,
    'full': Full, 'spatial': Spatial, 'low_rank': LowRank,
}
STRUCTURE_NAMES: tuple[str, ...] = ('auto',) + tuple(_BY_NAME)


# Rows up to which the default rule takes a full M: the measured step-cost crossover with
# rank-8 low rank (docs/benchmarks.md §6: full 1.62/2.08/2.30/4.84 x momentum at 16/32/64/128
# rows, low rank 1.85/2.29/1.74/2.05), at equal accuracy on digits.
DEFAULT_MAX_FULL_DIM = 32
# The guard's default bound on λ_max(P): FOP never lengthens the base step along any
# direction (measured in docs/stability.md: larger bounds degrade or wreck long runs).
DEFAULT_MAX_SCALE = 1.0
# Rows of the matrices the paper's hyper learning rate was tuned on (3×3 spatial).
REFERENCE_ROWS = 9
DEFAULT_RANK = 8
# Most kernel taps (product of the axes before (in, out)) read as a convolution.
MAX_SPATIAL_TAPS = 64

# What the default rule can tell a leaf is (see the module docstring).
ROLES: tuple[str, ...] = (
    'other', 'norm_or_bias', 'embedding', 'attention_input', 'attention_output', 'ambiguous')
# Path elements under which a rank >= 3 leaf's leading axes are likely heads, a K/V stack
# or scanned layers rather than conv taps (see ``leaf_role``): attention-like nodes ...
_ATTENTION_LIKE_SUFFIXES = ('attn', 'attention', 'einsum')
# ... and stacked-layer nodes (without an integer index below them: ``layers/0/...`` is a
# list of separate layers, ``layers/...`` one stacked by ``nnx.scan``/``nnx.vmap``).
_STACK_NAMES = ('layers', 'scan', 'stack', 'blocks')
_NORM_OR_BIAS_NAMES = ('bias', 'scale')
_ATTENTION_INPUTS = ('query', 'key', 'value')
_ATTENTION_OUTPUT = 'out'
# Attributes through which a Flax NNX Variable exposes its array in a key path.
_VARIABLE_ATTRS = ('value', 'raw_value')


def leaf_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names along a JAX key path, as strings.

  Dict keys, attribute names and sequence indices are kept in order; a
  trailing attribute ``.value`` (how a Flax NNX ``Variable`` exposes its array)
  is dropped, so that ``nnx.State`` trees and their pure-dict forms give the
  same names (``('attn', 'value', 'kernel')`` in both).
  """
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in _VARIABLE_ATTRS:
    names.pop()
  return tuple(names)


def find_attention_blocks(params_or_names: Any) -> set[tuple[str, ...]]:
  """The attention blocks of a tree: paths of nodes with children ``query``, ``key``, ``value``, ``out``.

  Args:
    params_or_names: a parameters tree, or a sequence of leaf paths as tuples
      of names (:func:`leaf_names`).
  """
  if (isinstance(params_or_names, (list, tuple, set, frozenset))
      and all(isinstance(n, tuple) and all(isinstance(x, str) for x in n)
              for n in params_or_names)):
    all_names = list(params_or_names)
  else:
    all_names = [leaf_names(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(params_or_names)[0]]
  return _attention_blocks(all_names)


def _attention_blocks(all_names: Sequence[tuple[str, ...]]) -> set[tuple[str, ...]]:
  """Prefixes with children named ``query``, ``key``, ``value`` and ``out``."""
  children: dict[tuple[str, ...], set[str]] = {}
  for names in all_names:
    for i in range(len(names)):
      children.setdefault(names[:i], set()).add(names[i])
  wanted = set(_ATTENTION_INPUTS) | {_ATTENTION_OUTPUT}
  return {prefix for prefix, kids in children.items() if wanted <= kids}


def suspect_node(names: Sequence[str]) -> str | None:
  """The path element that makes a leaf's leading axes ambiguous, or ``None``.

  An attention-like element (``attn``/``attention`` or a name ending in
  ``attn``, ``attention`` or ``einsum``, e.g. ``self_attn``, ``q_einsum``,
  also the leaf's own name, e.g. Gemma's stacked ``gating_einsum``
  ``(2, features, hidden)``) or a stacked-layers node above the leaf (an
  element ``layers``, ``scan``, ``stack`` or ``blocks`` with no integer index
  after it in the path).
  """
  names = tuple(names)
  for element in names:
    if element.lower().endswith(_ATTENTION_LIKE_SUFFIXES):
      return element
  parents = names[:-1]
  for i, element in enumerate(parents):
    if element.lower() in _STACK_NAMES and not any(p.isdigit() for p in parents[i + 1:]):
      return element
  return None


def leaf_role(names: Sequence[str],
              attention_blocks: Collection[tuple[str, ...]] | None = None, *,
              shape: Shape | None = None, params: Any = None) -> str:
  """What the default rule takes a leaf to be, from its names (one of ``ROLES``).

  Args:
    names: the leaf's path as strings (:func:`leaf_names`), or a JAX key path.
    attention_blocks: the paths (tuples of names) of the tree's attention
      blocks, nodes with children ``query``, ``key``, ``value`` and ``out``.
      ``None`` (default): found in ``params`` (:func:`find_attention_blocks`)
      when given, else none.
    shape: the leaf's shape; needed for ``'ambiguous'`` (rank >= 3).
    params: the whole parameters tree, to find the attention blocks in.

  Returns:
    ``'norm_or_bias'`` for a leaf named ``bias`` or ``scale``; ``'embedding'``
    for a name ending in ``embedding``; ``'attention_input'`` /
    ``'attention_output'`` for the ``kernel`` of an attention block's
    ``query``/``key``/``value`` / ``out``; ``'ambiguous'`` for any other leaf
    of rank >= 3 under an attention-like or stacked-layers node
    (:func:`suspect_node`): its leading axes may be heads, a K/V stack or
    scanned layers, which the shape rule would read as conv taps;
    ``'other'`` otherwise.
  """
  names = tuple(names)
  if names and not all(isinstance(n, str) for n in names):
    names = leaf_names(names)
  if attention_blocks is None:
    attention_blocks = find_attention_blocks(params) if params is not None else frozenset()
  if not names:
    return 'other'
  name = names[-1]
  if name in _NORM_OR_BIAS_NAMES:
    return 'norm_or_bias'
  if name.lower().endswith('embedding'):
    return 'embedding'
  if name == 'kernel' and len(names) >= 2 and names[:-2] in attention_blocks:
    if names[-2] in _ATTENTION_INPUTS:
      return 'attention_input'
    if names[-2] == _ATTENTION_OUTPUT:
      return 'attention_output'
  if shape is not None and len(shape) >= 3 and suspect_node(names) is not None:
    return 'ambiguous'
  return 'other'


def _dense(shape: Shape, row_axes: int, max_full_dim: int, rank: int,
           normalize: bool) -> Structure:
  """``full`` over the first ``row_axes`` axes if they are small, else ``low_rank``."""
  if _rows(shape, row_axes) <= max_full_dim:
    return Full(row_axes=row_axes, normalize=normalize)
  return LowRank(rank=rank, row_axes=row_axes, normalize=normalize)


def default_structure(shape: Shape, role: str = 'other', *, max_full_dim: int | None = None,
                      rank: int | None = None, normalize: bool = False) -> Structure:
  """The default rule: see the module docstring (``None`` means the default value).

  Args:
    shape: the leaf's shape.
    role: what the leaf is, one of ``ROLES`` (:func:`leaf_role`); ``'other'``
      (the default) applies the shape-only rule.
    max_full_dim: largest row count that gets a dense ``M`` (default 32: above it
      low rank is the cheaper step on CPU, docs/benchmarks.md §6).
    rank: rank of ``low_rank`` (default 8).
    normalize: FOP-norm for the structure chosen.
  """
  if role not in ROLES:
    raise ValueError(f'unknown leaf role {role!r}; expected one of {ROLES}')
  max_full_dim = DEFAULT_MAX_FULL_DIM if max_full_dim is None else max_full_dim
  rank = DEFAULT_RANK if rank is None else rank
  ndim = len(shape)
  if ndim <= 1 or math.prod(shape) == 0 or role in ('norm_or_bias', 'embedding', 'ambiguous'):
    return NoPreconditioner()
  dense = lambda row_axes: _dense(shape, row_axes, max_full_dim, rank, normalize)
  if role == 'attention_input':
    return dense(1)
  if role == 'attention_output':
    return dense(ndim - 1)
  if ndim == 2:
    return dense(1)
  if _rows(shape, ndim - 2) <= MAX_SPATIAL_TAPS:
    return Spatial(normalize=normalize)
  return dense(ndim - 2)


def as_structure(spec: Any, shape: Shape, role: str = 'other', **rule_kwargs) -> Structure:
  """Turns a label (``'auto'``, ``'full'``, ...) or a :class:`Structure` into one.

  ``role`` (see :func:`leaf_role`) only informs ``'auto'``; the other labels
  mean the same structure for every leaf (``full`` and ``low_rank`` over the
  first axis), as do :class:`Structure` instances.
  """
  if isinstance(spec, Structure):
    return spec
  if isinstance(spec, FopDimensionNumbers):
    # Dense over the given rows (full up to max_full_dim rows, else low rank), per batch index.
    rows, _, _ = normalize_dimensions(spec, len(shape))
    a = math.prod(shape[ax] for ax in rows)
    max_full_dim = rule_kwargs.get('max_full_dim')
    max_full_dim = DEFAULT_MAX_FULL_DIM if max_full_dim is None else max_full_dim
    rank = rule_kwargs.get('rank')
    rank = DEFAULT_RANK if rank is None else rank
    normalize = rule_kwargs.get('normalize', False)
    inner = (Full(normalize=normalize) if a <= max_full_dim
             else LowRank(rank=rank, normalize=normalize))
    return with_dimensions(inner, spec)
  if isinstance(spec, str):
    if spec == 'auto':
      return default_structure(shape, role, **rule_kwargs)
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


def resolve_structures(params: Any, structures: Any = None, *,
                       max_scale: float | None = DEFAULT_MAX_SCALE, **rule_kwargs) -> Any:
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
    max_scale: the guard's bound ``B`` on ``λ_max(P)`` (default 1), given to
      every structure that applies it (:meth:`Structure.with_bound`); ``None``
      for none. Pass the same value as to :func:`fop_optax.scale_by_fop` when
      reading its state (the diagnostics do).
    **rule_kwargs: ``max_full_dim``, ``rank``, ``normalize`` for the default
      rule and for labels.

  The default rule (``None`` or ``'auto'``) reads each leaf's path (Flax NNX
  names such as ``embedding``, ``bias``, ``scale``, an attention block's
  ``query``/``key``/``value``/``out`` ``kernel``) as well as its shape; see
  the module docstring. Leaves without such names get the shape-only rule.

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

  is_spec = lambda x: isinstance(x, (Structure, str, FopDimensionNumbers))
  try:
    # Broadcast the (prefix) tree of labels to one label per parameter leaf.
    specs = jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: spec, sub),
                         structures, params, is_leaf=is_spec)
  except ValueError as e:
    raise ValueError(
        'the tree of FOP structures must be a prefix of the parameters tree; '
        f'got structures {jax.tree.structure(structures, is_leaf=is_spec)} for '
        f'parameters {jax.tree.structure(params)}') from e

  # The rule reads each leaf's names; an attention block is recognised from
  # its children, so the whole tree's names are collected first.
  names = {path: leaf_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  blocks = _attention_blocks(list(names.values()))
  ambiguous = []

  def one(path, leaf, spec):
    check_leaf_dtype(path, leaf)
    role = leaf_role(names[path], blocks, shape=tuple(leaf.shape))
    if role == 'ambiguous' and isinstance(spec, str) and spec == 'auto':
      ambiguous.append(f"{'/'.join(names[path])} {tuple(leaf.shape)}")
    structure = as_structure(spec, tuple(leaf.shape), role, **rule_kwargs).with_bound(max_scale)
    try:
      structure.validate(tuple(leaf.shape))
    except ValueError as e:
      raise ValueError(f'parameter {_path_str(path)}: {e}') from None
    return structure

  resolved = jax.tree_util.tree_map_with_path(one, params, specs)
  if ambiguous:
    warnings.warn(
        f'fop_optax: {len(ambiguous)} parameter(s) of rank >= 3 under an attention-like or '
        f'stacked-layers node get no preconditioner: {", ".join(ambiguous)}. Their leading axes '
        'may be heads, a key/value stack or scanned layers, which the default rule would read '
        'as convolution taps (a P mixing heads or layers). For Flax NNX models pass '
        'structures=fop_optax.structures_for(model), or give these leaves explicit dimension '
        'numbers (fop_optax.structures.FopDimensionNumbers / WithDimensions).', stacklevel=3)
  return resolved


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
