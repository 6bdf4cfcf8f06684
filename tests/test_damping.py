"""The shared Levenberg–Marquardt damping controller, and AdamQLR / series SFN through it.

(a) the controller against hand-computed ρ and λ; (b) both methods on a
positive-definite quadratic, ρ and λ recomputed in numpy from the state and the
step; (c) both methods on a step that raises the loss: λ must go up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import _damping


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# --------------------------------------------------------------- (a) controller

_QLR = dict(decrease=0.5, increase=2.0, min_damping=1e-3)
_INF = float('inf')
_NAN = float('nan')

# (λ, f' − f, M, expected ρ, expected new λ), ω_dec = 1/2, ω_inc = 2, λ_min = 1e-3.
_CASES = {
    'good step': (1.0, -0.9, -1.0, 0.9, 0.5),
    'exact model': (1.0, -2.0, -2.0, 1.0, 0.5),
    'better than predicted': (1.0, -3.0, -2.0, 1.5, 0.5),
    'mediocre step': (1.0, -0.5, -1.0, 0.5, 1.0),
    'at 3/4: kept': (1.0, -0.75, -1.0, 0.75, 1.0),
    'at 1/4: kept': (1.0, -0.25, -1.0, 0.25, 1.0),
    'bad step': (1.0, -0.1, -1.0, 0.1, 2.0),
    'no change, decrease predicted': (1.0, 0.0, -1.0, 0.0, 2.0),
    'loss rose': (1.0, 0.3, -1.0, -0.3, 2.0),
    # the bug: the model predicted the increase that came; ρ = 1 but a failure
    'predicted increase came': (1.0, 1.0, 1.0, 1.0, 2.0),
    'predicted increase, overshot': (1.0, 5.0, 2.0, 2.5, 2.0),
    'predicted increase, loss fell': (1.0, -1.0, 1.0, -1.0, 2.0),
    'predicted no change, loss rose': (1.0, 1.0, 0.0, -_INF, 2.0),
    'predicted no change, loss fell': (1.0, -1.0, 0.0, -_INF, 2.0),
    'null step': (1.0, 0.0, 0.0, 1.0, 1.0),
    "f' NaN": (1.0, _NAN, -1.0, -_INF, 2.0),
    "f' +Inf": (1.0, _INF, -1.0, -_INF, 2.0),
    "f' -Inf": (1.0, -_INF, -1.0, -_INF, 2.0),
    'M NaN': (1.0, -1.0, _NAN, -_INF, 2.0),
    'floor on a success': (1.5e-3, -0.9, -1.0, 0.9, 1e-3),
    'floor on a kept step': (1e-4, -0.5, -1.0, 0.5, 1e-3),
    'zero damping, no floor': (0.0, -0.9, -1.0, 0.9, 0.0),
}


@pytest.mark.parametrize('case', list(_CASES))
def test_controller_hand_values(x64, case):
  lam, change, predicted, rho, new = _CASES[case]
  floor = 0.0 if case == 'zero damping, no floor' else _QLR['min_damping']
  got_rho, got_lam = _damping.levenberg_marquardt(
      jnp.float64(lam), jnp.float64(change), jnp.float64(predicted),
      decrease=0.5, increase=2.0, min_damping=floor)
  assert got_rho.dtype == jnp.float64 and got_lam.dtype == jnp.float64
  np.testing.assert_allclose(got_rho, rho, rtol=1e-15)
  np.testing.assert_allclose(got_lam, new, rtol=1e-15)


def test_controller_series_factors_jit_and_vmap(x64):
  """Series SFN's ω_dec = 0.9, ω_inc = 1/0.9; traceable; elementwise under vmap."""
  fn = jax.jit(jax.vmap(lambda lam, a, m: _damping.levenberg_marquardt(
      lam, a, m, decrease=0.9, increase=1 / 0.9, min_damping=1e-8)))
  lam = jnp.array([1.0, 1.0, 1.0, 2.0])
  change = jnp.array([-1.0, -0.5, 3.0e8, 0.0])
  predicted = jnp.array([-1.0, -1.0, 1.6, 0.0])
  rho, new = fn(lam, change, predicted)
  np.testing.assert_allclose(rho, [1.0, 0.5, 3.0e8 / 1.6, 1.0], rtol=1e-15)
  np.testing.assert_allclose(new, [0.9, 1.0, 1 / 0.9, 2.0], rtol=1e-15)


def test_controller_float32_and_bf16_promote_to_float32():
  rho, new = _damping.levenberg_marquardt(
      jnp.bfloat16(1.0), jnp.bfloat16(-0.5), jnp.float32(-1.0), decrease=0.5, increase=2.0,
      min_damping=1e-8)
  assert rho.dtype == jnp.float32 and new.dtype == jnp.float32
  np.testing.assert_allclose([rho, new], [0.5, 1.0])


# ------------------------------------------------------- the quadratic problems

def _householder(n):
  """A fixed orthogonal matrix (no LAPACK, the same on every machine)."""
  v = np.arange(1.0, n + 1)
  return np.eye(n) - 2 * np.outer(v, v) / (v @ v)


def _quadratic(eigs, b_scale=2.0):
  q = _householder(len(eigs))
  a = q @ np.diag(eigs) @ q.T
  b = b_scale * q @ np.ones(len(eigs))
  f_np = lambda x: 0.5 * x @ a @ x - b @ x
  f = lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
  return a, b, q, f_np, f


def _lm_reference(lam, change, predicted, dec, inc, floor):
  """The rule in plain Python, for the methods' tests."""
  if not np.isfinite(change) or predicted >= 0 or change > 0:
    new = lam * inc
  else:
    rho = change / predicted
    new = lam * dec if rho > 0.75 else lam * inc if rho < 0.25 else lam
  return max(new, floor)


# ------------------------------------------------ (b) ρ and λ from state and step

def test_adam_qlr_rho_and_damping_by_hand(x64):
  """Two AdamQLR steps (Hessian curvature) on a 6×6 PD quadratic, checked in numpy.

  From the step ``Δθ = α d`` and ``α`` in the state: ``d = Δθ/α``,
  ``Q = dᵀAd + λ‖d‖²``, ``M = α gᵀd + ½α²Q``, ``ρ = (f(θ + Δθ) − f(θ))/M``.
  """
  a, b, _, f_np, f = _quadratic(np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]))
  lam0 = 0.3
  tx = fop_optax.adam_qlr(curvature='hessian', initial_damping=lam0, skip_nonfinite=False)
  x = jnp.asarray(np.linspace(-1.0, 1.0, 6))
  state = tx.init(x)
  lam = lam0
  branches = []
  for _ in range(2):
    value, grads = jax.value_and_grad(f)(x)
    updates, state = tx.update(grads, state, x, value=value, value_fn=f)
    xn, g, step = np.asarray(x), np.asarray(grads), np.asarray(updates)
    alpha = float(state.step_size)
    d = step / alpha
    q = d @ a @ d + lam * d @ d
    np.testing.assert_allclose(alpha, -(g @ d) / q, rtol=1e-12)
    predicted = alpha * (g @ d) + 0.5 * alpha ** 2 * q
    change = f_np(xn + step) - f_np(xn)
    rho = change / predicted
    np.testing.assert_allclose(state.rho, rho, rtol=1e-9)
    # an exact quadratic model less its damping: ρ = 1 + λ‖d‖²/Q > 1
    np.testing.assert_allclose(rho, 1 + lam * (d @ d) / q, rtol=1e-9)
    assert predicted < 0 and change < 0 and rho > 0.75
    lam = _lm_reference(lam, change, predicted, 0.5, 2.0, 1e-8)
    branches.append(lam)
    np.testing.assert_allclose(state.damping, lam, rtol=1e-15)
    x = x + updates
  np.testing.assert_allclose(branches, [0.15, 0.075], rtol=1e-15)


def test_scale_by_qlr_ggn_mse_rho_and_damping_by_hand(x64):
  """SGD-QLR with the named ``'mse'`` GGN on linear least squares: ρ and λ in numpy."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(12, 3))
  ys = rng.normal(size=(12, 2))
  model_fn = lambda p: jnp.asarray(xs) @ p
  value_fn = lambda p: jnp.mean((model_fn(p) - jnp.asarray(ys)) ** 2)
  lam0 = 2.0
  tx = fop_optax.scale_by_qlr(optax.identity(), initial_damping=lam0, damping_decrease=0.25,
                              damping_increase=3.0)
  p = jnp.zeros((3, 2))
  value, grads = jax.value_and_grad(value_fn)(p)
  updates, state = tx.update(grads, tx.init(p), p, value=value, value_fn=value_fn,
                             model_fn=model_fn, loss_fn='mse')
  g, step = np.asarray(grads).ravel(), np.asarray(updates)
  alpha = float(state.step_size)
  d = g  # identity direction
  np.testing.assert_allclose(step.ravel(), alpha * d, rtol=1e-12)
  jd = xs @ d.reshape(3, 2)
  c = 2 * np.mean(jd ** 2)  # mean((z − y)²): ∇²_z = 2I/size
  np.testing.assert_allclose(state.curvature, c, rtol=1e-12)
  q = c + lam0 * d @ d
  predicted = alpha * (g @ d) + 0.5 * alpha ** 2 * q
  change = np.mean((xs @ step - ys) ** 2) - np.mean(ys ** 2)
  rho = change / predicted
  np.testing.assert_allclose(state.rho, rho, rtol=1e-9)
  assert rho > 0.75  # exact model with a large λ: ρ = 1 + λ‖d‖²/Q
  np.testing.assert_allclose(state.damping, 0.25 * lam0, rtol=1e-15)


def _sfn_predicted(alpha, mu, u, g, delta, buffer):
  ug, dg, db = u @ g, delta @ g, delta @ buffer
  db = 1.0 if db == 0 else db
  return 0.5 * (alpha ** 2 * ug + 2 * alpha * mu * dg + mu ** 2 * db) - alpha * ug - mu * dg


def test_series_sfn_rho_and_damping_by_hand(x64):
  """Two series-SFN steps on a 10×10 PD quadratic with a scale above λ_max(H²)/2.

  From the state (``α``, ``μ``, the previous ``δ`` and buffer ``b``) and the step
  ``Δ``: ``u = (Δ − μδ)/α``, ``M = ½[α μ]A[α μ]ᵀ − [α μ]·rhs``,
  ``ρ = (f(θ − Δ) − f(θ))/M``; λ by the rule with ω_dec = 0.9, ω_inc = 1/0.9.
  """
  eigs = np.array([0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 20.0])
  a, b, _, f_np, f = _quadratic(eigs)
  lam = 1.0
  tx = fop_optax.series_sfn(initial_damping=lam, initial_scale=500.0, skip_nonfinite=False)
  x = jnp.asarray(np.linspace(-1.0, 1.0, 10))
  state = tx.init(x)
  seen = []
  for _ in range(2):
    delta, buffer = np.asarray(state.last_update), np.asarray(state.curvature_buffer)
    value, grads = jax.value_and_grad(f)(x)
    updates, state = tx.update(grads, state, x, value=value, value_fn=f)
    assert float(state.scale) == 500.0  # > λ_max(H²)/2 = 200: the series converges
    xn, g, step = np.asarray(x), np.asarray(grads), -np.asarray(updates)
    alpha, mu = float(state.step_size), float(state.momentum)
    u = (step - mu * delta) / alpha
    predicted = _sfn_predicted(alpha, mu, u, g, delta, buffer)
    change = f_np(xn - step) - f_np(xn)
    np.testing.assert_allclose(state.rho, change / predicted, rtol=1e-9)
    assert predicted < 0 and change < 0
    lam = _lm_reference(lam, change, predicted, 0.9, 1 / 0.9, 1e-8)
    np.testing.assert_allclose(state.damping, lam, rtol=1e-15)
    seen.append((change / predicted, lam))
    x = x + updates
  # this start: two successes (ρ ≈ 1.49, 1.62: the series overshoots the damped model)
  assert seen[0][0] > 0.75 and seen[1][0] > 0.75, seen
  np.testing.assert_allclose([s[1] for s in seen], [0.9, 0.81], rtol=1e-15)


# ------------------------------------------------ (c) a step that raised the loss

def test_series_sfn_diverged_series_raises_damping(x64):
  """The reviewer's case: V stuck at 100 under λ_max(H²)/2 = 200, no acceleration.

  ``g`` has a 1e-3 component along the top eigenvector (λ = 20), so
  ``‖H²g‖/‖g‖ < 100`` and the bound keeps ``V = 100``; that component grows by
  ``|1 − 400/100|^k = 3^k`` in the series and the step takes ``f`` from −8.4 to
  3.0e8. The model predicts no decrease (``M = −½uᵀg ≥ 0``). Before the shared
  controller: ``ρ = 1`` and ``λ`` 1 → 0.9; now ``λ`` 1 → 1/0.9.
  """
  eigs = np.array([0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 20.0])
  a, b, q, f_np, f = _quadratic(eigs)
  gradient = q @ np.concatenate([np.ones(9), [1e-3]])
  x = jnp.asarray(np.linalg.solve(a, b + gradient))
  tx = fop_optax.series_sfn(acceleration_order=0, initial_damping=1.0, skip_nonfinite=False)
  value, grads = jax.value_and_grad(f)(x)
  np.testing.assert_allclose(grads, gradient, atol=1e-12)
  updates, state = tx.update(grads, tx.init(x), x, value=value, value_fn=f)
  assert float(state.scale) == 100.0
  before, after = f_np(np.asarray(x)), f_np(np.asarray(x + updates))
  assert before < 0 and after > 1e8, (before, after)
  u = -np.asarray(updates)  # α = 1, μ = 0 on a first step
  assert float(state.step_size) == 1.0 and float(state.momentum) == 0.0
  predicted = -0.5 * u @ np.asarray(grads)
  assert predicted >= 0  # the model predicts no decrease: the path that hid the failure
  np.testing.assert_allclose(state.rho, (after - before) / predicted, rtol=1e-6)
  np.testing.assert_allclose(state.damping, 1 / 0.9, rtol=1e-15)
  assert float(state.damping) > 1.0


@pytest.mark.parametrize('curvature', ['hessian', 'ggn'])
def test_qlr_overshooting_step_raises_damping(x64, curvature):
  """AdamQLR with ``step_size_scale=3``: three times the line minimum of a PD quadratic.

  On an exact quadratic model the step changes the loss by
  ``(gᵀd)²/Q·(9/2 − 3) > 0`` (less a little for the damping): the loss rises
  and the model predicted it (``M > 0``). Before the shared controller that was
  ``ρ = 1`` and ``λ ← ω_dec·λ``; now ``λ ← ω_inc·λ``.
  """
  a, b, q, f_np, f = _quadratic(np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]))
  root = q @ np.diag(np.sqrt([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])) @ q.T  # A = RᵀR, R symmetric
  model_fn = lambda x: jnp.asarray(root) @ x
  loss_fn = lambda z: 0.5 * z @ z
  value_fn = lambda x: loss_fn(model_fn(x)) - jnp.asarray(b) @ x  # = f; GGN = A
  tx = fop_optax.adam_qlr(curvature=curvature, initial_damping=1e-3, step_size_scale=3.0,
                          skip_nonfinite=False)
  x = jnp.asarray(np.linspace(-1.0, 1.0, 6))
  value, grads = jax.value_and_grad(value_fn)(x)
  extra = dict(model_fn=model_fn, loss_fn=loss_fn) if curvature == 'ggn' else {}
  updates, state = tx.update(grads, tx.init(x), x, value=value, value_fn=f, **extra)
  before, after = f_np(np.asarray(x)), f_np(np.asarray(x + updates))
  assert after > before, (before, after)
  step, g = np.asarray(updates), np.asarray(grads)
  alpha = float(state.step_size)
  d = step / alpha
  big_q = d @ a @ d + 1e-3 * d @ d
  predicted = alpha * (g @ d) + 0.5 * alpha ** 2 * big_q
  assert predicted > 0
  np.testing.assert_allclose(state.rho, (after - before) / predicted, rtol=1e-9)
  np.testing.assert_allclose(state.damping, 2e-3, rtol=1e-15)


def test_zero_gradient_is_a_null_step_for_both(x64):
  """At the minimum (``g = 0`` exactly) the step is zero, ``M = 0`` and ``f' = f``.

  No information: λ is kept (not ratcheted up step after step, which in float32
  would reach Inf and freeze the method), and ρ reads 1 as in a fresh state.
  """
  f = lambda x: 0.5 * jnp.sum(x ** 2)
  x = jnp.zeros(4)
  value, grads = jax.value_and_grad(f)(x)
  assert float(jnp.abs(grads).max()) == 0.0
  qlr = fop_optax.adam_qlr(curvature='hessian', initial_damping=0.3, skip_nonfinite=False)
  sfn = fop_optax.series_sfn(initial_damping=0.3, skip_nonfinite=False)
  for tx in (qlr, sfn):
    state = tx.init(x)
    for _ in range(3):
      updates, state = tx.update(grads, state, x, value=value, value_fn=f)
      assert float(jnp.abs(updates).max()) == 0.0
      assert float(state.rho) == 1.0 and float(state.damping) == 0.3
