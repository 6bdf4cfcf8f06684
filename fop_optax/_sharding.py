"""Where the family's arrays live under a device mesh: the one place that decides.

JAX has two kinds of mesh axes (``jax.sharding.AxisType``):

* **auto** axes leave the layout of every intermediate to the compiler; a
  sharding constraint only pins the ones that must not drift from step to step;
* **explicit** axes put the sharding into each array's type, and a product that
  contracts a sharded axis must be told how its result is laid out
  (``out_sharding``), or JAX raises ``ShardingTypeError``.

A mesh with explicit axes reaches a transformation either as the context mesh
(``jax.set_mesh``) or only through its inputs' types (parameters placed with
``jax.device_put(x, NamedSharding(mesh, spec))``, then ``jax.jit`` called
outside any ``set_mesh``, which is how ``optax.sgd`` is commonly used). Both are
read here: :func:`explicit_mesh` looks at the context mesh and then at the
operands' types.

The layout the family uses (documented in the sharding guide):

* FOP's small matrices (a×a, a×r), LODO's weights and its flattened vector are
  replicated on every device (:func:`replicated`, :func:`replicate`);
* anything leaf-shaped (``P·G``, the stored gradient, updates) keeps its
  parameter's sharding (:func:`spec_like`, :func:`reshard_like`).
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _aval_mesh(x):
  sharding = getattr(jax.typeof(x), 'sharding', None)
  return getattr(sharding, 'mesh', None)


def explicit_mesh(*operands):
  """The mesh with explicit axes these operands live on, or ``None``.

  The context mesh (``jax.set_mesh``) first; otherwise the first operand whose
  type carries a mesh with an explicit axis (a jitted call outside
  ``set_mesh`` on arrays placed with ``NamedSharding``).
  """
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context if AxisType.Explicit in context.axis_types else None
  for x in operands:
    mesh = _aval_mesh(x)
    if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def _on(mesh, spec: PartitionSpec):
  # A bare PartitionSpec needs a context mesh; outside ``set_mesh`` name the mesh.
  if jax.sharding.get_abstract_mesh().empty:
    return NamedSharding(mesh, spec)
  return spec


def replicated(*operands):
  """``out_sharding`` for a small matrix computed from ``operands``: replicated.

  ``None`` (the compiler decides) unless the operands live on an explicit mesh.
  """
  mesh = explicit_mesh(*operands)
  return None if mesh is None else _on(mesh, PartitionSpec())


def spec_like(x, drop: int = 0, lead: int = 0):
  """``out_sharding`` for a leaf-like product: ``x``'s layout (explicit mesh only).

  The first ``drop`` axes of ``x`` are replaced by ``lead`` unsharded axes, for
  products ``(k, *columns)`` that contract the rows away.
  """
  mesh = explicit_mesh(x)
  if mesh is None:
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  return _on(mesh, PartitionSpec(*((None,) * lead + spec[drop:])))


def replicate(x, *others):
  """``x`` replicated on every device of its mesh (no mesh: unchanged).

  The mesh is the context mesh, or the one ``x``'s type or one of ``others``'
  types carries (e.g. the gradient a small matrix was computed from): a value
  with no mesh in its type would otherwise leave a jitted function with
  whatever layout the compiler propagates to it, which may change from step
  to step.

  Also keeps a state matrix replicated from step to step: without it the
  compiler may shard, e.g., a low-rank ``(2, a, r)`` like its leaf's rows after
  an update, and the state's layout would change between steps.
  """
  mesh = explicit_mesh(x, *others)
  if mesh is not None:
    return jax.sharding.reshard(x, _on(mesh, PartitionSpec()))
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec())


def reshard_like(out, like):
  """``out`` laid out like ``like`` under an explicit mesh (elsewhere unchanged)."""
  mesh = explicit_mesh(like, out)
  if mesh is None:
    return out
  return jax.sharding.reshard(out, _on(mesh, jax.typeof(like).sharding.spec))
