"""AdamQLR / scale_by_qlr: the step size formula, the damping rule and the optax contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from optax._src import test_utils

import fop_optax


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _least_squares():
  k = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k[0], (20, 4), jnp.float64)
  y = jax.random.normal(k[1], (20, 2), jnp.float64)
  params = {'w': jax.random.normal(k[2], (4, 2), jnp.float64), 'b': jnp.zeros(2, jnp.float64)}
  model_fn = lambda p: x @ p['w'] + p['b']
  loss_fn = lambda z: jnp.mean((z - y) ** 2)
  value_fn = lambda p: loss_fn(model_fn(p))
  return params, model_fn, loss_fn, value_fn


@pytest.mark.parametrize('mode', ['ggn_named', 'ggn_callable', 'hessian'])
@pytest.mark.parametrize('direction', ['adam', 'sgd'])
def test_zero_damping_lands_on_the_line_minimum(x64, mode, direction):
  """Linear least squares: one undamped step is the exact minimum along d.

  Checked independently of the formula: the new gradient is orthogonal to d
  (the line minimum of a convex quadratic), the loss there is below the loss
  a little either side, and ρ = 1 (the model is exact), so λ shrinks.
  """
  params, model_fn, loss_fn, value_fn = _least_squares()
  tx = fop_optax.scale_by_qlr(
      None if direction == 'adam' else optax.identity(),
      curvature='hessian' if mode == 'hessian' else 'ggn',
      initial_damping=0.0, min_damping=0.0)
  state = tx.init(params)
  value, grads = jax.value_and_grad(value_fn)(params)
  updates, state = tx.update(
      grads, state, params, value=value, value_fn=value_fn, model_fn=model_fn,
      loss_fn='mse' if mode == 'ggn_named' else loss_fn)
  new = optax.apply_updates(params, updates)
  d = jax.tree.map(lambda u: u / state.step_size, updates)
  slope = optax.tree.vdot(jax.grad(value_fn)(new), d)
  assert abs(float(slope)) < 1e-10 * float(optax.tree.norm(grads) * optax.tree.norm(d))
  assert float(state.step_size) < 0  # d points along +g
  for eps in (1e-3, -1e-3):
    assert value_fn(new) < value_fn(optax.apply_updates(new, optax.tree.scale(eps, d)))
  np.testing.assert_allclose(state.rho, 1.0, rtol=1e-9)
  assert float(state.damping) == 0.0  # 0·ω_dec with min_damping 0: undamped stays undamped


def test_step_size_equals_formula_on_an_mlp(x64):
  """α = −gᵀd/(dᵀGd + λ‖d‖²) with G from the dense Jacobian, d = Adam's first direction."""
  k = jax.random.split(jax.random.key(0), 4)
  params = {'w1': jax.random.normal(k[0], (3, 6), jnp.float64),
            'w2': jax.random.normal(k[1], (6, 4), jnp.float64)}
  x = jax.random.normal(k[2], (10, 3), jnp.float64)
  labels = jax.random.randint(k[3], (10,), 0, 4)
  model_fn = lambda p: jnp.tanh(x @ p['w1']) @ p['w2']
  loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  value_fn = lambda p: loss_fn(model_fn(p))
  lam = 0.3
  tx = fop_optax.adam_qlr(initial_damping=lam, skip_nonfinite=False)
  value, grads = jax.value_and_grad(value_fn)(params)
  updates, state = tx.update(grads, tx.init(params), params, value=value, value_fn=value_fn,
                             model_fn=model_fn, loss_fn='softmax_cross_entropy')
  flat, unravel = ravel_pytree(params)
  g = ravel_pytree(grads)[0]
  d = g / (jnp.abs(g) + 1e-8)  # Adam's first step: m̂/(√v̂ + ε) = g/(|g| + ε)
  jac = jax.jacfwd(lambda f: model_fn(unravel(f)).reshape(-1))(flat)
  z = model_fn(params)
  p = jax.nn.softmax(z)
  hz = jax.scipy.linalg.block_diag(*[jnp.diag(pi) - jnp.outer(pi, pi) for pi in p]) / 10
  ggn = jac.T @ hz @ jac
  alpha = -(g @ d) / (d @ ggn @ d + lam * d @ d)
  np.testing.assert_allclose(state.step_size, alpha, rtol=1e-10)
  np.testing.assert_allclose(ravel_pytree(updates)[0], alpha * d, rtol=1e-10)
  # ρ from the same numbers
  predicted = alpha * (g @ d) + 0.5 * alpha ** 2 * (d @ ggn @ d + lam * d @ d)
  rho = (value_fn(unravel(flat + alpha * d)) - value) / predicted
  np.testing.assert_allclose(state.rho, rho, rtol=1e-9)
  np.testing.assert_allclose(state.curvature, d @ ggn @ d, rtol=1e-10)


def _one_step_damping(value_fn, params, **kw):
  tx = fop_optax.scale_by_qlr(optax.identity(), **kw)
  value, grads = jax.value_and_grad(value_fn)(params)
  _, state = tx.update(grads, tx.init(params), params, value=value, value_fn=value_fn,
                       model_fn=lambda p: p, loss_fn=value_fn)
  return state


def test_damping_moves_both_ways(x64):
  # A quadratic: the model is exact, ρ = 1 > 3/4, λ ← ω_dec·λ.
  quadratic = lambda p: jnp.sum(jnp.array([1.0, 4.0]) * p ** 2)
  state = _one_step_damping(quadratic, jnp.array([1.0, -1.0]), initial_damping=0.1)
  np.testing.assert_allclose(state.rho, 1.0 + 0 * state.rho, rtol=0.2)
  np.testing.assert_allclose(state.damping, 0.05, rtol=1e-12)
  # log(1 + θ²) at θ = 1 has zero curvature: the tiny damping makes a huge step
  # that raises the loss, ρ < 0 < 1/4, λ ← ω_inc·λ.
  flat = lambda p: jnp.sum(jnp.log1p(p ** 2))
  state = _one_step_damping(flat, jnp.array([1.0]), initial_damping=1e-3)
  assert float(state.rho) < 0.25, state.rho
  np.testing.assert_allclose(state.damping, 2e-3, rtol=1e-12)
  # θ⁴/4 from θ = 1 (g = 1, H = 3): the Newton step to 2/3 decreases more than
  # predicted, ρ = (0.0494 − 0.25)/(−1/6) ≈ 1.2; with λ = 0 and no floor λ stays 0.
  quartic = lambda p: jnp.sum(p ** 4) / 4
  state = _one_step_damping(quartic, jnp.array([1.0]), initial_damping=0.0, min_damping=0.0)
  np.testing.assert_allclose(state.rho, (0.25 * (2 / 3) ** 4 - 0.25) / (-1 / 6), rtol=1e-9)
  assert float(state.damping) == 0.0
  # custom factors are used as given, and λ ≥ min_damping
  state = _one_step_damping(quadratic, jnp.array([1.0, -1.0]), initial_damping=1e-8,
                            damping_decrease=0.1)
  np.testing.assert_allclose(state.damping, 1e-8)


def test_decreasing_loss_rule_rejects_a_step_that_raises_the_loss(x64):
  flat = lambda p: jnp.sum(jnp.log1p(p ** 2))
  params = jnp.array([1.0])
  for f, start, accepted in ((flat, params, False),
                             (lambda p: jnp.sum(p ** 2), params, True)):
    tx = fop_optax.scale_by_qlr(optax.scale_by_adam(), initial_damping=1e-3,
                                damping_decrease=0.9, damping_increase=2.0,
                                damping_rule='decreasing_loss')
    state = tx.init(start)
    value, grads = jax.value_and_grad(f)(start)
    updates, new_state = tx.update(grads, state, start, value=value, value_fn=f,
                                   model_fn=lambda p: p, loss_fn=f)
    if accepted:
      assert float(f(start + updates)) < float(value)
      np.testing.assert_allclose(new_state.damping, 0.9e-3, rtol=1e-12)
      assert int(new_state.direction_state.count) == 1
    else:  # zero update, Adam's moments as they were, λ doubled
      assert float(jnp.abs(updates).max()) == 0.0
      np.testing.assert_allclose(new_state.damping, 2e-3, rtol=1e-12)
      test_utils.assert_trees_all_close(new_state.direction_state, state.direction_state)


def test_damping_stays_between_the_thresholds(x64):
  # f = θ²/2 + c·θ³ from θ = 1: ρ is a smooth function of c; pick c with ρ in (1/4, 3/4).
  def run(c):
    f = lambda p: jnp.sum(0.5 * p ** 2 + c * p ** 3)
    return _one_step_damping(f, jnp.array([1.0]), initial_damping=0.5, curvature='hessian')
  middle = [c for c in np.linspace(-0.3, 0.3, 61) if 0.3 < float(run(c).rho) < 0.7]
  assert middle, 'no c gave ρ between the thresholds'
  state = run(middle[0])
  np.testing.assert_allclose(state.damping, 0.5, rtol=1e-12)


def test_missing_closures_raise_clear_errors(x64):
  params, model_fn, loss_fn, value_fn = _least_squares()
  grads = jax.grad(value_fn)(params)
  tx = fop_optax.adam_qlr()
  state = tx.init(params)
  with pytest.raises(ValueError, match='needs value_fn='):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match='needs model_fn='):
    tx.update(grads, state, params, value_fn=value_fn)
  with pytest.raises(ValueError, match='needs loss_fn='):
    tx.update(grads, state, params, value_fn=value_fn, model_fn=model_fn)
  with pytest.raises(TypeError, match='value_fn must be a callable'):
    tx.update(grads, state, params, value_fn=1.0, model_fn=model_fn, loss_fn='mse')
  with pytest.raises(ValueError, match='loss_fn must be a callable or one of'):
    tx.update(grads, state, params, value_fn=value_fn, model_fn=model_fn, loss_fn='ce')
  # the Hessian mode needs only value_fn
  tx_h = fop_optax.adam_qlr(curvature='hessian')
  tx_h.update(grads, tx_h.init(params), params, value_fn=value_fn)
  with pytest.raises(ValueError, match='curvature must be one of'):
    fop_optax.scale_by_qlr(curvature='fisher')
  with pytest.raises(ValueError, match='initial_damping must be finite'):
    fop_optax.adam_qlr(initial_damping=float('nan'))
  with pytest.raises(ValueError, match='damping_decrease must be <= 1'):
    fop_optax.adam_qlr(damping_decrease=2.0)


def _mlp_problem():
  k = jax.random.split(jax.random.key(1), 4)
  params = {'w1': 0.5 * jax.random.normal(k[0], (5, 16)), 'b1': jnp.zeros(16),
            'w2': 0.5 * jax.random.normal(k[1], (16, 3)), 'b2': jnp.zeros(3)}
  x = jax.random.normal(k[2], (64, 5))
  labels = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
  model = lambda p, x: jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
  return params, x, labels, model


def test_jit_no_recompilation_trains_and_skips_nonfinite():
  params, x, labels, model = _mlp_problem()
  tx = fop_optax.adam_qlr()

  @jax.jit
  def step(params, state, x, labels):
    model_fn = lambda p: model(p, x)
    loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
    value_fn = lambda p: loss_fn(model_fn(p))
    value, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value=value, value_fn=value_fn,
                               model_fn=model_fn, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state, value

  state = tx.init(params)
  params, state, first = step(params, state, x, labels)
  with test_utils.log_compilations() as logs:
    params, state, _ = step(params, state, x, labels)
  assert not logs, 'recompiled on the second call'
  for _ in range(60):
    params, state, last = step(params, state, x, labels)
  assert float(last) < 0.5 * float(first), (first, last)
  inner = state.inner_state
  assert int(inner.count) == 62 and float(inner.damping) >= np.float32(1e-8)
  # a NaN batch is skipped: parameters and state unchanged
  bad_x = x.at[0, 0].set(jnp.nan)
  new_params, new_state, _ = step(params, state, bad_x, labels)
  test_utils.assert_trees_all_close(new_params, params)
  assert int(new_state.skipped_steps) == 1
  test_utils.assert_trees_all_close(new_state.inner_state, state.inner_state)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_dtypes_kept(dtype):
  params, x, labels, model = _mlp_problem()
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  tx = fop_optax.adam_qlr()
  value_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model(p, x.astype(dtype)).astype(jnp.float32), labels).mean()
  grads = jax.grad(value_fn)(params)
  state = tx.init(params)
  updates, new_state = jax.jit(lambda g, s, p: tx.update(
      g, s, p, value_fn=value_fn, model_fn=lambda q: model(q, x.astype(dtype)),
      loss_fn='softmax_cross_entropy'))(grads, state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  dtypes = lambda s: jax.tree.map(lambda a: jnp.asarray(a).dtype, s)
  assert dtypes(new_state) == dtypes(state)


def test_fop_direction_and_flax_nnx():
  """FOP's preconditioned Adam direction as QLR's direction, trained through nnx.Optimizer."""
  from flax import nnx

  import nnx_mlp
  model, x, y = nnx_mlp.problem()
  direction = optax.chain(fop_optax.scale_by_fop(1e-2), optax.scale_by_adam())
  optimizer = nnx.Optimizer(model, fop_optax.scale_by_qlr(direction), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model_fn = lambda p: nnx.merge(graphdef, p, rest)(x)
    loss_fn = lambda z: jnp.mean((z - y) ** 2)
    value_fn = lambda p: loss_fn(model_fn(p))
    value, grads = jax.value_and_grad(value_fn)(params)
    optimizer.update(model, grads, value=value, value_fn=value_fn, model_fn=model_fn,
                     loss_fn='mse')
    return value

  first = float(train_step(model, optimizer))
  for _ in range(100):
    last = float(train_step(model, optimizer))
  assert last < 0.2 * first, (first, last)
  assert int(optimizer.opt_state.count[...]) == 101


def test_named_l2_matches_optax_l2_loss_and_mse_would_halve_the_step(x64):
  """A gradient of ``optax.l2_loss(z, y).mean()``: ``loss_fn='l2'`` gives the callable's step.

  Naming ``'mse'`` (``mean((z − y)²)``, no ½) there doubles the curvature and,
  undamped, halves the step: the silent factor the ``'l2'`` name removes.
  """
  params, model_fn, _, _ = _least_squares()
  k = jax.random.key(7)
  y = jax.random.normal(k, (20, 2), jnp.float64)
  loss_fn = lambda z: optax.l2_loss(z, y).mean()
  value_fn = lambda p: loss_fn(model_fn(p))
  value, grads = jax.value_and_grad(value_fn)(params)

  def step_size(named):
    tx = fop_optax.scale_by_qlr(initial_damping=0.0, min_damping=0.0)
    _, state = tx.update(grads, tx.init(params), params, value=value, value_fn=value_fn,
                         model_fn=model_fn, loss_fn=named)
    return float(state.step_size)

  callable_alpha = step_size(loss_fn)
  np.testing.assert_allclose(step_size('l2'), callable_alpha, rtol=1e-12)
  np.testing.assert_allclose(step_size('mse'), 0.5 * callable_alpha, rtol=1e-12)


@pytest.mark.parametrize('method', ['qlr', 'series_sfn'])
def test_model_reads_the_gradient_not_the_chained_updates(method):
  """A clip chained before changes the direction, never the model's gᵀd (optax's ``grad=``)."""
  params = {'w': jnp.array([1.0, -2.0, 0.5]), 'v': jnp.array([[0.3, -0.1], [0.2, 0.4]])}
  value_fn = lambda p: (jnp.sum(jnp.array([1.0, 3.0, 10.0]) * p['w'] ** 2)
                        + jnp.sum(jnp.cosh(p['v'])))
  make = {'qlr': lambda: fop_optax.scale_by_qlr(optax.identity(), curvature='hessian'),
          'series_sfn': lambda: fop_optax.series_sfn(num_terms=4)}[method]
  tx = optax.chain(optax.clip_by_global_norm(0.5), make())
  value, grads = jax.value_and_grad(value_fn)(params)
  state = tx.init(params)
  implicit, s1 = tx.update(grads, state, params, value=value, value_fn=value_fn)
  explicit, s2 = tx.update(grads, state, params, value=value, grad=grads, value_fn=value_fn)
  for a, b in zip(jax.tree.leaves((implicit, s1)), jax.tree.leaves((explicit, s2))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # the pre-0.2 reading (the clipped updates as the gradient) is a different model
  clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
  old, _ = tx.update(grads, state, params, value=value, grad=clipped, value_fn=value_fn)
  gap = max(float(jnp.abs(a - b).max()) for a, b in
            zip(jax.tree.leaves(old), jax.tree.leaves(explicit)))
  assert gap > 1e-3
