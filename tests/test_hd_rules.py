"""Hypergradient descent's rules and scopes: exact forms, scale-freeness, default convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import hypergradient


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def loss(params):
  # Non-quadratic, two leaves, so a per-leaf or transposed mistake cannot hide.
  w, b = params['w'], params['b']
  return jnp.sum(jnp.cos(w) * jnp.arange(1.0, 7.0).reshape(2, 3)) + 0.5 * jnp.sum(w ** 2) \
      + jnp.sum((b - 0.3) ** 2 * jnp.array([1.0, 5.0]))


def start():
  return {'w': jnp.linspace(-0.8, 0.9, 6).reshape(2, 3), 'b': jnp.array([1.0, -2.0])}


@pytest.mark.parametrize('nesterov', [False, True])
def test_additive_global_reproduces_baydin_sgd_hd(x64, nesterov):
  """Baydin et al.'s SGD-HD (their Algorithm 1 with momentum, as in their code), step by step.

  Their loop, with all parameters flattened into one vector: h = g·u_prev;
  α += β·h; buf = μ·buf + g (buf = g on the first step); u = g + μ·buf
  (Nesterov) or buf; θ −= α·u; u_prev = u.
  """
  alpha0, beta, mu, steps = 0.02, 1e-4, 0.7, 12
  tx = fop_optax.sgd_hd(alpha0, beta, momentum=mu, nesterov=nesterov, rule='additive',
                        scope='global', skip_nonfinite=False)
  params = start()
  state = tx.init(params)

  flat0, unravel = jax.flatten_util.ravel_pytree(start())
  theta, alpha = np.asarray(flat0), alpha0
  buf, u_prev = None, np.zeros_like(theta)
  for _ in range(steps):
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(loss)(unravel(theta)))[0])
    alpha += beta * float(g @ u_prev)
    buf = g.copy() if buf is None else mu * buf + g
    u = g + mu * buf if nesterov else buf
    theta = theta - alpha * u
    u_prev = u

    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(float(state[0].learning_rates), alpha, rtol=1e-12)
  print(alpha, theta)
  assert np.all(np.isfinite(theta))
  assert abs(alpha - alpha0) > 1e-3  # the step size really moved
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(params)[0], theta, rtol=1e-12)


def _two_steps(tx, scale=1.0):
  """Runs two updates on scale·loss and returns the state after them (float64)."""
  params = start()
  state = tx.init(params)
  grad = jax.grad(lambda p: scale * loss(p))
  for _ in range(2):
    updates, state = tx.update(grad(params), state, params)
    params = jax.tree.map(lambda p, u: p - u, params, updates)
  return state


def _cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize('scope', ['global', 'leaf', 'parameter'])
def test_multiplicative_is_baydin_normalised_rule(x64, scope):
  """α_1 = α_0·(1 + β·cos(g_1, u_0)), the cosine over the parameters that share α."""
  alpha0, beta = 0.05, 0.3
  tx = fop_optax.scale_by_hypergradient(alpha0, beta, rule='multiplicative', scope=scope)
  state = _two_steps(tx)
  params = start()
  g0 = jax.grad(loss)(params)
  g1 = jax.grad(loss)(jax.tree.map(lambda p, g: p - alpha0 * g, params, g0))
  if scope == 'global':
    c = _cos(jax.flatten_util.ravel_pytree(g1)[0], jax.flatten_util.ravel_pytree(g0)[0])
    expected = alpha0 * (1 + beta * c)
  elif scope == 'leaf':
    expected = {k: alpha0 * (1 + beta * _cos(g1[k].ravel(), g0[k].ravel())) for k in g0}
  else:
    expected = jax.tree.map(lambda a, b: alpha0 * (1 + beta * jnp.sign(a * b)), g1, g0)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-12),
               state.learning_rates, expected)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_log_rule_first_step_is_the_clip(x64, sign):
  """ν starts at 0, so the first normalised hypergradient is ±1/√(1−ρ) = ±10: clipped.

  Aligned successive gradients grow α by exactly e^{0.1β} (the default step_clip's c_+,
  0.1; it was 1 until the growth cap was tightened); opposed ones shrink it by e^{−10β}.
  With step_clip=(−10, 1) the old behaviour comes back.
  """
  alpha0, beta = 0.01, 0.05
  assert hypergradient.DEFAULT_STEP_CLIP == (-10.0, 0.1)
  for clip, high in ((None, 0.1), ((-10.0, 1.0), 1.0)):
    tx = fop_optax.scale_by_hypergradient(alpha0, beta, rule='log', scope='global', step_clip=clip)
    params = jnp.array([1.0, 2.0])
    state = tx.init(params)
    _, state = tx.update(params, state)
    _, state = tx.update(sign * params, state)
    expected = alpha0 * np.exp(beta * (high if sign > 0 else -10.0))
    np.testing.assert_allclose(float(state.learning_rates), expected, rtol=1e-12)


def test_log_rule_stays_within_its_range_and_positive(x64):
  tx = fop_optax.scale_by_hypergradient(1e-3, 2.0, rule='log', scope='leaf', rate_range=10.0)
  params = {'a': jnp.ones(3)}
  state = tx.init(params)
  rates = []
  for i in range(40):  # aligned for 20 steps (α grows), then alternating (α shrinks)
    g = {'a': jnp.ones(3) * (1.0 if i < 20 or i % 2 else -1.0)}
    _, state = tx.update(g, state)
    rates.append(float(state.learning_rates['a']))
  assert max(rates) == pytest.approx(1e-2, rel=1e-12)  # α_0·r reached, not passed
  assert min(rates[20:]) == pytest.approx(1e-4, rel=1e-12)  # α_0/r
  assert all(r > 0 for r in rates)


@pytest.mark.parametrize('rule', ['multiplicative', 'log'])
def test_scale_free_rules_ignore_the_loss_scale(x64, rule):
  """Multiplying the loss by 1000 leaves α unchanged for the scale-free rules, not for Baydin's."""
  make = lambda r, b: fop_optax.scale_by_hypergradient(0.01, b, rule=r, scope='leaf')
  a1 = _two_steps(make(rule, 0.3), 1.0).learning_rates
  # The step size is in units of θ/g: the same trajectory needs α/1000.
  a2 = _two_steps(fop_optax.scale_by_hypergradient(1e-5, 0.3, rule=rule, scope='leaf'),
                  1000.0).learning_rates
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x * 1e-3, y, rtol=1e-9), a1, a2)
  b1 = _two_steps(make('additive', 0.3), 1.0).learning_rates
  b2 = _two_steps(fop_optax.scale_by_hypergradient(1e-5, 0.3, rule='additive', scope='leaf'),
                  1000.0).learning_rates
  assert abs(float(b2['w']) / float(b1['w']) - 1e-3) > 0.1  # additive: not scale-free


def test_scopes_shapes_and_per_parameter_alias():
  params = {'w': jnp.ones((2, 3)), 'b': jnp.ones(2)}
  shape = lambda tx: jax.tree.map(jnp.shape, tx.init(params).learning_rates)
  assert shape(fop_optax.scale_by_hypergradient(0.1, scope='global')) == ()
  assert shape(fop_optax.scale_by_hypergradient(0.1, scope='leaf')) == {'w': (), 'b': ()}
  assert shape(fop_optax.scale_by_hypergradient(0.1, scope='parameter')) == {'w': (2, 3), 'b': (2,)}
  assert shape(fop_optax.scale_by_hypergradient(0.1, per_parameter=True)) == {'w': (2, 3), 'b': (2,)}
  assert shape(fop_optax.scale_by_hypergradient(0.1, per_parameter=False)) == {'w': (), 'b': ()}
  with pytest.raises(ValueError, match='contradicts'):
    fop_optax.scale_by_hypergradient(0.1, scope='leaf', per_parameter=True)
  with pytest.raises(ValueError, match='scope must be one of'):
    fop_optax.sgd_hd(0.1, scope='layer')
  with pytest.raises(ValueError, match='rule must be one of'):
    fop_optax.adam_hd(0.1, rule='additve')


def test_rule_specific_errors():
  with pytest.raises(ValueError, match='has no default'):
    fop_optax.scale_by_hypergradient(0.1, rule='additive')
  with pytest.raises(ValueError, match='< 1'):
    fop_optax.sgd_hd(0.1, 1.0, rule='multiplicative')
  with pytest.raises(ValueError, match='rate_range'):
    fop_optax.scale_by_hypergradient(0.1, rate_range=0.5)
  with pytest.raises(ValueError, match='step_clip'):
    fop_optax.scale_by_hypergradient(0.1, step_clip=(0.5, 1.0))


def test_default_rule_and_betas():
  assert fop_optax.sgd_hd.__kwdefaults__['rule'] == 'log'
  assert fop_optax.adam_hd.__kwdefaults__['rule'] == 'log'
  assert hypergradient.DEFAULT_HYPER_LEARNING_RATE == {'multiplicative': 0.1, 'log': 0.05}


ROSENBROCK = (lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2,
              jnp.zeros(2), jnp.ones(2), 3e-2)
QUADRATIC = (lambda p: 0.5 * (1000 * p[0] ** 2 + p[1] ** 2), jnp.ones(2), jnp.zeros(2), 1e-3)


def _final(make, problem, steps=30_000, alphas=(1e-4, 1e-3, 1e-2)):
  f, x0, _, _ = problem

  def run(alpha0):
    tx = make(alpha0)

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(f)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
    return p
  # One compiled program, α_0 traced.
  run = jax.jit(run)
  return np.stack([np.asarray(run(jnp.float32(a))) for a in alphas])


DEFAULTS = {
    'sgd_hd': lambda a: fop_optax.sgd_hd(a),
    'sgd_hd_momentum': lambda a: fop_optax.sgd_hd(a, momentum=0.9),
    'adam_hd': lambda a: fop_optax.adam_hd(a),
}


@pytest.mark.parametrize('problem', ['rosenbrock', 'quadratic'])
@pytest.mark.parametrize('name', DEFAULTS)
def test_defaults_converge_from_any_initial_step_size(name, problem):
  """The issue's acceptance test: 30,000 steps from α_0 = 1e-4, 1e-3, 1e-2 at the defaults.

  Measured (benchmarks/hd_rules.py): max error ≤ 1.2e-5 on Rosenbrock (tolerance 3e-2) and
  exactly 0 on the quadratic (tolerance 1e-3), for every α_0.
  """
  f, _, solution, tol = ROSENBROCK if problem == 'rosenbrock' else QUADRATIC
  final = _final(DEFAULTS[name], ROSENBROCK if problem == 'rosenbrock' else QUADRATIC)
  err = np.max(np.abs(final - np.asarray(solution)), axis=1)
  assert np.all(err <= tol), err


def test_baydin_additive_rule_blows_up_where_the_default_does_not():
  """Why 'additive' is not the default: Baydin's β=1e-3 sends SGD-HD to garbage on Rosenbrock.

  Measured: final error 1e12-4e26 with α negative, for all three α_0. The issue's second
  trap is visible: a run that only skips lets its NaNs through after 100 skips in a row
  (the aliases' skip_nonfinite), with a NonFiniteLetThroughWarning, so the final iterate is
  not finite or far off.
  """
  with pytest.warns(fop_optax.nonfinite.NonFiniteLetThroughWarning, match='100 skipped in all'):
    final = _final(lambda a: fop_optax.sgd_hd(a, rule='additive'), ROSENBROCK)
  err = np.max(np.abs(final - 1.0), axis=1)
  assert np.all(~np.isfinite(err) | (err > 1e3)), err


@pytest.mark.parametrize('make', [fop_optax.sgd_hd, fop_optax.adam_hd])
def test_aliases_pass_step_clip_through(x64, make):
  """The aliases grow α by at most e^{0.1β} a step by default; step_clip=(−10, 1) is the old cap."""
  params = jnp.array([1.0, 2.0])
  for clip, high in ((None, 0.1), ((-10.0, 1.0), 1.0)):
    tx = make(0.01, step_clip=clip)
    state = tx.init(params)
    for _ in range(2):   # aligned gradients: the first normalised hypergradient is clipped at c_+
      _, state = tx.update(params, state)
    rate = float(state.inner_state[0].learning_rates)
    np.testing.assert_allclose(rate, 0.01 * np.exp(0.05 * high), rtol=1e-12)
