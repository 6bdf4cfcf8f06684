"""Explicit dimension numbers: a leaf read through any axes, and a stack of leaves as one leaf.

:class:`FopDimensionNumbers` (like ``optax.contrib.MuonDimensionNumbers``) names
a leaf's ``rows`` (the contracted input axes ``P`` acts on), its ``batch`` axes
(one ``P`` per index) and, implicitly, the remaining columns.
:class:`WithDimensions` applies any structure that way: it transposes the rows
to the front and ``jax.vmap``-s the structure over the batch axes, through the
protocol only (:meth:`Structure.with_row_axes` gives the structure of one
slice), so a structure defined outside this package works too.

A stack of equal-shaped leaves is one batched leaf: ``jnp.stack(leaves)`` with
``batch=0`` and the structure's rows shifted by one gets one ``P`` per leaf,
each equal to the structure applied to that leaf alone (state, ``P·G``,
hypergradient, projection). :func:`stacked` builds that structure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from fop_optax import _grouping
from fop_optax.structures._base import Layout, Structure
from fop_optax.structures._matrix import Shape
from fop_optax.structures.full import Full

__all__ = ['FopDimensionNumbers', 'WithDimensions', 'with_dimensions', 'normalize_dimensions',
           'stacked']


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


def _batched(fn: Callable, n: int, in_axes) -> Callable:
  """``fn`` vmapped ``n`` times over the leading axis of the arguments ``in_axes`` marks 0."""
  for _ in range(n):
    fn = _grouping.vmap(fn, in_axes=in_axes)   # the members' branches decided together
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
    if isinstance(self.inner, WithDimensions):   # this file's own class
      raise TypeError('WithDimensions cannot wrap another WithDimensions')
    dims = self.dims
    if not isinstance(dims, FopDimensionNumbers):
      dims = FopDimensionNumbers(*dims)
    # Hashable and comparable: tuples of ints.
    object.__setattr__(self, 'dims', FopDimensionNumbers(_axes(dims.rows), _axes(dims.batch)))

  @property
  def max_scale(self) -> float | None:
    """The inner structure's guard (read by :func:`fop_optax.scale_by_fop`)."""
    return self.inner.max_scale

  @property
  def normalize(self) -> bool:
    return getattr(self.inner, 'normalize', False)

  @property
  def elementwise(self) -> bool:
    """The inner structure's (an elementwise ``P`` is reported in the leaf's layout)."""
    return self.inner.elementwise

  def _split(self, shape: Shape):
    """``(rows, batch, columns, perm, inner, inner_shape, batch_shape)`` for a leaf of ``shape``."""
    rows, batch, columns = normalize_dimensions(self.dims, len(shape))
    perm = batch + rows + columns
    inner = self.inner.with_row_axes(len(rows))
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
    if not rows and inner.needs_rows:
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

  def clip(self, m, max_scale=None):
    # The inner structure's projection per slice (shape-free for every built-in one);
    # max_scale=None: the inner structure's own bound.
    inner = self._split_m(m)
    return _batched(lambda x: inner.clip(x, max_scale), len(self.dims.batch), 0)(m)

  def clip_and_precondition(self, m, max_scale, g):
    _, batch, _, perm, inner, _, _ = self._split(g.shape)
    fn = _batched(lambda x, y: inner.clip_and_precondition(x, max_scale, y), len(batch), 0)
    m, out = fn(m, self._to_inner(g, perm))
    return m, self._from_inner(out, perm)

  def _split_m(self, m):
    """The inner structure for the shape-free methods (its rows only matter through ``m``)."""
    return self.inner.with_row_axes(max(len(self.dims.rows), 1))

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

  def memory(self, shape):
    _, _, _, _, inner, inner_shape, batch_shape = self._split(tuple(shape))
    return math.prod(batch_shape) * inner.memory(inner_shape)


def _inverse(perm: Sequence[int]) -> list[int]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return inv


def with_dimensions(inner: Structure, dims: FopDimensionNumbers | None) -> Structure:
  """``inner`` along ``dims``; ``inner`` itself where no wrapper is needed.

  ``NoPreconditioner`` (``preconditions = False``) and ``dims = None`` return
  ``inner``; rows that are the leading axes with no batch axis give
  ``inner.with_row_axes(len(rows))`` for a structure whose rows are its leading
  ``row_axes`` axes (``takes_row_axes``: ``Full``/``LowRank``), the same view.
  """
  if dims is None or not inner.preconditions:
    return inner
  rows, batch = _axes(dims.rows), _axes(dims.batch)
  if (not batch and rows and rows == tuple(range(len(rows)))
      and inner.takes_row_axes):
    return inner.with_row_axes(len(rows))
  return WithDimensions(inner, FopDimensionNumbers(rows, batch))


def stacked(inner: Structure, leaf_shape: Shape) -> Structure:
  """``inner`` for ``jnp.stack(leaves)`` of equal-shaped leaves of ``leaf_shape``: one ``P`` per leaf.

  A stack of equal-shaped leaves is one batched leaf: :class:`WithDimensions`
  over ``batch=0`` with ``inner``'s rows (its :meth:`~Structure.layout`'s, which
  must be the leading axes) shifted by one. Its state is the stack of the
  leaves' states and every method equals ``inner``'s applied per leaf (``init``
  draws one key per leaf from ``key``, as a batched leaf does).

  Raises:
    ValueError: ``inner``'s rows are not the leading axes of a leaf.
  """
  leaf_shape = tuple(leaf_shape)
  rows = tuple(inner.layout(leaf_shape).rows)
  if rows != tuple(range(len(rows))):
    raise ValueError(f'stacked: {inner!r} reads rows {rows} of a {leaf_shape} leaf; '
                     'only leading rows can be shifted behind a stack axis')
  return WithDimensions(inner, FopDimensionNumbers(tuple(r + 1 for r in rows), (0,)))
