"""skip_nonfinite: counts, a warning when a run only skips, and the max_consecutive_errors bound."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax.nonfinite import NonFiniteStepsWarning


def run(tx, grads, params=None):
  """Applies ``grads`` (a list of arrays) in one jitted scan; returns params, state, warnings."""
  params = jnp.ones(2) if params is None else params

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    (params, state), _ = jax.jit(lambda p, s, g: jax.lax.scan(body, (p, s), g))(
        params, tx.init(params), jnp.stack(grads))
    jax.effects_barrier()  # the callback has run before we read the warnings
  return params, state, [w for w in caught if issubclass(w.category, NonFiniteStepsWarning)]


NAN = jnp.full(2, jnp.nan)
ONE = jnp.ones(2)


def test_all_nan_run_warns_once_per_doubling_and_counts():
  tx = fop_optax.skip_nonfinite(optax.sgd(0.1), warn_after=5)
  params, state, caught = run(tx, [NAN] * 23)
  # Warnings at 5, 10, 20 consecutive steps: not 23 of them.
  assert [str(w.message).split(' steps')[0] for w in caught] == [
      'skip_nonfinite: the last 5', 'skip_nonfinite: the last 10', 'skip_nonfinite: the last 20']
  assert 'frozen' in str(caught[0].message)
  assert int(state.skipped_steps) == 23
  assert int(state.consecutive_nonfinite) == 23
  np.testing.assert_array_equal(params, jnp.ones(2))  # nothing moved


def test_default_alias_lets_the_failure_through_after_100_and_the_issue_trap_is_visible():
  """The aliases skip up to 100 non-finite steps in a row, then the NaNs reach the parameters.

  No warning (a host callback in the step cost every step 0.13-0.18 ms on CPU): a run that
  only skips shows up as NaN parameters and loss instead of a frozen, healthy-looking model.
  """
  tx = fop_optax.sgd_hd(1e-3)
  params, state, caught = run(tx, [NAN] * 100)
  assert caught == []
  assert int(state.skipped_steps) == 100
  np.testing.assert_array_equal(params, jnp.ones(2))   # all 100 skipped
  params, state, caught = run(tx, [NAN] * 101)
  assert caught == []
  assert bool(jnp.isnan(params).all())   # the 101st reached the parameters
  assert int(state.skipped_steps) == 100


def test_alias_step_holds_no_host_callback():
  """The aliases' compiled step has no host callback (it would cost every step, see for_alias)."""
  tx = fop_optax.fop(0.1)
  params = {'w': jnp.ones((3, 2))}
  state = tx.init(params)
  text = jax.jit(lambda g, s: tx.update(g, s, params)).lower(params, state).as_text()
  assert 'callback' not in text.lower()
  with_warning = fop_optax.skip_nonfinite(optax.sgd(0.1))
  text = jax.jit(lambda g, s: with_warning.update(g, s)).lower(
      params, with_warning.init(params)).as_text()
  assert 'callback' in text.lower()   # the check above can fail


def test_finite_step_resets_the_run_and_short_runs_are_silent():
  tx = fop_optax.skip_nonfinite(optax.sgd(0.1), warn_after=4)
  grads = ([NAN] * 3 + [ONE]) * 5  # 15 bad steps, never 4 in a row
  _, state, caught = run(tx, grads)
  assert caught == []
  assert int(state.skipped_steps) == 15
  assert int(state.consecutive_nonfinite) == 0
  _, state, _ = run(tx, grads + [NAN, NAN])
  assert int(state.consecutive_nonfinite) == 2


def test_max_consecutive_errors_lets_the_failure_through():
  tx = fop_optax.skip_nonfinite(optax.sgd(0.1), max_consecutive_errors=3, warn_after=2)
  params, state, caught = run(tx, [NAN] * 3)
  np.testing.assert_array_equal(params, jnp.ones(2))  # three skipped
  assert int(state.skipped_steps) == 3
  params, state, caught = run(tx, [NAN] * 4)
  assert bool(jnp.isnan(params).all())  # the fourth reached the parameters
  assert int(state.skipped_steps) == 3
  assert int(state.consecutive_nonfinite) == 4
  assert 'max_consecutive_errors is reached' in str(caught[-1].message)
  # After a finite step, skipping starts again.
  params, state, _ = run(tx, [NAN] * 2 + [ONE] + [NAN] * 3)
  assert bool(jnp.isfinite(params).all())
  assert int(state.skipped_steps) == 5


def test_no_warning_for_a_healthy_run():
  tx = fop_optax.fop(0.05)
  _, state, caught = run(tx, [ONE * 0.1] * 50, params=jnp.ones(2))
  assert caught == [] and int(state.skipped_steps) == 0


@pytest.mark.parametrize('kwargs,match', [
    (dict(max_consecutive_errors=-1), 'max_consecutive_errors must be None or an int >= 0'),
    (dict(max_consecutive_errors=2.5), 'max_consecutive_errors'),
    (dict(warn_after=0), 'warn_after must be None or an int >= 1'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fop_optax.skip_nonfinite(optax.sgd(0.1), **kwargs)


def test_warn_after_none_is_silent():
  tx = fop_optax.skip_nonfinite(optax.sgd(0.1), warn_after=None)
  _, state, caught = run(tx, [NAN] * 10)
  assert caught == [] and int(state.skipped_steps) == 10


def test_state_can_be_donated():
  """No two leaves of the state share a buffer (donation would reject it)."""
  import optax
  tx = fop_optax.fop(0.05)
  params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p)[1], donate_argnums=(1,))
  for _ in range(2):
    state = step(params, state, jax.tree.map(jnp.ones_like, params))
  assert int(state.skipped_steps) == 0
