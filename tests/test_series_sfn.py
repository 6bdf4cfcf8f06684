"""Series saddle-free Newton: coefficients, the series against eigh, Wynn's ε, saddles, contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from optax._src import test_utils

import importlib

import fop_optax

# fop_optax.series_sfn is the function; its module is the private fop_optax._series_sfn.
S = importlib.import_module('fop_optax._series_sfn')


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_coefficients_stable_quotient_equals_recurrence_and_target(x64):
  for a in (0.0, 0.3, 0.7):
    stable = S.damped_coefficients(jnp.float64(a), 20)
    recurrence = S.damped_coefficients_recurrence(jnp.float64(a), 20)
    # (the recurrence itself loses ~1e-9 by k = 19 at a = 0.7 in float64)
    np.testing.assert_allclose(stable, recurrence, rtol=1e-8, atol=1e-12)
    # Σ d_k x^k → 1/(√(1 − x) + a)
    x = 0.5
    series = np.sum(np.asarray(S.damped_coefficients(jnp.float64(a), 80)) * x ** np.arange(80))
    np.testing.assert_allclose(series, 1 / (np.sqrt(1 - x) + a), rtol=1e-12)
  c = np.asarray(S.quasi_damped_coefficients(80, jnp.float64))
  np.testing.assert_allclose(np.sum(c * 0.5 ** np.arange(80)), 1 / np.sqrt(0.5), rtol=1e-12)
  # float32: the quotient stays accurate at a = 0.9, where the recurrence is off by ~5e5
  exact = np.asarray(S.damped_coefficients(jnp.float64(0.9), 20))
  with jax.enable_x64(False):
    stable32 = np.asarray(S.damped_coefficients(jnp.float32(0.9), 20))
    assert stable32.dtype == np.float32
    np.testing.assert_allclose(stable32, exact, atol=1e-6)
    # at a = 1 the recurrence divides by zero; the quotient is fine
    assert np.all(np.isfinite(np.asarray(S.damped_coefficients(jnp.float32(1.0), 20))))


def test_wynn_epsilon_r1_closed_form_and_exactness(x64):
  k = jax.random.split(jax.random.key(0), 3)
  sums = [{'a': jax.random.normal(k[i], (3, 2)), 'b': jax.random.normal(k[i], (4,))}
          for i in range(3)]
  got = ravel_pytree(S.wynn_epsilon(sums))[0]
  s0, s1, s2 = (np.asarray(ravel_pytree(s)[0]) for s in sums)
  inv = lambda v: v / (v @ v)
  np.testing.assert_allclose(got, s1 + inv(inv(s2 - s1) - inv(s1 - s0)), rtol=1e-12)
  # exact on a vector sequence S_n = S + c·λⁿ·v (one geometric mode), for r = 1 and r = 2
  limit = np.array([1.0, -2.0, 0.5])
  v = np.array([0.3, 1.0, -1.0])
  seq = [jnp.asarray(limit + 2.0 * 0.6 ** n * v) for n in range(5)]
  np.testing.assert_allclose(S.wynn_epsilon(seq[:3]), limit, rtol=1e-10)
  # two geometric modes need r = 2 (five sums); r = 1 is not exact there
  w = np.array([1.0, 0.0, 2.0])
  seq2 = [jnp.asarray(limit + 0.6 ** n * v + (-0.3) ** n * w) for n in range(5)]
  np.testing.assert_allclose(S.wynn_epsilon(seq2), limit, rtol=1e-8)
  assert np.abs(np.asarray(S.wynn_epsilon(seq2[2:])) - limit).max() > 1e-4
  with pytest.raises(ValueError, match='odd number'):
    S.wynn_epsilon(seq[:2])


def _mlp():
  k = jax.random.split(jax.random.key(2), 4)
  params = {'w1': 0.8 * jax.random.normal(k[0], (3, 4), jnp.float64),
            'w2': 0.8 * jax.random.normal(k[1], (4, 2), jnp.float64)}
  x = jax.random.normal(k[2], (16, 3), jnp.float64)
  y = jax.random.normal(k[3], (16, 2), jnp.float64)
  loss = lambda p: jnp.mean((jnp.tanh(x @ p['w1']) @ p['w2'] - y) ** 2)
  return params, loss


def _first_step(loss, params, **kw):
  tx = fop_optax.series_sfn(damping_factor=None, skip_nonfinite=False, **kw)
  grads = jax.grad(loss)(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))
  updates, state = step(grads, tx.init(params), params)
  return -ravel_pytree(updates)[0], state


def test_series_matches_its_formula_and_converges_to_exact_sfn(x64):
  """The paper's exact-SFN baseline: (|H| + λI)⁻¹g by eigh of the dense Hessian."""
  params, loss = _mlp()
  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat))
  g = np.asarray(ravel_pytree(jax.grad(loss)(params))[0])
  evals, evecs = np.linalg.eigh(h)
  assert evals.min() < -1e-3  # indefinite: |H| differs from H
  lam = 0.5
  exact = evecs @ ((evecs.T @ g) / (np.abs(evals) + lam))
  scale = 1.2 * np.max(evals ** 2)  # V ≥ λ_max(H²): the series converges
  h2 = h @ h
  errors = []
  for k in (1, 3, 10, 30, 100):
    u, state = _first_step(loss, params, num_terms=k, acceleration_order=0,
                           initial_damping=lam, initial_scale=scale)
    # one step from rest: the model's minimiser is α = 1, μ = 0 (to rounding: its linear term
    # reads the gradient of value_fn's linearisation, its curvature terms the input)
    assert float(state.step_size) == pytest.approx(1.0, rel=1e-12)
    assert abs(float(state.momentum)) < 1e-12
    # the truncated series, written out densely
    d = np.asarray(S.damped_coefficients(jnp.float64(lam / np.sqrt(scale)), k))
    x = np.eye(len(g)) - h2 / scale
    term, want = g.copy(), np.zeros_like(g)
    for dk in d:
      want += dk * term
      term = x @ term
    np.testing.assert_allclose(u, want / np.sqrt(scale), rtol=1e-9, atol=1e-12)
    errors.append(np.linalg.norm(u - exact) / np.linalg.norm(exact))
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.1 * errors[0], errors
  # ε-acceleration (r = 1) beats the plain partial sum at the same K
  u_acc, _ = _first_step(loss, params, num_terms=10, acceleration_order=1,
                         initial_damping=lam, initial_scale=scale)
  assert np.linalg.norm(u_acc - exact) / np.linalg.norm(exact) < errors[2]


def test_quasi_damped_series_target(x64):
  params, loss = _mlp()
  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat))
  g = np.asarray(ravel_pytree(jax.grad(loss)(params))[0])
  evals, evecs = np.linalg.eigh(h)
  lam = 0.5
  exact = evecs @ ((evecs.T @ g) / np.sqrt(evals ** 2 + lam))
  u, _ = _first_step(loss, params, num_terms=200, acceleration_order=0, series='quasi_damped',
                     initial_damping=lam, initial_scale=1.2 * np.max(evals ** 2))
  assert np.linalg.norm(u - exact) / np.linalg.norm(exact) < 1e-3


def test_power_iteration_scale_is_near_the_top_of_h2(x64):
  params, loss = _mlp()
  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat))
  top = np.max(np.linalg.eigvalsh(h) ** 2)
  _, bound = _first_step(loss, params, num_terms=3, acceleration_order=0, initial_scale=1e-6)
  _, power = _first_step(loss, params, num_terms=3, acceleration_order=0, initial_scale=1e-6,
                         scale='power_iteration', power_iterations=30)
  # the reference's ‖H²g‖/‖g‖ is a lower bound; 30 power iterations reach the top
  assert float(bound.scale) <= top * (1 + 1e-9)
  np.testing.assert_allclose(float(power.scale), top, rtol=1e-3)


def test_sfn_leaves_a_saddle_where_newton_goes_to_it(x64):
  """f = x² − y² + y⁴/4: a saddle at 0, minima at (0, ±√2) with f = −1."""
  f = lambda p: p[0] ** 2 - p[1] ** 2 + p[1] ** 4 / 4
  start = jnp.array([0.5, 0.1])
  newton = start
  for _ in range(20):
    newton = newton - jnp.linalg.solve(jax.hessian(f)(newton), jax.grad(f)(newton))
  np.testing.assert_allclose(newton, [0.0, 0.0], atol=1e-8)  # Newton's fixed point: the saddle
  tx = fop_optax.series_sfn(num_terms=20, acceleration_order=1, initial_scale=10.0)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(f)(p)
    updates, s = tx.update(grads, s, p, value=value, value_fn=f)
    return optax.apply_updates(p, updates), s

  params, state = start, tx.init(start)
  params, state = step(params, state)
  assert abs(float(params[1])) > 0.1 and float(f(params)) < float(f(start))
  for _ in range(60):
    params, state = step(params, state)
  np.testing.assert_allclose(params, [0.0, np.sqrt(2.0)], atol=1e-3)
  # the adaptive 2×2 solve's first column is its right-hand side: α = 1, μ = 0 exactly
  inner = state.inner_state
  assert float(inner.step_size) == 1.0 and float(inner.momentum) == 0.0


def test_missing_closure_and_bad_arguments():
  params, loss = {'w': jnp.ones(3)}, lambda p: jnp.sum(p['w'] ** 2)
  tx = fop_optax.series_sfn()
  state = tx.init(params)
  with pytest.raises(ValueError, match='needs value_fn='):
    tx.update(jax.grad(loss)(params), state, params)
  with pytest.raises(TypeError, match='value_fn must be a callable'):
    tx.update(jax.grad(loss)(params), state, params, value_fn=3)
  with pytest.raises(ValueError, match='needs num_terms >= 5'):
    fop_optax.series_sfn(num_terms=4, acceleration_order=2)
  with pytest.raises(ValueError, match='scale must be one of'):
    fop_optax.series_sfn(scale='exact')
  with pytest.raises(ValueError, match='damping_factor must be in'):
    fop_optax.series_sfn(damping_factor=1.1)


def test_jit_no_recompilation_trains_skips_nonfinite_and_nnx():
  from flax import nnx

  import nnx_mlp
  model, x, y = nnx_mlp.problem()
  optimizer = nnx.Optimizer(model, fop_optax.series_sfn(num_terms=5), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value_fn = lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)
    value, grads = jax.value_and_grad(value_fn)(params)
    optimizer.update(model, grads, value=value, value_fn=value_fn)
    return value

  first = float(train_step(model, optimizer, x))
  with test_utils.log_compilations() as logs:
    train_step(model, optimizer, x)
  assert not logs, 'recompiled on the second call'
  for _ in range(40):
    last = float(train_step(model, optimizer, x))
  assert last < 0.2 * first, (first, last)
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(jnp.copy, before)
  train_step(model, optimizer, x.at[0, 0].set(jnp.nan))
  test_utils.assert_trees_all_close(nnx.state(model, nnx.Param), before)
  assert int(optimizer.opt_state.skipped_steps[...]) == 1


def test_inject_hyperparams_and_multisteps():
  x = jax.random.normal(jax.random.key(0), (32, 3))
  y = x[:, :1]
  params = {'w': jnp.zeros((3, 1))}
  model_fn = lambda p: x @ p['w']
  loss_fn = lambda z: jnp.mean((z - y) ** 2)
  value_fn = lambda p: loss_fn(model_fn(p))
  grads = jax.grad(value_fn)(params)
  kw = dict(value_fn=value_fn, model_fn=model_fn, loss_fn=loss_fn)
  # the loop counts shape the computation: they must be static
  with pytest.raises(ValueError, match='static_args'):
    optax.inject_hyperparams(fop_optax.series_sfn)(num_terms=5).init(params)
  for tx in (optax.inject_hyperparams(fop_optax.adam_qlr)(initial_damping=1e-3),
             optax.inject_hyperparams(fop_optax.series_sfn, static_args=(
                 'num_terms', 'acceleration_order', 'power_iterations'))(num_terms=5)):
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(
        grads, tx.init(params), params)
    assert float(value_fn(optax.apply_updates(params, updates))) < float(value_fn(params))
  tx = optax.MultiSteps(fop_optax.adam_qlr(), every_k_schedule=2)
  state = tx.init(params)
  first, state = tx.update(grads, state, params, **kw)
  second, state = tx.update(grads, state, params, **kw)
  assert float(jnp.abs(first['w']).max()) == 0.0 and float(jnp.abs(second['w']).max()) > 0
