"""The default rule and resolution: which structure each leaf of a parameters tree gets.

:func:`default_structure` reads what a leaf *is* (:func:`leaf_role`: its path's
names and its shape; see the package docstring for the table),
:func:`as_structure` turns a label (``'auto'`` or a registered name), a
:class:`~fop_optax.structures.FopDimensionNumbers` or a structure into a
structure, and :func:`resolve_structures` does it for a whole tree and gives
every structure the guard's bound (:meth:`Structure.with_bound`), the one place
``max_scale`` reaches the structures.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fop_optax.structures._base import _REGISTRY, Structure, structure_names
from fop_optax.structures._matrix import Shape, _rows
from fop_optax.structures.none import NoPreconditioner
from fop_optax.structures.scalar import Scalar   # noqa: F401  (registers 'scalar')
from fop_optax.structures.diagonal import Diagonal   # noqa: F401  (registers 'diagonal')
from fop_optax.structures.full import Full
from fop_optax.structures.spatial import Spatial
from fop_optax.structures.low_rank import DEFAULT_RANK, LowRank
from fop_optax.structures.dimensions import (FopDimensionNumbers, normalize_dimensions,
                                             with_dimensions)

# The built-in labels, in registration order (structure_names() also lists any registered later).
_BY_NAME = _REGISTRY
STRUCTURE_NAMES: tuple[str, ...] = structure_names()


# Rows up to which the default rule takes a full M: where a full M's step stops being cheaper
# than rank-8 low rank's, at equal accuracy (docs/benchmarks.md §6 has the measurements).
DEFAULT_MAX_FULL_DIM = 32
# The guard's default bound on λ_max(P): FOP never lengthens the base step along any
# direction (docs/stability.md: larger bounds degraded or wrecked long runs).
DEFAULT_MAX_SCALE = 1.0
# Most kernel taps (product of the axes before (in, out)) read as a convolution.
MAX_SPATIAL_TAPS = 64

# What the default rule can tell a leaf is (see the package docstring).
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
  """The default rule: see the package docstring (``None`` means the default value).

  Args:
    shape: the leaf's shape.
    role: what the leaf is, one of ``ROLES`` (:func:`leaf_role`); ``'other'``
      (the default) applies the shape-only rule.
    max_full_dim: largest row count that gets a dense ``M`` (default 32,
      ``DEFAULT_MAX_FULL_DIM``; above it ``low_rank``).
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
  first axis), as do :class:`Structure` instances. Labels are the registered
  names (:func:`~fop_optax.structures.register`); each class builds its
  instance from the rule's keywords (:meth:`Structure.from_label`).
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
    if spec in _REGISTRY:
      return _REGISTRY[spec].from_label(**rule_kwargs)
  raise ValueError(
      f'unknown FOP structure {spec!r}; expected a fop_optax.structures.Structure '
      f'or one of {structure_names()}')


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
      ``'low_rank'``, and any name registered with
      :func:`~fop_optax.structures.register`.
    max_scale: the guard's bound ``B`` on ``λ_max(P)`` (default 1), given to
      every structure that applies it (:meth:`Structure.with_bound`); ``None``
      for none. Pass the same value as to :func:`fop_optax.scale_by_fop` when
      reading its state (the diagnostics do). This is the one way the bound
      travels: each structure's ``max_scale`` field, read back by its ``clip``.
    **rule_kwargs: ``max_full_dim``, ``rank``, ``normalize`` for the default
      rule and for labels.

  The default rule (``None`` or ``'auto'``) reads each leaf's path (Flax NNX
  names such as ``embedding``, ``bias``, ``scale``, an attention block's
  ``query``/``key``/``value``/``out`` ``kernel``) as well as its shape; see
  the package docstring. Leaves without such names get the shape-only rule.

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
