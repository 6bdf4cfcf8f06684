"""one_pass_hpo: the hypergradient against autodiff and the implicit-function oracle, learning, contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from optax._src import test_utils

import fop_optax

LN10 = np.log(10.0)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _mlp_problem(dtype=jnp.float64):
  keys = jax.random.split(jax.random.key(0), 4)
  x, xv = (jax.random.normal(k, (32, 3), dtype) for k in keys[:2])
  y, yv = jnp.sin(x[:, :1]), jnp.sin(xv[:, :1])
  params = {'w1': 0.5 * jax.random.normal(keys[2], (3, 4), dtype), 'b1': jnp.zeros(4, dtype),
            'w2': 0.5 * jax.random.normal(keys[3], (4, 1), dtype)}

  def loss(p, x, y):
    h = jnp.tanh(x @ p['w1'] + p['b1'])
    return jnp.mean((h @ p['w2'] - y) ** 2)

  return params, (lambda p: loss(p, x, y)), (lambda p: loss(p, xv, yv))


def _times(h, tree):
  if isinstance(h, dict):
    return jax.tree.map(lambda a, x: a * x, h, tree)
  return jax.tree.map(lambda x: h * x, tree)


def _update_map(train_loss, b_prev, learned, fixed):
  """u(w, raw) = η(μ b_{t−1} + ∇L_T(w) + ω w), written independently of the package."""
  def u(w, raw):
    eta = jax.tree.map(lambda r: 10.0 ** r, raw['learning_rate']) if 'learning_rate' in raw \
        else fixed['learning_rate']
    mu = jax.tree.map(jax.nn.sigmoid, raw['momentum']) if 'momentum' in raw else fixed['momentum']
    wd = jax.tree.map(lambda r: 10.0 ** r, raw['weight_decay']) if 'weight_decay' in raw \
        else fixed['weight_decay']
    b = optax.tree.add(_times(mu, b_prev), optax.tree.add(jax.grad(train_loss)(w), _times(wd, w)))
    return _times(eta, b)
  return u


def _oracle(u, w, raw, val_loss, terms=None):
  """−pᵀ ∂u/∂raw with p from a dense Jacobian: K Neumann terms, or the exact inverse (None)."""
  return jax.jit(lambda w, raw: _oracle_body(u, w, raw, val_loss, terms))(w, raw)


def _oracle_body(u, w, raw, val_loss, terms):
  flat_w, unravel = ravel_pytree(w)
  jac = jax.jacobian(lambda f: ravel_pytree(u(unravel(f), raw))[0])(flat_w)
  v = ravel_pytree(jax.grad(val_loss)(optax.tree.sub(w, u(w, raw))))[0]
  if terms is None:
    p = jnp.linalg.solve(jac.T, v)  # p = v J⁻¹
  else:
    p = term = v
    for _ in range(terms - 1):
      term = term - term @ jac
      p = p + term
  _, vjp = jax.vjp(lambda r: u(w, r), raw)
  return jax.tree.map(lambda x: -x, vjp(unravel(p))[0])


def _jit_update(tx, train_loss, val_loss):
  return jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=train_loss,
                                           validation_value_fn=val_loss))


def _hyper_step(tx, params, train_loss, val_loss, steps):
  """Runs ``steps`` updates; returns the state and params before the last one and the new state."""
  state = tx.init(params)
  update = _jit_update(tx, train_loss, val_loss)
  for _ in range(steps):
    before, w = state, params
    updates, state = update(jax.grad(train_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return before, w, state


def _rel_err(a, b):
  fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.max(jnp.abs(fa - fb)) / jnp.max(jnp.abs(fb)))


@pytest.mark.parametrize('per_parameter, terms', [
    ((), 4), (('learning_rate',), 1), (('learning_rate', 'momentum', 'weight_decay'), 4)])
def test_closed_forms_equal_vjp_of_update_map(x64, per_parameter, terms):
  params, train_loss, val_loss = _mlp_problem()
  tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=3, neumann_terms=terms,
                              per_parameter=per_parameter)
  before, w, after = _hyper_step(tx, params, train_loss, val_loss, steps=3)
  assert not any(bool(jnp.all(x == 0)) for x in jax.tree.leaves(after.hypergradient))
  u = _update_map(train_loss, before.momentum, before.raw_hyperparams, before.hyperparams)
  want = _oracle(u, w, before.raw_hyperparams, val_loss, terms)
  assert jax.tree.structure(after.hypergradient) == jax.tree.structure(want)
  assert _rel_err(after.hypergradient, want) < 1e-12
  # Per name too: a small hyperparameter's gradient must not hide behind a large one.
  for name in want:
    assert _rel_err(after.hypergradient[name], want[name]) < 1e-10, name


def test_learning_only_some_hyperparameters(x64):
  params, train_loss, val_loss = _mlp_problem()
  tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, learn=('weight_decay',), period=2, neumann_terms=3)
  before, w, after = _hyper_step(tx, params, train_loss, val_loss, steps=2)
  assert set(after.raw_hyperparams) == {'weight_decay'}
  assert float(after.hyperparams['learning_rate']) == 0.1
  assert float(after.hyperparams['momentum']) == 0.7
  assert float(after.hyperparams['weight_decay']) != 1e-3
  u = _update_map(train_loss, before.momentum, before.raw_hyperparams, before.hyperparams)
  want = _oracle(u, w, before.raw_hyperparams, val_loss, 3)
  assert _rel_err(after.hypergradient, want) < 1e-12


def _quadratic(n=6):
  """L_T = ½wᵀAw − cᵀw with eig(A) in [1, 3]; L_V = ½‖w − w_v‖²."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = jnp.asarray(q @ np.diag(np.linspace(1.0, 3.0, n)) @ q.T)
  c, w_v = jnp.asarray(rng.normal(size=n)), jnp.asarray(rng.normal(size=n))
  train_loss = lambda w: 0.5 * w @ a @ w - c @ w
  val_loss = lambda w: 0.5 * jnp.sum((w - w_v) ** 2)
  return a, c, train_loss, val_loss


def test_neumann_converges_to_implicit_hypergradient_at_fixed_point(x64):
  """At w* = (A + ωI)⁻¹c, dL_V(w*(ω))/d log₁₀ω is known; K terms converge to it geometrically."""
  a, c, train_loss, val_loss = _quadratic()
  eta, mu, wd = 0.4, 0.5, 0.05  # eig(η(A + ωI)) in [0.42, 1.22]: the series converges

  def val_at_fixed_point(log_wd):
    return val_loss(jnp.linalg.solve(a + 10.0 ** log_wd * jnp.eye(len(c)), c))

  exact = jax.grad(val_at_fixed_point)(jnp.log10(wd))
  w_star = jnp.linalg.solve(a + wd * jnp.eye(len(c)), c)
  errors = []
  for terms in (1, 4, 60):
    tx = fop_optax.one_pass_hpo(eta, mu, wd, period=1, neumann_terms=terms)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=train_loss,
                                               validation_value_fn=val_loss))
    updates, state = update(jax.grad(train_loss)(w_star), tx.init(w_star), w_star)
    assert float(jnp.max(jnp.abs(updates))) < 1e-14  # a fixed point indeed
    # η and μ do not move the fixed point: their implicit hypergradients are 0.
    assert abs(float(state.hypergradient['learning_rate'])) < 1e-14
    assert abs(float(state.hypergradient['momentum'])) < 1e-14
    errors.append(abs(float(state.hypergradient['weight_decay'] - exact)) / abs(float(exact)))
  assert errors[0] > 1e-2, errors  # one term is a poor estimate: the test can fail
  assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-10, errors


def test_neumann_converges_to_dense_inverse_away_from_fixed_point(x64):
  """Anywhere, p → vJ⁻¹: all three hypergradients approach −vJ⁻¹∂u/∂λ (dense solve)."""
  a, c, train_loss, val_loss = _quadratic()
  w = jnp.linspace(-1.0, 1.0, len(c))
  tx_args = dict(learning_rate=0.4, momentum=0.5, weight_decay=0.05, period=2)
  errors = []
  for terms in (1, 5, 60):
    tx = fop_optax.one_pass_hpo(**tx_args, neumann_terms=terms)
    before, w1, after = _hyper_step(tx, w, train_loss, val_loss, steps=2)
    u = _update_map(train_loss, before.momentum, before.raw_hyperparams, before.hyperparams)
    errors.append(_rel_err(after.hypergradient, _oracle(u, w1, before.raw_hyperparams, val_loss)))
  assert errors[0] > 1e-2 and errors[-1] < 1e-10, errors
  assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors


def _regression(n=256, d=8, seed=0):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=(d, 1))
  x = rng.normal(size=(2 * n, d)).astype(np.float32)
  y = (x @ w_true + 0.3 * rng.normal(size=(2 * n, 1))).astype(np.float32)
  return (jnp.asarray(x[:n]), jnp.asarray(y[:n])), (jnp.asarray(x[n:]), jnp.asarray(y[n:]))


def _run(tx, params, train, val, steps, batch=32, hyperparams=lambda s: s.hyperparams):
  (x, y), (xv, yv) = train, val
  loss = lambda p, x, y: jnp.mean((x @ p['w'] + p['b'] - y) ** 2)
  n = x.shape[0] // batch

  def step(carry, i):
    params, state = carry
    j = (i % n) * batch
    xb, yb = jax.lax.dynamic_slice_in_dim(x, j, batch), jax.lax.dynamic_slice_in_dim(y, j, batch)
    k = ((i * 7) % n) * batch
    xvb, yvb = (jax.lax.dynamic_slice_in_dim(xv, k, batch),
                jax.lax.dynamic_slice_in_dim(yv, k, batch))
    grads = jax.grad(loss)(params, xb, yb)
    updates, state = tx.update(grads, state, params,
                               value_fn=lambda p: loss(p, xb, yb),
                               validation_value_fn=lambda p: loss(p, xvb, yvb))
    return (optax.apply_updates(params, updates), state), hyperparams(state)['learning_rate']

  (params, state), rates = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))(
      (params, tx.init(params)))
  return params, state, rates, float(loss(params, xv, yv))


def test_learning_rate_rises_from_far_too_small_and_beats_fixed_sgd():
  train, val = _regression()
  params = {'w': jnp.zeros((8, 1)), 'b': jnp.zeros(1)}
  kw = dict(learning_rate=1e-5, momentum=0.5, weight_decay=1e-4)
  _, state, rates, val_hpo = _run(fop_optax.one_pass_hpo(**kw), params, train, val, steps=1500)
  _, _, fixed_rates, val_sgd = _run(fop_optax.one_pass_hpo(**kw, learn=()), params, train, val,
                                    steps=1500)
  assert float(fixed_rates[-1]) == pytest.approx(1e-5)
  initial = float(jnp.mean(val[1] ** 2))  # validation loss at w = 0
  lr = float(state.hyperparams['learning_rate'])
  # Adam(0.05) on log₁₀η moves it by ≲0.05 per period: 150 periods allow up to ~10^7.5×.
  assert lr > 1e-3, lr                          # rose by more than 100×
  assert np.all(np.diff(np.asarray(rates)[:200:10]) > 0)  # and rose from the start
  assert val_sgd > 0.8 * initial                # fixed SGD at 1e-5 barely moved
  assert val_hpo < 0.2 * val_sgd, (val_hpo, val_sgd)
  assert int(state.skipped_steps) == 0 and int(state.skipped_hypersteps) == 0


def test_fixed_hyperparameters_equal_optax_sgd():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, learn=())
  ref = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.7))
  state, ref_state, p, q = tx.init(params), ref.init(params), params, params
  update = _jit_update(tx, train_loss, val_loss)
  for _ in range(12):  # crosses a hyper step (count 9), which must change nothing
    u, state = update(jax.grad(train_loss)(p), state, p)
    r, ref_state = ref.update(jax.grad(train_loss)(q), ref_state, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, r)
  test_utils.assert_trees_all_close(p, q, rtol=1e-6, atol=1e-7)
  assert int(state.count) == 12


def test_hyperparameters_change_only_on_the_last_step_of_each_period():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=4, per_parameter=('learning_rate',))
  ref = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.7))
  state, ref_state, p, q = tx.init(params), ref.init(params), params, params
  history = [state.hyperparams]
  update = _jit_update(tx, train_loss, val_loss)
  for i in range(8):
    u, state = update(jax.grad(train_loss)(p), state, p)
    p = optax.apply_updates(p, u)
    if i < 4:  # the first period's steps (the hyper step included) are plain SGD
      r, ref_state = ref.update(jax.grad(train_loss)(q), ref_state, q)
      q = optax.apply_updates(q, r)
      test_utils.assert_trees_all_close(p, q, rtol=1e-6, atol=1e-7)
    history.append(state.hyperparams)
  changed = [not all(bool(jnp.all(a == b)) for a, b in
                     zip(jax.tree.leaves(history[i]), jax.tree.leaves(history[i + 1])))
             for i in range(8)]
  assert changed == [False, False, False, True] * 2
  # Per-parameter rates are params-shaped and actually differ between elements.
  lr = state.hyperparams['learning_rate']
  assert jax.tree.map(jnp.shape, lr) == jax.tree.map(jnp.shape, params)
  assert float(jnp.std(lr['w1'])) > 0
  assert float(jnp.max(lr['w1'])) <= 1.0


def test_zero_weight_decay_stays_zero():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  tx = fop_optax.one_pass_hpo(0.1, 0.7)
  _, _, state = _hyper_step(tx, params, train_loss, val_loss, steps=10)
  assert set(state.raw_hyperparams) == {'learning_rate', 'momentum'}
  assert float(state.hyperparams['weight_decay']) == 0.0
  assert float(state.hyperparams['learning_rate']) != pytest.approx(0.1)


def test_learning_rate_clipped_to_bounds():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  tx = fop_optax.one_pass_hpo(0.1, 0.7, learn=('learning_rate',), period=1,
                              hyper_optimizer=optax.sgd(1e6), learning_rate_bounds=(0.01, 0.2))
  _, _, state = _hyper_step(tx, params, train_loss, val_loss, steps=3)
  lr = float(state.hyperparams['learning_rate'])
  assert lr in (pytest.approx(0.01), pytest.approx(0.2)), lr


# ----------------------------------------------------------------------------- errors

def test_missing_closures_and_params_raise_clear_errors():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  tx = fop_optax.one_pass_hpo(0.1)
  state, grads = tx.init(params), jax.grad(train_loss)(params)
  with pytest.raises(TypeError, match='validation_value_fn'):
    tx.update(grads, state, params, value_fn=train_loss)
  with pytest.raises(TypeError, match=r'needs value_fn=\.\.\., validation_value_fn=\.\.\.'):
    tx.update(grads, state, params)
  with pytest.raises(TypeError, match='needs params'):
    tx.update(grads, state, None, value_fn=train_loss, validation_value_fn=val_loss)
  with pytest.raises(TypeError, match='value_fn must be a callable'):
    tx.update(grads, state, params, value_fn=1.0, validation_value_fn=val_loss)
  with pytest.raises(TypeError, match='floating-point'):
    tx.init({'w': jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize('kwargs, match', [
    (dict(learning_rate=0.0), 'learning_rate must be'),
    (dict(learning_rate=float('nan')), 'learning_rate must be finite'),
    (dict(learning_rate=2.0), 'outside learning_rate_bounds'),
    (dict(learning_rate=optax.constant_schedule(0.1)), 'not a schedule'),
    (dict(learning_rate=jnp.ones(3)), 'must be a scalar'),
    (dict(learning_rate=0.1, momentum=0.0), r'start in \(0, 1\)'),
    (dict(learning_rate=0.1, momentum=1.0, learn=()), 'momentum must be < 1'),
    (dict(learning_rate=0.1, weight_decay=-1.0), 'weight_decay must be'),
    (dict(learning_rate=0.1, learn=('lr',)), 'unknown names'),
    (dict(learning_rate=0.1, learn='learning_rate'), 'not a string'),
    (dict(learning_rate=0.1, learn=('momentum',), per_parameter=('learning_rate',)),
     'not in learn'),
    (dict(learning_rate=0.1, period=0), 'period must be'),
    (dict(learning_rate=0.1, neumann_terms=1.5), 'neumann_terms must be'),
    (dict(learning_rate=0.1, learning_rate_bounds=(0.0, 1.0)), 'learning_rate_bounds'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fop_optax.one_pass_hpo(**kwargs)


# ----------------------------------------------------------------------------- contract

def _jitted_step(tx, loss):
  @jax.jit
  def step(params, state, batch, val_batch):
    grads = jax.grad(loss)(params, *batch)
    updates, state = tx.update(grads, state, params,
                               value_fn=lambda p: loss(p, *batch),
                               validation_value_fn=lambda p: loss(p, *val_batch))
    return optax.apply_updates(params, updates), state
  return step


def _mlp_loss(p, x, y):
  h = jnp.tanh(x @ p['w1'].astype(jnp.float32) + p['b1'].astype(jnp.float32))
  return jnp.mean((h @ p['w2'].astype(jnp.float32) - y) ** 2)


def test_jit_does_not_recompile_across_hyper_steps():
  params, _, _ = _mlp_problem(jnp.float32)
  x = jax.random.normal(jax.random.key(1), (6, 32, 3))
  batches = [(x[i], jnp.sin(x[i][:, :1])) for i in range(6)]
  tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=2, per_parameter=('learning_rate',))
  step = _jitted_step(tx, _mlp_loss)
  params, state = step(params, tx.init(params), batches[0], batches[1])
  with test_utils.log_compilations() as logs:
    for i in range(1, 5):  # hyper steps at counts 1 and 3
      params, state = step(params, state, batches[i], batches[i + 1])
  assert not logs, 'recompiled'
  assert int(state.count) == 5
  # Unknown extra arguments are accepted, as GradientTransformationExtraArgs.
  tx.update(jax.grad(_mlp_loss)(params, *batches[0]), state, params, unexpected=1,
            value_fn=lambda p: _mlp_loss(p, *batches[0]),
            validation_value_fn=lambda p: _mlp_loss(p, *batches[1]))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32', 'float64'])
def test_dtypes_kept_and_state_stable(dtype):
  with jax.enable_x64(dtype == 'float64'):
    base, _, _ = _mlp_problem(jnp.float32)
    params = jax.tree.map(lambda x: x.astype(dtype), base)
    x = jax.random.normal(jax.random.key(1), (32, 3))
    batch = (x, jnp.sin(x[:, :1]))
    tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=1, per_parameter=('learning_rate',))
    state = tx.init(params)
    grads = jax.grad(_mlp_loss)(params, *batch)
    kw = dict(value_fn=lambda p: _mlp_loss(p, *batch), validation_value_fn=lambda p: _mlp_loss(p, *batch))
    updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(grads, state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype and u.shape == p.shape
    dtypes = lambda s: jax.tree.map(lambda x: jnp.asarray(x).dtype, s)
    assert dtypes(new_state) == dtypes(state)
    want = jnp.float64 if dtype == 'float64' else jnp.float32
    assert all(h.dtype == want for h in jax.tree.leaves(new_state.hyperparams))
    assert all(m.dtype == jnp.dtype(dtype) for m in jax.tree.leaves(new_state.momentum))
    assert all(bool(jnp.all(jnp.isfinite(h))) for h in jax.tree.leaves(new_state.hypergradient))
    assert new_state.hyperparams['learning_rate']['w1'][0, 0] != 0.1  # the hyper step ran

    if dtype == 'float32':  # inside lax.cond both branches must give identical state types
      @jax.jit
      def maybe_update(flag, state):
        return jax.lax.cond(flag, lambda s: tx.update(grads, s, params, **kw)[1], lambda s: s,
                            state)
      maybe_update(True, state)


def test_nonfinite_gradients_skip_the_step_and_nonfinite_hypergradients_the_hyper_step():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=2)
  state = tx.init(params)
  grads = jax.grad(train_loss)(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  kw = dict(value_fn=train_loss, validation_value_fn=val_loss)
  updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  test_utils.assert_trees_all_equal(
      new_state._replace(skipped_steps=state.skipped_steps, count=state.count), state)
  assert int(new_state.skipped_steps) == 1 and int(new_state.count) == 1
  # A validation loss that is NaN: the weight step happens, the hyperparameters stay.
  nan_val = lambda p: val_loss(p) * jnp.nan
  updates, state = tx.update(grads, new_state, params, value_fn=train_loss,
                             validation_value_fn=nan_val)  # count 1: the hyper step
  assert int(state.count) == 2 and int(state.skipped_hypersteps) == 1
  assert all(bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0))
             for u in jax.tree.leaves(updates))
  assert float(state.hyperparams['learning_rate']) == pytest.approx(0.1)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_vmap_over_initial_hyperparameters_matches_separate_runs():
  """Random-init studies vmap over inits with ``count`` unbatched, which keeps the cond."""
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  lrs, mus, wds = jnp.array([0.05, 0.2]), jnp.array([0.3, 0.8]), jnp.array([1e-4, 1e-2])
  make = lambda lr, mu, wd: fop_optax.one_pass_hpo(lr, mu, wd, period=2)
  states = jax.vmap(lambda lr, mu, wd: make(lr, mu, wd).init(params))(lrs, mus, wds)
  states = states._replace(count=states.count[0])
  axes = jax.tree.map(lambda _: 0, states)._replace(count=None)
  kw = dict(value_fn=train_loss, validation_value_fn=val_loss)

  def step(p, s):
    u, s = make(0.1, 0.5, 1e-3).update(jax.grad(train_loss)(p), s, p, **kw)
    return optax.apply_updates(p, u), s

  vstep = jax.vmap(step, in_axes=(0, axes), out_axes=(0, axes))
  batched = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  assert 'cond[' in str(jax.make_jaxpr(vstep)(batched, states))  # not turned into a select
  run = jax.jit(lambda p, s: jax.lax.fori_loop(0, 4, lambda _, c: vstep(*c), (p, s)))
  _, vstates = run(batched, states)
  for i in (1,):  # the second init: its values, not the first's, reached it
    _, _, single = _hyper_step(make(lrs[i], mus[i], wds[i]), params, train_loss, val_loss, 4)
    test_utils.assert_trees_all_close(
        jax.tree.map(lambda x: x[i], vstates.hyperparams), single.hyperparams, rtol=1e-5)


def test_flax_nnx_optimizer():
  from flax import nnx

  import nnx_mlp

  keys = jax.random.split(jax.random.key(0), 2)
  x, xv = (jax.random.normal(k, (64, 4)) for k in keys)
  target = nnx_mlp.target
  model = nnx_mlp.MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, fop_optax.one_pass_hpo(0.01, 0.5, period=5), wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def mse(model, x):
    return jnp.mean((model(x) - target(x)) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    value, grads = nnx.value_and_grad(mse)(model, x)
    # tx.update sees the parameters as a pure state: rebuild the model from it.
    as_model = lambda p: nnx.merge(graphdef, p, rest)
    optimizer.update(model, grads, value_fn=lambda p: mse(as_model(p), x),
                     validation_value_fn=lambda p: mse(as_model(p), xv))
    return value

  first = float(train_step(model, optimizer))
  for _ in range(200):
    last = float(train_step(model, optimizer))
  assert last < 0.5 * first, (first, last)
  assert float(optimizer.opt_state.hyperparams['learning_rate'][...]) > 0.01


# ----------------------------------------------------------------------------- any injected optimiser

def _sgd_factory(learning_rate, momentum, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum))


def test_injected_sgd_equals_one_pass_hpo(x64):
  """jax.vjp through an inject_hyperparams SGD gives one_pass_hpo's closed-form hypergradients."""
  params, train_loss, val_loss = _mlp_problem()
  opt = optax.inject_hyperparams(_sgd_factory)(learning_rate=0.1, momentum=0.7, weight_decay=1e-3)
  injected = fop_optax.one_pass_hpo_injected(
      opt, learn=('learning_rate', 'momentum', 'weight_decay'), period=3, neumann_terms=4)
  closed = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=3, neumann_terms=4)
  _, _, a = _hyper_step(injected, params, train_loss, val_loss, steps=6)
  _, _, b = _hyper_step(closed, params, train_loss, val_loss, steps=6)
  assert _rel_err(a.hypergradient, b.hypergradient) < 1e-10
  for name in ('learning_rate', 'momentum', 'weight_decay'):
    np.testing.assert_allclose(a.inner_state.hyperparams[name], b.hyperparams[name], rtol=1e-10)
  assert float(a.inner_state.hyperparams['learning_rate']) != 0.1


def _inner_hp(state):
  return state.inner_state.hyperparams


def test_injected_adam_learning_rate_rises_from_far_too_small():
  train, val = _regression()
  params = {'w': jnp.zeros((8, 1)), 'b': jnp.zeros(1)}
  make = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-5)
  tx = fop_optax.one_pass_hpo_injected(make(), learn=('learning_rate',))
  _, state, _, val_hpo = _run(tx, params, train, val, steps=600, hyperparams=_inner_hp)
  fixed = fop_optax.one_pass_hpo_injected(make(), learn=('learning_rate',), hyper_learning_rate=0.0)
  _, _, _, val_fixed = _run(fixed, params, train, val, steps=600, hyperparams=_inner_hp)
  assert float(state.inner_state.hyperparams['learning_rate']) > 1e-3
  assert val_hpo < 0.2 * val_fixed, (val_hpo, val_fixed)


def test_injected_errors():
  params, train_loss, val_loss = _mlp_problem(jnp.float32)
  with pytest.raises(TypeError, match='inject_hyperparams'):
    fop_optax.one_pass_hpo_injected(optax.adam(0.1)).init(params)
  opt = optax.inject_hyperparams(optax.adam)(learning_rate=optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match='schedules'):
    fop_optax.one_pass_hpo_injected(opt).init(params)
  opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
  with pytest.raises(ValueError, match='not hyperparameters'):
    fop_optax.one_pass_hpo_injected(opt, learn=('momentum',)).init(params)
  with pytest.raises(ValueError, match='unknown coordinates'):
    fop_optax.one_pass_hpo_injected(opt, learn={'b1': 'sqrt'})
  tx = fop_optax.one_pass_hpo_injected(opt)
  with pytest.raises(TypeError, match='validation_value_fn'):
    tx.update(jax.grad(train_loss)(params), tx.init(params), params, value_fn=train_loss)


def _one_pass_study():
  """examples/one_pass_study.py as a module (the root is on sys.path: pytest's pythonpath)."""
  from examples import one_pass_study  # pylint: disable=import-outside-toplevel
  return one_pass_study


def test_study_example_smoke(tmp_path):
  """examples/one_pass_study.py runs end to end (diabetes, 2 inits, 30 steps) and redraws from JSON."""
  import json
  import os
  one_pass_study = _one_pass_study()
  out, img = str(tmp_path / 'r.json'), str(tmp_path / 'r.png')
  args = ['diabetes', '--inits', '2', '--steps', '30', '--evals', '2', '--methods',
          'fixed,one_pass_pp', '--out', out, '--img', img]
  one_pass_study.main(args)
  saved = json.load(open(out))
  assert set(saved['results']) == {'fixed', 'one_pass_pp'}
  assert len(saved['results']['fixed']['final']['test_loss']) == 2
  assert os.path.getsize(img) > 0
  os.remove(img)
  one_pass_study.main(args + ['--plot-only'])
  assert os.path.getsize(img) > 0


def test_study_reads_the_hd_learning_rate_from_the_state():
  """one_pass_study's 'hd' row reports the η that sgd_hd's state holds, one per init."""
  one_pass_study = _one_pass_study()
  h = {'learning_rate': jnp.array([0.01, 0.02]), 'momentum': jnp.array([0.5, 0.6]),
       'weight_decay': jnp.array([1e-4, 1e-3])}
  params = {'w': jnp.ones((2, 3, 4)), 'b': jnp.zeros((2, 4))}
  state = jax.vmap(lambda hi, p: one_pass_study.make_tx('hd', hi).init(p))(h, params)
  got = one_pass_study.current_hyperparams('hd', state, h)
  np.testing.assert_allclose(got['learning_rate'], [0.01, 0.02])
  assert got['momentum'] is h['momentum']


def test_closures_renamed_in_0_2_raise_a_clear_error():
  """``train_loss_fn``/``val_loss_fn`` (before 0.2) would be swallowed as extra args: refused."""
  params = {'w': jnp.ones(3)}
  loss = lambda p: jnp.sum(p['w'] ** 2)
  for tx in (fop_optax.one_pass_hpo(0.1), fop_optax.one_pass_hpo_injected(
      optax.inject_hyperparams(optax.sgd)(0.1))):
    with pytest.raises(TypeError, match='renamed in 0.2.*value_fn=.*validation_value_fn='):
      tx.update(params, tx.init(params), params, train_loss_fn=loss, val_loss_fn=loss)
