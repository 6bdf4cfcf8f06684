"""Equal-shaped leaves run as one group (``fop_optax._grouping``), with branches decided per group.

Oracles: ``jax.lax.cond`` per member (values and gradients), the same transformation on each
leaf alone (no group), and the traced program (one set of operations per group, not per leaf).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from benchmarks import depth
from fop_optax import _grouping


def _expensive(x, s):
  return jnp.linalg.eigvalsh(x @ x.T)[-1] * s


def _cheap(x, s):
  return jnp.sum(x) + s


def _per_member(xs, s):
  return jnp.stack([jax.lax.cond(x[0, 0] > 0, _expensive, _cheap, x, s) for x in xs])


def _grouped(xs, s):
  out = _grouping.group_map(
      lambda i, x: _grouping.cond(x[0, 0] > 0, _expensive, _cheap, x, s),
      [0] * len(xs), list(xs))
  return jnp.stack(out)


@pytest.mark.parametrize('signs', [(1, -1, 1, -1), (1, 1, 1, 1), (-1, -1, -1, -1)])
def test_cond_in_a_group_equals_lax_cond_per_member(signs):
  xs = jax.random.normal(jax.random.key(0), (4, 3, 3))
  xs = xs.at[:, 0, 0].set(jnp.abs(xs[:, 0, 0]) * jnp.asarray(signs, xs.dtype))
  s = jnp.float32(2.0)
  np.testing.assert_allclose(jax.jit(_grouped)(xs, s), _per_member(xs, s), rtol=1e-6)
  # Reverse mode: the VJP of the branch each member takes.
  g1 = jax.grad(lambda xs: jnp.sum(_grouped(xs, s)))(xs)
  g2 = jax.grad(lambda xs: jnp.sum(_per_member(xs, s)))(xs)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
  # Nested: a vmap (one state per seed) around the group decides per level too.
  both = jnp.stack([xs, -xs])
  np.testing.assert_allclose(jax.vmap(_grouped, (0, None))(both, s),
                             jnp.stack([_per_member(xs, s), _per_member(-xs, s)]), rtol=1e-6)


def test_cond_runs_a_branch_only_when_a_member_takes_it():
  """lax.cond under vmap runs both branches (a select); a group runs the true one only if needed."""
  calls = []

  def true_fun(x):
    jax.debug.callback(lambda: calls.append(1))
    return x + 1

  def run(xs, cond):
    return jnp.stack(_grouping.group_map(lambda i, x: cond(x > 0, true_fun, lambda x: x - 1, x),
                                         [0] * len(xs), list(xs)))

  negative = -jnp.arange(1.0, 5.0)
  np.testing.assert_array_equal(jax.jit(lambda xs: run(xs, _grouping.cond))(negative),
                                negative - 1)
  jax.effects_barrier()
  assert not calls
  jax.jit(lambda xs: run(xs, jax.lax.cond))(negative)   # the check can fail: lax.cond runs it
  jax.effects_barrier()
  assert calls
  calls.clear()
  np.testing.assert_array_equal(
      jax.jit(lambda xs: run(xs, _grouping.cond))(jnp.array([1.0, -1.0, 2.0, -2.0])),
      [2.0, -2.0, 3.0, -3.0])
  jax.effects_barrier()
  assert calls


def test_cond_outside_a_group_is_lax_cond():
  x = jnp.ones((2, 2))
  text = jax.make_jaxpr(lambda x: _grouping.cond(x[0, 0] > 0, lambda x: 2 * x, lambda x: x, x))(x)
  assert 'cond[' in str(text) and 'custom_vmap' not in str(text)


def test_group_map_keeps_order_and_splits_groups():
  keys = ['a', 'b', 'a', 'c', 'a']
  xs = [jnp.full((2,), float(i)) for i in range(5)]
  seen = []

  def fun(i, x):
    seen.append((i, x.shape))
    return x * 10 + i

  out = _grouping.group_map(fun, keys, xs)
  # Members of group 'a' are computed with the index of its first leaf (0).
  expected = [0 * 10 + 0, 1 * 10 + 1, 2 * 10 + 0, 3 * 10 + 3, 4 * 10 + 0]
  for o, e in zip(out, expected):
    np.testing.assert_array_equal(o, np.full((2,), e))
  assert len(seen) == 3   # one trace per group


def _params(n):
  keys = jax.random.split(jax.random.key(1), n)
  return {f'w{i}': jax.random.normal(k, (40, 24)) / 6 for i, k in enumerate(keys)}


def _loss(params, x):
  # Each leaf's gradient depends on that leaf alone: a leaf trained alone is the oracle.
  return sum(jnp.sum(jnp.sin(x @ w)) for w in params.values())


def _state_with_mixed_bounds(tx, params, grads):
  """``tx``'s state after a first step, with the M's of leaves 0 and 2 scaled past the bound.

  The group then holds members whose guard clips (low rank: and shrinks ``V``) and members
  whose guard does not (the per-member select of a grouped branch), and the stored spans
  no longer match their M's (recomputed).
  """
  _, state = tx.update(grads, tx.init(params), params)
  def scale(path, m):
    name = path[0].key
    if name in ('w0', 'w2'):
      return m * 1.4 if m.ndim == 2 else m.at[1].set(0.6 * m[0])
    return m * 0.9 if m.ndim == 2 else m.at[1].set(-0.1 * m[0])
  return state._replace(preconditioners=jax.tree_util.tree_map_with_path(scale,
                                                                         state.preconditioners))


@pytest.mark.parametrize('structures', ['low_rank', 'full'])
def test_a_step_on_equal_leaves_equals_the_step_on_each_leaf_alone(structures):
  """Four equal-shaped leaves (one group) get the update each gets in a tree of its own."""
  params = _params(4)
  x = jax.random.normal(jax.random.key(2), (8, 40))
  g1 = jax.grad(lambda p: _loss(p, x))(params)
  g2 = jax.grad(lambda p: _loss(p, 1.1 * x))(params)
  # (a hyper step small enough that no M ends within rounding of the bound, where the
  # guard's choice to clip would follow the last bits of the arithmetic)
  tx = fop_optax.scale_by_fop(0.1, hyper_optimizer=optax.sgd(5e-3), structures=structures,
                              rank=2, max_full_dim=64)
  state = _state_with_mixed_bounds(tx, params, g1)
  def raw_lam(m):   # λ_max(MᵀM) of the raw M, float64
    m = np.asarray(m, np.float64)
    mm = m if m.ndim == 2 else np.eye(m.shape[1]) + m[0] @ m[1].T
    return np.linalg.eigvalsh(mm.T @ mm)[-1]
  lams = {name: raw_lam(m) for name, m in state.preconditioners.items()}
  # leaves 0 and 2 clipped (low rank: V shrunk too, λ > 2B), 1 and 3 within the bound
  assert min(lams['w0'], lams['w2']) > 1.9 and max(lams['w1'], lams['w3']) < 1 + 1e-6, lams
  updates, new = jax.jit(tx.update)(g2, state, params)
  for i, name in enumerate(params):
    # the same leaf alone, with its own state (a tree of one: no group)
    alone = jax.tree.map(lambda t: {name: t[name]} if isinstance(t, dict) and name in t else t,
                         state, is_leaf=lambda t: isinstance(t, dict) and name in t)
    u_alone, new_alone = jax.jit(tx.update)({name: g2[name]}, alone, {name: params[name]})
    # (to rounding: a group's products are batched, summed in another order)
    np.testing.assert_allclose(updates[name], u_alone[name], rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(new.preconditioners[name], new_alone.preconditioners[name],
                               rtol=1e-5, atol=3e-6)


def test_a_group_compiles_its_linear_algebra_once():
  """The compiled update holds as many eigensolver calls for four equal leaves as for three.

  (Not as for one: a grouped branch compiles its batched true branch twice, alone and
  beside the false one for a mixed group.) One leaf per call would grow with the leaves.
  """
  def eighs(n):
    params = _params(n)
    tx = fop_optax.fop(0.1, structures='low_rank', rank=2)
    state = tx.init(params)
    text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    return sum(n for target, n in depth.solver_calls(text).items() if 'syevd' in target)
  one, three = eighs(1), eighs(3)
  assert 0 < three < 3 * one
  assert eighs(4) == three


def test_a_stacked_leaf_decides_its_branches_per_stack():
  """WithDimensions over a batch axis (an nnx.scan stack) runs its members as one group.

  Its guard's skip-if-unneeded branches stay branches: a learning step on a stack of 4 whose
  ``P`` are far inside the bound executes a few eigensolvers per member, not the 16
  eigenvalue solves of the shrink's bisection that a plain ``vmap`` (a select running both
  branches) would execute for every member. Read from a profile (XLA:CPU thunks). And ``P·G``
  of the stack equals, per slice, the structure's on that slice alone.
  """
  st = fop_optax.WithDimensions(fop_optax.structures.LowRank(rank=2),
                                fop_optax.FopDimensionNumbers(rows=(1,), batch=(0,)))
  params = {'w': jax.random.normal(jax.random.key(0), (4, 40, 24)) / 6}
  g = jax.tree.map(lambda x: jnp.sin(3 * x), params)
  tx = fop_optax.scale_by_fop(0.1, structures=st)
  update = jax.jit(tx.update)
  box = [tx.init(params)]
  for _ in range(2):
    _, box[0] = update(g, box[0], params)

  def run():
    u, box[0] = update(g, box[0], params)
    jax.block_until_ready(u)

  if jax.default_backend() == 'cpu':
    text = update.lower(g, box[0], params).compile().as_text()
    executed = depth.executed_solver_calls(text, run, steps=2)
    eigen = sum(n for k, n in executed.items() if 'syevd' in k)
    assert 0 < eigen <= 3 * 4, executed
  state = box[0]
  p_stack = st.precondition(state.preconditioners['w'], g['w'])
  for k in range(4):
    single = fop_optax.structures.LowRank(rank=2)
    np.testing.assert_allclose(p_stack[k], single.precondition(state.preconditioners['w'][k],
                                                               g['w'][k]), rtol=1e-5, atol=1e-6)
