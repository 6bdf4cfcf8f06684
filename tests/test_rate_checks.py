"""Non-finite or negative rates are rejected up front, as numbers, arrays or schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax

FACTORIES = {
    'fop': fop_optax.fop,
    'fop_adam': fop_optax.fop_adam,
    'scale_by_fop': fop_optax.scale_by_fop,
    'sgd_hd': fop_optax.sgd_hd,
    'adam_hd': fop_optax.adam_hd,
    'scale_by_hypergradient': fop_optax.scale_by_hypergradient,
}
HD = ('sgd_hd', 'adam_hd', 'scale_by_hypergradient')

BAD = {
    'nan': (float('nan'), 'must be finite'),
    'inf': (float('inf'), 'must be finite'),
    'negative': (-0.1, 'must be > 0'),
    'zero': (0.0, 'must be > 0'),
    'numpy_nan': (np.float32('nan'), 'must be finite'),
    'jax_negative': (jnp.asarray(-1e-3), 'must be > 0'),
    'jax_inf': (jnp.asarray(jnp.inf), 'must be finite'),
}


@pytest.mark.parametrize('bad', BAD)
@pytest.mark.parametrize('name', FACTORIES)
def test_bad_learning_rate(name, bad):
  value, match = BAD[bad]
  with pytest.raises(ValueError, match=f'learning_rate {match}') as info:
    FACTORIES[name](value)
  if name in HD:
    assert 'FOP' not in str(info.value)
    assert name in str(info.value) or 'scale_by_hypergradient' in str(info.value)


@pytest.mark.parametrize('name', ['fop', 'fop_adam', 'scale_by_fop'])
@pytest.mark.parametrize('schedule,match', [
    (lambda count: jnp.nan * jnp.ones([]), 'at step 0 must be finite'),
    (optax.constant_schedule(-0.1), 'at step 0 must be >= 0'),
])
def test_bad_schedule_is_rejected_at_step_0(name, schedule, match):
  with pytest.raises(ValueError, match=match):
    FACTORIES[name](schedule)


def test_warmup_schedule_from_zero_is_fine():
  tx = fop_optax.fop(optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100))
  params = jnp.ones((3, 2))
  tx.update(params, tx.init(params), params)


@pytest.mark.parametrize('name', FACTORIES)
def test_bad_hyper_learning_rate(name):
  with pytest.raises(ValueError, match='hyper_learning_rate must be finite'):
    FACTORIES[name](0.1, hyper_learning_rate=jnp.asarray(jnp.nan))
  with pytest.raises(ValueError, match='hyper_learning_rate must be >= 0'):
    FACTORIES[name](0.1, hyper_learning_rate=-1.0)


def test_issue_example_fop_nan_no_longer_skips_silently():
  with pytest.raises(ValueError, match='learning_rate must be finite'):
    fop_optax.fop(float('nan'))


@pytest.mark.parametrize('name', FACTORIES)
def test_inject_hyperparams_tracers_are_not_checked(name):
  """Under jit the injected rates are tracers: construction must still work."""
  factory = FACTORIES[name]
  tx = optax.inject_hyperparams(factory)(learning_rate=0.05)
  params = {'w': jnp.ones((3, 2))}
  state = jax.jit(tx.init)(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_hd_dtype_errors_do_not_say_fop():
  for name in HD:
    with pytest.raises(TypeError, match='hypergradient descent needs') as info:
      FACTORIES[name](0.1).init({'w': jnp.arange(3)})
    assert 'FOP' not in str(info.value)
  with pytest.raises(TypeError, match='FOP needs'):
    fop_optax.fop(0.1).init({'w': jnp.arange(3)})
