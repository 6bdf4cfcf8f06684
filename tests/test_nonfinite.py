"""skip_nonfinite: counts, a warning when a run only skips, the max_consecutive_errors bound and its warning."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax.nonfinite import NonFiniteLetThroughWarning, NonFiniteStepsWarning


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


def test_default_alias_lets_the_failure_through_after_100_and_says_so():
  """The aliases skip up to 100 non-finite steps in a row, then warn and let the NaNs through.

  The warning (a NonFiniteLetThroughWarning) names what happened and how many steps were
  skipped; a run that only skips shows up as a warning plus NaN parameters and loss
  instead of a frozen, healthy-looking model.
  """
  tx = fop_optax.sgd_hd(1e-3)
  params, state, caught = run(tx, [NAN] * 100)
  assert caught == []
  assert int(state.skipped_steps) == 100
  np.testing.assert_array_equal(params, jnp.ones(2))   # all 100 skipped
  params, state, caught = run(tx, [NAN] * 150)
  assert bool(jnp.isnan(params).all())   # the 101st reached the parameters
  assert int(state.skipped_steps) == 100
  assert len(caught) == 1                # once, not on each of the 50 steps let through
  assert caught[0].category is NonFiniteLetThroughWarning
  message = str(caught[0].message)
  assert '101 steps in a row had NaN/Inf' in message
  assert '(100 skipped in all)' in message
  assert 'max_consecutive_errors=100 is reached' in message
  assert 'let through to the parameters' in message


def _step_by_step(tx, grads, params):
  """One jitted call per step: which steps warned, and whether the parameters were finite after."""
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  state = tx.init(params)
  warned, finite = [], []
  for i, g in enumerate(grads):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      params, state = step(params, state, g)
      jax.block_until_ready(params)
      jax.effects_barrier()
    if any(issubclass(w.category, NonFiniteLetThroughWarning) for w in caught):
      warned.append(i)
    finite.append(bool(jnp.isfinite(params).all()))
  return warned, finite, state


@pytest.mark.parametrize('make', [lambda: fop_optax.sgd_hd(1e-3), lambda: fop_optax.fop(0.05)],
                         ids=['sgd_hd', 'fop'])
def test_alias_warns_exactly_at_the_step_that_lets_nans_through(make):
  """Steps 0-99 (0-based) are skipped silently; step 100 warns and is the first to reach the params."""
  grads = [ONE * 0.1] * 5 + [NAN] * 100 + [NAN] * 3
  warned, finite, state = _step_by_step(make(), grads, jnp.ones(2))
  assert warned == [105]
  assert all(finite[:105]) and not any(finite[105:])
  assert int(state.skipped_steps) == 100


def test_alias_finite_steps_and_interrupted_runs_do_not_warn():
  """A finite step resets the run: 100 NaN, 1 finite, 100 NaN never lets anything through."""
  grads = [NAN] * 100 + [ONE * 0.1] + [NAN] * 100 + [ONE * 0.1] * 3
  warned, finite, state = _step_by_step(fop_optax.sgd_hd(1e-3), grads, jnp.ones(2))
  assert warned == [] and all(finite)
  assert int(state.skipped_steps) == 200
  _, _, caught = run(fop_optax.adam_hd(1e-3), [ONE * 0.1] * 300)
  assert caught == []


def test_let_through_warning_under_vmap_warns_once_for_the_member_that_crosses():
  """Under vmap (its custom_vmap rule: one scalar predicate, any over the batch) it warns once."""
  tx = fop_optax.skip_nonfinite(optax.sgd(0.1), max_consecutive_errors=3, warn_after=None)
  grads = jnp.stack([jnp.stack([ONE] * 6), jnp.stack([NAN] * 6)])   # member 1: all NaN

  def one(g):
    def body(c, gi):
      p, s = c
      u, s = tx.update(gi, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (jnp.ones(2), tx.init(jnp.ones(2))), g)[0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    params, state = jax.jit(jax.vmap(one))(grads)
    jax.effects_barrier()
  caught = [w for w in caught if issubclass(w.category, NonFiniteLetThroughWarning)]
  assert len(caught) == 1 and '(3 skipped in all)' in str(caught[0].message)
  assert bool(jnp.isfinite(params[0]).all()) and bool(jnp.isnan(params[1]).all())
  np.testing.assert_array_equal(state.skipped_steps, [0, 3])


def test_vmapped_alias_does_not_call_the_host_on_every_step():
  """A plain lax.cond with a batched predicate is a select: the host would be called per step.

  Counted with a finite run of 200 vmapped steps: the host function never runs.
  """
  calls = []
  real = fop_optax.nonfinite._announce_let_through

  def counting(*args):
    calls.append(1)
    return real(*args)
  tx = fop_optax.sgd_hd(1e-3)

  def one(a):
    def body(c, _):
      p, s = c
      u, s = tx.update(a * p, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (jnp.ones(2), tx.init(jnp.ones(2))), length=200)[0]
  fop_optax.nonfinite._announce_let_through = counting
  try:
    params, state = jax.jit(jax.vmap(jax.vmap(one)))(jnp.ones((2, 3)))
    jax.block_until_ready(params)
  finally:
    fop_optax.nonfinite._announce_let_through = real
  assert calls == [] and int(state.skipped_steps.sum()) == 0


def test_alias_step_has_no_jax_effect():
  """The aliases' compiled step has no JAX effect, so jit keeps its C++ dispatch fast path.

  A ``jax.debug.callback`` (an unordered effect) cost every step 0.13-0.18 ms on CPU even
  inside a ``lax.cond`` that never fired; the let-through warning is a ``jax.pure_callback``
  (no effect) in such a cond. The lowered step does hold that callback.
  """
  tx = fop_optax.fop(0.1)
  params = {'w': jnp.ones((3, 2))}
  state = tx.init(params)
  step = lambda g, s: tx.update(g, s, params)
  assert jax.make_jaxpr(step)(params, state).effects == set()
  assert 'callback' in jax.jit(step).lower(params, state).as_text().lower()
  with_warning = fop_optax.skip_nonfinite(optax.sgd(0.1))   # warn_after: a debug callback
  jaxpr = jax.make_jaxpr(lambda g, s: with_warning.update(g, s))(params, with_warning.init(params))
  assert jaxpr.effects != set()   # the check above can fail


def test_every_alias_wraps_skip_nonfinite_at_the_top_of_its_state():
  """skipped_steps sits at the same place, state.skipped_steps, in every alias's state."""
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  aliases = {
      'fop': fop_optax.fop(0.1), 'fop_adam': fop_optax.fop_adam(0.1),
      'sgd_hd': fop_optax.sgd_hd(0.1), 'sgd_hd_momentum': fop_optax.sgd_hd(0.1, momentum=0.9),
      'adam_hd': fop_optax.adam_hd(0.1), 'lodo': fop_optax.lodo(0.1)}
  for name, tx in aliases.items():
    state = tx.init(params)
    assert isinstance(state, fop_optax.nonfinite.SkipNonFiniteState), name
    assert state._fields.index('skipped_steps') == 0, name
    assert int(state.skipped_steps) == 0, name
  for name, tx in aliases.items():   # and skip_nonfinite=False removes exactly that layer
    fn = getattr(fop_optax, name.replace('_momentum', ''))
    assert not isinstance(fn(0.1, skip_nonfinite=False).init(params),
                          fop_optax.nonfinite.SkipNonFiniteState), name


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
  messages = [str(w.message) for w in caught]
  assert any('max_consecutive_errors is reached' in m for m in messages)   # warn_after's
  let = [w for w in caught if w.category is NonFiniteLetThroughWarning]   # and the let-through one
  assert len(let) == 1 and '(3 skipped in all)' in str(let[0].message)
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
