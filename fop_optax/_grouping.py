"""Equal-shaped leaves as one batched computation, with branches decided per group.

Every layer of a Transformer has kernels of the same shapes, so FOP runs the
same small linear algebra on each: dozens of operations per leaf, each a
separate call on a CPU (a thunk) or a separate kernel launch on an accelerator,
whose fixed cost dominates when the matrices are small. :func:`group_map` runs a
per-leaf function once per *group* of leaves that share a structure, shapes and
dtypes: their arrays are stacked along a new leading axis, the function is
``jax.vmap``-ped over it, and the results are split back into leaves, so that
each operation runs once per group instead of once per leaf.

Under ``jax.vmap`` a ``jax.lax.cond`` whose predicate differs between members
becomes a ``select`` that runs *both* branches for every member: the eigensolver
that the guard's Cholesky certificate skips, the span basis a step reuses
instead of recomputing, the bisection that runs only when ``V`` must shrink,
would all run on every step. :func:`cond` is the branch the structures use
instead: unbatched it is ``lax.cond``; batched, it runs the skipped branch for
the whole group only when some member needs it.

On CPU the LAPACK calls themselves stay one per member (``fop_optax._linalg``
loops them under ``vmap`` to avoid a thread-pool deadlock of batched LAPACK on
XLA:CPU); on other platforms they become one batched solver call per group.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

__all__ = ['cond', 'group_map', 'vmap']


def _vmapped(fun, in_batched, axis_size):
  """``fun`` vmapped over the operands flagged in ``in_batched`` (outputs batched, broadcast)."""
  axes = jax.tree.map(lambda b: 0 if b else None, in_batched)
  return jax.vmap(fun, in_axes=axes, axis_size=axis_size)


def _select(pred, on_true, on_false):
  """Per member of a batch (leading axis): ``on_true`` where ``pred``, else ``on_false``."""
  def pick(x, y):
    return jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - pred.ndim)), x, y)
  return jax.tree.map(pick, on_true, on_false)


def _hoisted(fun, operands):
  """``(run, consts)``: ``run(operands, consts) == fun(*operands)``, every closed-over value in ``consts``.

  ``custom_vmap`` needs every batched value as an argument; a branch may close
  over batched values (a stacked leaf's arrays), so it is traced once and its
  captured values (``make_jaxpr``'s constants) are passed explicitly.
  """
  closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*operands)
  out_tree, jaxpr = jax.tree.structure(out_shape), closed.jaxpr

  def run(ops, consts):
    flat = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, list(consts)))(
        *jax.tree.leaves(ops))
    return out_tree.unflatten(flat)

  return run, tuple(jnp.asarray(c) for c in closed.consts)


_active = [0]   # > 0 while group_map traces a group: cond decides per group


def cond(pred: jax.Array, true_fun: Callable, false_fun: Callable, *operands: Any) -> Any:
  """``jax.lax.cond(pred, true_fun, false_fun, *operands)``, deciding once per group in :func:`group_map`.

  Outside :func:`group_map` this is ``lax.cond``. Inside it (where ``fun`` is
  ``vmap``-ped over a group of leaves), a batched ``pred`` runs ``false_fun``
  alone (batched) when no member's ``pred`` holds, ``true_fun`` alone when
  every member's does, and both with a per-member select only when the
  members disagree; ``lax.cond`` would run both for every member on every
  call. Nested ``vmap`` s (one optimiser state per seed around a group) decide
  the same way at each level. Values the branches close over (batched or not)
  are passed on to them as operands, like ``operands`` themselves.

  Reverse-mode derivatives are ``lax.cond``'s (a ``custom_vjp`` whose backward
  pass is the same grouped choice between the two branches' VJPs); forward mode
  (``jax.jvp``) is not available inside a group.
  """
  if not _active[0]:
    return jax.lax.cond(pred, true_fun, false_fun, *operands)
  true_c, true_consts = _hoisted(true_fun, operands)
  false_c, false_consts = _hoisted(false_fun, operands)
  args = (tuple(operands), true_consts, false_consts)

  def run_true(ops, tc, fc):
    del fc
    return true_c(ops, tc)

  def run_false(ops, tc, fc):
    del tc
    return false_c(ops, fc)

  @jax.custom_batching.custom_vmap
  def grouped(pred, args):
    return jax.lax.cond(pred, run_true, run_false, *args)

  @grouped.def_vmap
  def _rule(axis_size, in_batched, pred, args):
    pred_batched, args_batched = in_batched
    on_true = _vmapped(run_true, args_batched, axis_size)
    on_false = _vmapped(run_false, args_batched, axis_size)
    if not pred_batched:
      out = cond(pred, on_true, on_false, *args)
    else:
      def mixed(pred, args):
        return _select(pred, on_true(*args), on_false(*args))

      def some(pred, args):   # at least one member takes the true branch
        return cond(jnp.all(pred), lambda p, a: on_true(*a), mixed, pred, args)

      out = cond(jnp.any(pred), some, lambda p, a: on_false(*a), pred, args)
    return out, jax.tree.map(lambda _: True, out)

  # custom_vmap has no reverse mode of its own: the VJP is the same choice between the
  # branches' VJPs (only the branch taken is differentiated, as with lax.cond).
  @jax.custom_vjp
  def differentiable(pred, args):
    return grouped(pred, args)

  def fwd(pred, args):
    return grouped(pred, args), (pred, args)

  def bwd(res, cotangent):
    pred, args = res
    def vjp_of(run):
      return lambda args, ct: jax.vjp(lambda a: run(*a), args)[1](ct)[0]
    return None, cond(pred, vjp_of(run_true), vjp_of(run_false), args, cotangent)

  differentiable.defvjp(fwd, bwd)
  return differentiable(jnp.asarray(pred), args)


def vmap(fun: Callable, in_axes: Any = 0) -> Callable:
  """``jax.vmap(fun, in_axes)`` whose :func:`cond` branches are decided per batch, as in a group.

  For a leaf that is itself a stack (:class:`~fop_optax.structures.WithDimensions` with batch
  axes, e.g. the layers of an ``nnx.scan``): its members' skips are decided together.
  """
  def batched(*args):
    _active[0] += 1   # read while fun is traced, which happens inside this call
    try:
      return jax.vmap(fun, in_axes=in_axes)(*args)
    finally:
      _active[0] -= 1
  return batched


def group_map(fun: Callable, keys: Sequence[Hashable], *columns: Sequence[Any]) -> list[Any]:
  """``[fun(i, *row) for row in zip(*columns)]``, one batched call per group of equal ``keys``.

  ``fun(i, *row)`` is the per-leaf function, ``i`` the index of the first leaf
  of its group (for static, per-leaf information such as a structure: every
  leaf of a group must share it, which ``keys`` asserts), ``row`` one entry of
  each column (pytrees of arrays). Leaves whose keys are equal must have rows of
  the same tree structure, shapes and dtypes (include them in the key); such
  rows are stacked along a new leading axis and ``fun`` is ``jax.vmap``-ped
  over them, so that its operations run once per group. A group of one calls
  ``fun`` directly. Results come back in the leaves' order, split per leaf.

  Branches inside ``fun`` that use :func:`cond` are decided per group.
  """
  groups: dict[Hashable, list[int]] = collections.defaultdict(list)
  for i, key in enumerate(keys):
    groups[key].append(i)
  rows = list(zip(*columns))
  out: list[Any] = [None] * len(rows)
  for members in groups.values():
    first = members[0]
    if len(members) == 1:
      out[first] = fun(first, *rows[first])
      continue
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[rows[i] for i in members])
    results = vmap(lambda *row: fun(first, *row))(*stacked)
    for k, i in enumerate(members):
      out[i] = jax.tree.map(lambda x: x[k], results)
  return out
