"""fop_optax behaves like an optax citizen: jit, wrappers, dtypes, Flax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import fop_optax

PARAMS = {
    'conv': jnp.full((3, 3, 2, 4), 0.1, jnp.float32),
    'dense': jnp.full((8, 5), 0.2, jnp.float32),
    'big': jnp.full((80, 3), 0.3, jnp.float32),   # low-rank under the default rule
    'bias': jnp.zeros(5, jnp.float32),
    'scale': jnp.ones((), jnp.float32),
}


def loss(params):
  leaves = jax.tree.leaves(params)
  return sum(jnp.sum(jnp.sin(x.astype(jnp.float32) + 0.3) ** 2) for x in leaves)


OPTIMIZERS = {
    'scale_by_fop': lambda: fop_optax.scale_by_fop(0.1),
    'fop': lambda: fop_optax.fop(0.1),
    'fop_norm': lambda: fop_optax.fop(0.1, normalize=True),
    'fop_adam': lambda: fop_optax.fop_adam(0.01),
    'sgd_hd': lambda: fop_optax.sgd_hd(0.1),
    'pp_hd': lambda: fop_optax.sgd_hd(0.1, per_parameter=True),
    'adam_hd': lambda: fop_optax.adam_hd(0.01),
    'fop_diagonal': lambda: fop_optax.fop(0.1, structures='diagonal'),
    'fop_scalar': lambda: fop_optax.fop(0.1, structures='scalar'),
}


def _step(tx):
  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_no_recompilation_and_extra_args(name):
  tx = OPTIMIZERS[name]()
  step = _step(tx)
  params, state = step(PARAMS, tx.init(PARAMS))
  with test_utils.log_compilations() as logs:
    params, state = step(params, state)
  assert not logs, 'recompiled on the second call'
  # Unknown extra arguments are accepted, as optax's GradientTransformationExtraArgs.
  updates, _ = tx.update(jax.grad(loss)(params), state, params, unexpected_extra_arg=1)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_tree_map_params(name):
  tx = OPTIMIZERS[name]()
  state = tx.init(PARAMS)
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  test_utils.assert_trees_all_close(mapped, state)
  # last_gradient is params-shaped: f reaches it. (FopState-bearing states only.)
  if name.startswith(('fop', 'scale_by_fop')):
    negated = optax.tree.map_params(tx, lambda v: -v - 1, state)
    fop_state = fop_optax.diagnostics.find_fop_state(negated)
    assert float(fop_state.last_gradient['dense'][0, 0]) == -1.0


def test_inject_hyperparams_changes_learning_rate():
  tx = optax.inject_hyperparams(fop_optax.fop)(learning_rate=0.1, hyper_learning_rate=1e-3)
  state = tx.init(PARAMS)
  grads = jax.grad(loss)(PARAMS)
  update_fn = jax.jit(tx.update)
  u1, state = update_fn(grads, state, PARAMS)
  state.hyperparams['learning_rate'] = jnp.asarray(0.05)
  fresh = optax.inject_hyperparams(fop_optax.fop)(learning_rate=0.05, hyper_learning_rate=1e-3)
  u_expected, _ = fresh.update(grads, fresh.init(PARAMS), PARAMS)
  # First step is plain SGD: halving the rate halves the update.
  test_utils.assert_trees_all_close(u1, jax.tree.map(lambda x: 2 * x, u_expected), rtol=1e-6)
  u2, state = update_fn(grads, state, PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u2))


def test_multisteps_accumulates():
  k = 4
  tx = optax.MultiSteps(fop_optax.fop(0.1), every_k_schedule=k)
  state = tx.init(PARAMS)
  update_fn = jax.jit(tx.update)
  grads = jax.grad(loss)(PARAMS)
  for i in range(2 * k):
    updates, state = update_fn(grads, state, PARAMS)
    nonzero = any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(updates))
    assert nonzero == ((i + 1) % k == 0), i
  # The inner FOP state saw exactly two (averaged) gradients.
  assert int(fop_optax.diagnostics.find_fop_state(state.inner_opt_state).count) == 2


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32', 'float64'])
@pytest.mark.parametrize('name', ['fop', 'fop_adam', 'sgd_hd', 'fop_norm'])
def test_dtypes_kept_and_state_stable(dtype, name):
  with jax.enable_x64(dtype == 'float64'):
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    tx = OPTIMIZERS[name]()
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype and u.shape == p.shape
    dtypes = lambda s: jax.tree.map(lambda x: jnp.asarray(x).dtype, s)
    assert dtypes(new_state) == dtypes(state)
    fop_state = [s for s in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, fop_optax.FopState))
                 if isinstance(s, fop_optax.FopState)]
    for s in fop_state:
      want = jnp.float64 if dtype == 'float64' else jnp.float32
      assert all(m.dtype == want for m in jax.tree.leaves(s.preconditioners))

    # Inside lax.cond both branches must produce identical state types.
    @jax.jit
    def maybe_update(flag, state):
      return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)
    maybe_update(True, state)


def test_init_accepts_shape_dtype_struct():
  tx = fop_optax.fop(0.1)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
  state = tx.init(abstract)
  concrete = tx.init(PARAMS)
  assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, concrete)
  # And under eval_shape, as used to build shardings before allocating.
  shapes = jax.eval_shape(tx.init, abstract)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, concrete)


def test_first_step_equals_base_optimizer():
  """P_0 = I: FOP's first update is exactly the base optimiser's."""
  grads = jax.grad(loss)(PARAMS)
  for fop_tx, base in [(fop_optax.fop(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
                       (fop_optax.fop_adam(0.01), optax.adam(0.01))]:
    u_fop, _ = fop_tx.update(grads, fop_tx.init(PARAMS), PARAMS)
    u_base, _ = base.update(grads, base.init(PARAMS), PARAMS)
    test_utils.assert_trees_all_close(u_fop, u_base, rtol=1e-6)


def test_schedule_learning_rate():
  schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
  tx = fop_optax.fop(schedule, momentum=0)
  state = tx.init(PARAMS)
  grads = jax.grad(loss)(PARAMS)
  u0, state = tx.update(grads, state, PARAMS)
  np.testing.assert_allclose(u0['dense'], -0.1 * grads['dense'], rtol=1e-6)
  step = _step(tx)
  params, state = step(PARAMS, tx.init(PARAMS))
  params, state = step(params, state)
  assert float(loss(params)) < float(loss(PARAMS))


def test_flax_nnx_optimizer_trains():
  from flax import nnx

  import nnx_mlp
  model, x, y = nnx_mlp.problem()
  optimizer = nnx.Optimizer(model, fop_optax.fop(0.05), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    def mse(model):
      return jnp.mean((model(x) - y) ** 2)
    value, grads = nnx.value_and_grad(mse)(model)
    optimizer.update(model, grads)
    return value

  first = float(train_step(model, optimizer))
  for _ in range(300):
    last = float(train_step(model, optimizer))
  assert last < 0.2 * first, (first, last)
  fop_state = fop_optax.diagnostics.find_fop_state(optimizer.opt_state)
  # The kernels got learned full matrices (4x4, 16x16) and one moved away from the
  # identity. (Under the default guard λ_max(P) ≤ 1 only shrinking directions can be
  # learned; this full-batch problem's 4x4 wants growth only and stays at I.)
  m = [x for x in jax.tree.leaves(fop_state.preconditioners) if x.ndim == 2]
  assert sorted(x.shape for x in m) == [(4, 4), (16, 16)]
  assert max(float(jnp.abs(x - jnp.eye(x.shape[0])).max()) for x in m) > 1e-4


def test_flax_linen_train_state():
  from flax.training import train_state

  params = {'w': jnp.full((3, 2), 0.5), 'b': jnp.zeros(2)}
  apply_fn = lambda p, x: x @ p['w'] + p['b']
  x = jnp.arange(12.0).reshape(4, 3) / 10
  y = jnp.ones((4, 2))
  state = train_state.TrainState.create(apply_fn=apply_fn, params=params,
                                        tx=fop_optax.fop(0.05))

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  before = float(jnp.mean((apply_fn(state.params, x) - y) ** 2))
  for _ in range(200):
    state = step(state)
  after = float(jnp.mean((apply_fn(state.params, x) - y) ** 2))
  assert after < 0.05 * before
