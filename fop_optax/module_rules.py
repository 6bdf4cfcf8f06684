"""The module-aware rule: structures read from a Flax NNX model's layers, and a report.

The default rule (:func:`fop_optax.structures.default_structure`) sees only a leaf's
path and shape, so it cannot tell a conv kernel's taps from attention heads, a
stacked key/value kernel or the layer axis of an ``nnx.scan`` stack.
:func:`structures_for` reads each parameter's *layer* instead and gives it explicit
dimension numbers (:class:`fop_optax.structures.FopDimensionNumbers`): the axes
``P`` acts on (the layer's contracted input axes), axes with one ``P`` per index
(stacked layers, a K/V stack) and the columns sharing ``P``.

======================================  ==============================================
layer                                   rows / batch (of the kernel)
======================================  ==============================================
``nnx.Conv``/``nnx.ConvTranspose``      rows = the taps (``spatial`` up to
                                        ``MAX_SPATIAL_TAPS`` taps, else dense)
``nnx.Linear``                          rows = ``in``
``nnx.LinearGeneral`` (and so           rows = its ``in_features`` axes, batch = its
``nnx.MultiHeadAttention``'s            ``batch_axis`` axes
query/key/value/out)
a module with an ``einsum_str`` and     :func:`einsum_dimensions` of its equation
one kernel (``nnx.Einsum``, lookalikes)
``nnx.Embed``, norms, every ``bias``    ``none``
anything else                           the default rule (``'auto'``)
======================================  ==============================================

A layer created under ``nnx.vmap``/``nnx.scan`` (``nnx.split_rngs`` + ``nnx.vmap``,
as for scanned Transformer stacks) holds parameters with extra *leading* axes: a
``Linear(256, 1024)`` stacked over 12 layers has a ``(12, 256, 1024)`` kernel. They
are found by comparing the kernel's rank with the rank the layer declares (2 for
``Linear``, ``len(kernel_size) + 2`` for ``Conv``, the kernel operand's letters for
an einsum, ...); every extra leading axis is a batch axis (one ``P`` per layer).

Rows up to ``max_full_dim`` (default 32) get a dense ``M`` (``full``), more get
``low_rank``, as in the default rule.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import jax

from fop_optax import structures as S

__all__ = ['structures_for', 'einsum_dimensions', 'describe', 'LeafDescription']


def einsum_dimensions(equation: str, operand: int = 1) -> S.FopDimensionNumbers | None:
  """Dimension numbers of the kernel operand of a two-operand einsum ``'in,kernel->out'``.

  The rule, for each letter of the kernel operand (``operand`` = 1, the second,
  as for ``nnx.Einsum``; 0 for a kernel written first):

  * *contracted* (in the input operand, not in the output): a **row**, the
    axes ``P`` acts on (``D`` of ``'BTD,NDH->BTNH'``; ``N`` and ``H`` of the
    output projection ``'BTNH,NHD->BTD'``);
  * *shared* (in the input operand and in the output, e.g. a per-head weight
    ``'BNTD,NDH->BNTH'``): a **batch** axis, each index its own linear map;
  * *stacked* (kernel only, and in the output before every letter that comes
    from the input operand, e.g. ``C`` of the key/value kernel
    ``'BSD,CKDH->CBSKH'``: the einsum returns a stack of separate results,
    keys and values): a **batch** axis, one ``P`` per index, so key and value
    projections are never mixed;
  * any other kernel-only letter (``N``, ``H`` of ``'BTD,NDH->BTNH'``): a
    **column**, sharing ``P``.

  Returns ``None`` when the equation is not of that form (not two operands,
  an ellipsis, a repeated letter) or contracts no kernel axis.
  """
  equation = equation.replace(' ', '')
  if '->' not in equation or '.' in equation:
    return None
  inputs, out = equation.split('->')
  operands = inputs.split(',')
  if len(operands) != 2 or operand not in (0, 1):
    return None
  kernel, other = operands[operand], operands[1 - operand]
  if len(set(kernel)) != len(kernel):
    return None
  from_input = [i for i, c in enumerate(out) if c in other]
  first_input = from_input[0] if from_input else len(out)
  rows, batch = [], []
  for axis, c in enumerate(kernel):
    if c in other and c not in out:
      rows.append(axis)
    elif c in other and c in out:
      batch.append(axis)
    elif c in out and out.index(c) < first_input:
      batch.append(axis)
  if not rows:
    return None
  return S.FopDimensionNumbers(tuple(rows), tuple(batch))


def _nnx():
  from flax import nnx   # flax is optional: only imported when a model is given
  return nnx


def _shift(dims: S.FopDimensionNumbers, extra: int) -> S.FopDimensionNumbers:
  """``dims`` of a layer's own kernel, for the kernel with ``extra`` leading (stacked) axes."""
  return S.FopDimensionNumbers(tuple(a + extra for a in dims.rows),
                               tuple(range(extra)) + tuple(a + extra for a in dims.batch))


def _dense_dims(shape, dims, *, max_full_dim, rank, normalize, spatial=False) -> S.Structure:
  rows, _, _ = S.normalize_dimensions(dims, len(shape))
  a = math.prod(shape[i] for i in rows)
  max_full_dim = S.DEFAULT_MAX_FULL_DIM if max_full_dim is None else max_full_dim
  rank = S.DEFAULT_RANK if rank is None else rank
  if spatial and a <= S.MAX_SPATIAL_TAPS:
    inner = S.Spatial(normalize=normalize)
    if not dims.batch and tuple(rows) == tuple(range(len(shape) - 2)):
      return inner
  elif a <= max_full_dim:
    inner = S.Full(normalize=normalize)
  else:
    inner = S.LowRank(rank=rank, normalize=normalize)
  return S.with_dimensions(inner, dims)


def _layer_dims(module: Any, attr: str, shape, einsum_strs) -> tuple[str, Any]:
  """``(kind, dims)`` for a module's parameter: dims ``None`` = no P, ``'auto'`` = default rule."""
  nnx = _nnx()
  if attr == 'bias':
    return 'bias', None
  if isinstance(module, nnx.Embed):
    return 'embedding', None
  if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm,
                         getattr(nnx, 'InstanceNorm', nnx.LayerNorm))):
    return 'norm', None
  equation = einsum_strs if isinstance(einsum_strs, str) else getattr(module, 'einsum_str', None)
  if isinstance(equation, str):
    # An einsum layer: its one non-bias parameter is the kernel (any name, e.g. Gemma's `w`).
    kernels = [k for k, v in vars(module).items() if isinstance(v, nnx.Param) and k != 'bias']
    if kernels != [attr]:
      return 'einsum', 'auto'
    return _einsum_layer(equation, len(shape))
  if attr != 'kernel':
    return 'other', 'auto'
  ndim = len(shape)
  if isinstance(module, (nnx.Conv, getattr(nnx, 'ConvTranspose', nnx.Conv))):
    taps = len(module.kernel_size)
    extra = ndim - (taps + 2)
    if extra < 0:
      return 'conv', 'auto'
    return 'conv', _shift(S.FopDimensionNumbers(tuple(range(taps)), ()), extra)
  if isinstance(module, nnx.LinearGeneral):
    n_batch = len(module.batch_axis)
    n_in, n_out = len(module.in_features), len(module.out_features)
    extra = ndim - (n_batch + n_in + n_out)
    if extra < 0:
      return 'linear_general', 'auto'
    dims = S.FopDimensionNumbers(tuple(range(n_batch, n_batch + n_in)), tuple(range(n_batch)))
    return 'linear_general', _shift(dims, extra)
  if isinstance(module, nnx.Linear):
    extra = ndim - 2
    if extra < 0:
      return 'linear', 'auto'
    return 'linear', _shift(S.FopDimensionNumbers((0,), ()), extra)
  return 'other', 'auto'


def _einsum_layer(equation: str, ndim: int) -> tuple[str, Any]:
  eq = equation.replace(' ', '')
  operands = eq.split('->')[0].split(',')
  if len(operands) != 2:
    return 'einsum', 'auto'
  dims = einsum_dimensions(eq)
  extra = ndim - len(operands[1])
  if extra < 0:
    return 'einsum', 'auto'
  if dims is None:   # nothing contracted (an elementwise scale) or an unreadable equation
    return 'einsum', None if '.' not in eq else 'auto'
  return 'einsum', _shift(dims, extra)


def _module_table(model: Any, wrt: Any, einsum_strs: dict | None) -> dict:
  """``{leaf names: (module class name, kind, dims)}`` for ``nnx.state(model, wrt)``'s leaves."""
  nnx = _nnx()
  modules = {tuple(str(k) for k in path): node for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module)}
  einsum_strs = {(tuple(k.split('/')) if isinstance(k, str) else tuple(str(x) for x in k)): v
                 for k, v in (einsum_strs or {}).items()}
  state = nnx.state(model, wrt)
  table = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=S._is_variable)[0]:
    names = S.leaf_names(path)
    module = modules.get(names[:-1])
    if module is None:
      table[names] = ('', 'other', 'auto')
      continue
    eq = einsum_strs.get(names[:-1])
    kind, dims = _layer_dims(module, names[-1], tuple(leaf.shape), eq)
    table[names] = (type(module).__name__, kind, dims)
  return table


def structures_for(model: Any, wrt: Any = None, *, max_full_dim: int | None = None,
                   rank: int | None = None, normalize: bool = False,
                   einsum_strs: dict | None = None) -> Any:
  """The module-aware rule: a ``structures=`` tree for a Flax NNX model's parameters.

  Args:
    model: an ``nnx.Module``.
    wrt: the filter given to ``nnx.Optimizer`` (default ``nnx.Param``).
    max_full_dim, rank, normalize: as for the default rule.
    einsum_strs: equations of einsum layers that take theirs at call time (no
      ``einsum_str`` attribute), keyed by the layer's path (``'blocks/attn/q'``
      or a tuple of names), e.g. ``{'attn/q_einsum': 'BTD,NDH->BTNH'}``.

  Returns:
    An ``nnx.State`` shaped like ``nnx.state(model, wrt)`` with a
    :class:`~fop_optax.structures.Structure` (or ``'auto'``, the default rule,
    for layers it does not know) in place of each ``Variable``: a prefix of
    both trees ``nnx.Optimizer`` hands the transformation (``nnx.state`` for
    ``init``, its pure form for ``update``), so it can be passed as
    ``fop_optax.fop(..., structures=structures_for(model))`` and to the
    diagnostics. See the module docstring for the table; einsum equations
    follow :func:`einsum_dimensions`; extra leading axes of a stacked layer
    (``nnx.scan``/``nnx.vmap``) are batch axes.
  """
  nnx = _nnx()
  wrt = nnx.Param if wrt is None else wrt
  table = _module_table(model, wrt, einsum_strs)
  rule = dict(max_full_dim=max_full_dim, rank=rank, normalize=normalize)

  def one(path, leaf):
    names = S.leaf_names(path)
    _, kind, dims = table[names]
    shape = tuple(leaf.shape)
    if dims is None or len(shape) <= 1 or math.prod(shape) == 0:
      return S.NoPreconditioner()
    if isinstance(dims, str):
      return dims
    return _dense_dims(shape, dims, spatial=kind == 'conv', **rule)

  return jax.tree_util.tree_map_with_path(one, nnx.state(model, wrt), is_leaf=S._is_variable)


class LeafDescription(NamedTuple):
  """One leaf of :func:`describe`."""

  path: str
  shape: tuple[int, ...]
  role: str
  layer: str
  rows: tuple[int, ...]
  batch: tuple[int, ...]
  columns: tuple[int, ...]
  structure: S.Structure
  matrix: tuple[int, ...] | None
  floats: int

  def __str__(self):
    matrix = '-' if self.matrix is None else '×'.join(map(str, self.matrix)) or 'scalar'
    axes = (f'rows={self.rows} batch={self.batch} cols={self.columns}'
            if self.matrix is not None and self.rows else '-')
    layer = f' [{self.layer}]' if self.layer else ''
    return (f'{self.path}: {self.shape} {self.role}{layer}  {axes}  {self.structure!r}  '
            f'P {matrix}  M {self.floats} floats')


def _is_module(x: Any) -> bool:
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Module)


def describe(params_or_model: Any, structures: Any = None, *, wrt: Any = None,
             print_table: bool = False, max_scale: float | None = S.DEFAULT_MAX_SCALE,
             **rule_kwargs) -> list[LeafDescription]:
  """How FOP reads each leaf: one :class:`LeafDescription` per leaf (``str()`` is one line).

  Args:
    params_or_model: a parameters tree, or a Flax NNX model (its
      ``nnx.state(model, wrt)``).
    structures: as for :func:`fop_optax.fop`; ``None``: :func:`structures_for`
      for a model, the default rule for a tree.
    wrt: the ``nnx.Optimizer`` filter for a model (default ``nnx.Param``).
    print_table: also print the lines and the total number of floats in the ``M``\\ s.
    max_scale: the guard, as for :func:`fop_optax.resolve_structures`.
    **rule_kwargs: ``max_full_dim``, ``rank``, ``normalize``.

  Each line: path, shape, role (:func:`fop_optax.structures.leaf_role`: what the
  default rule takes the leaf to be), the layer class (for a model), the rows,
  batch and column axes, the structure, the shape of ``P`` (``(*batch, a, a)``)
  and the number of floats in the learned ``M``.
  """
  table = {}
  if _is_module(params_or_model):
    nnx = _nnx()
    wrt = nnx.Param if wrt is None else wrt
    model = params_or_model
    table = _module_table(model, wrt, None)
    if structures is None:
      structures = structures_for(model, wrt, **rule_kwargs)
    params = nnx.state(model, wrt)
  else:
    params = params_or_model
  resolved = S.resolve_structures(params, structures, max_scale=max_scale, **rule_kwargs)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  structs = jax.tree.leaves(resolved, is_leaf=lambda x: isinstance(x, S.Structure))
  blocks = S.find_attention_blocks([S.leaf_names(p) for p, _ in flat])
  out = []
  for (path, leaf), s in zip(flat, structs):
    names = S.leaf_names(path)
    shape = tuple(leaf.shape)
    layout = s.layout(shape)
    layer, kind, _ = table.get(names, ('', 'other', None))
    # The layer's kind where the module-aware rule knows it, else the default rule's reading.
    role = kind if kind != 'other' else S.leaf_role(names, blocks, shape=shape)
    out.append(LeafDescription(
        '/'.join(names), shape, role, layer, layout.rows, layout.batch, layout.columns, s,
        layout.matrix, layout.floats))
  if print_table:
    for line in out:
      print(line)
    print(f'total: {sum(d.floats for d in out)} floats in {len(out)} leaves')
  return out
