"""Bad input is a clear error at construction or init, never a wrong answer later."""

import jax
import jax.numpy as jnp
import optax
import pytest

import fop_optax
from fop_optax import structures as S

ALIASES = [
    lambda: fop_optax.fop(0.1),
    lambda: fop_optax.fop_adam(0.1),
    lambda: fop_optax.sgd_hd(0.1),
    lambda: fop_optax.adam_hd(0.1),
    lambda: fop_optax.scale_by_fop(0.1),
    lambda: fop_optax.scale_by_hypergradient(0.1, 1e-3),
]


@pytest.mark.parametrize('make', ALIASES)
@pytest.mark.parametrize('leaf,kind', [
    (jnp.arange(4), 'integer'),
    (jnp.ones(3, bool), 'bool'),
    (jnp.ones((2, 2), jnp.complex64), 'complex'),
])
def test_non_float_leaves_rejected_at_init(make, leaf, kind):
  params = {'ok': jnp.ones((3, 3)), 'bad': leaf}
  with pytest.raises(TypeError, match=r"\['bad'\]"):
    make().init(params)


@pytest.mark.parametrize('structure,shape,match', [
    ('spatial', (4, 5), 'conv kernel'),
    (S.Spatial(), (7,), 'conv kernel'),
    (S.Full(row_axes=3), (4, 5), 'at least 3 axes'),
    (S.LowRank(rank=0), (4, 5), 'rank >= 1'),
    ('full', (), 'at least 1 axes'),
])
def test_structure_that_does_not_fit_the_leaf(structure, shape, match):
  params = {'w': jnp.ones(shape)}
  with pytest.raises(ValueError, match=match) as info:
    fop_optax.scale_by_fop(0.1, structures={'w': structure}).init(params)
  assert "['w']" in str(info.value)


def test_unknown_label_and_bad_structure_tree():
  params = {'a': jnp.ones((2, 2)), 'b': jnp.ones(3)}
  with pytest.raises(ValueError, match='unknown FOP structure'):
    fop_optax.scale_by_fop(0.1, structures='fancy').init(params)
  with pytest.raises(ValueError, match='prefix of the parameters'):
    fop_optax.scale_by_fop(0.1, structures={'a': 'full', 'c': 'none'}).init(params)


@pytest.mark.parametrize('kwargs,match', [
    (dict(learning_rate=0.0), 'learning_rate must be > 0'),
    (dict(learning_rate=-0.1), 'learning_rate must be > 0'),
    (dict(learning_rate=0.1, hyper_learning_rate=-1e-4), 'hyper_learning_rate must be >= 0'),
])
def test_bad_rates(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fop_optax.scale_by_fop(**kwargs)
  with pytest.raises(ValueError, match=match):
    fop_optax.fop(**kwargs)


def test_hd_aliases_reject_schedules_and_bad_rates():
  with pytest.raises(TypeError, match='learns the step size'):
    fop_optax.sgd_hd(optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match='hyper_learning_rate must be >= 0'):
    fop_optax.adam_hd(1e-3, -1.0)


def test_schedule_returning_non_scalar():
  tx = fop_optax.scale_by_fop(lambda count: jnp.ones(3) * 0.1)
  params = jnp.ones((2, 2))
  state = tx.init(params)
  with pytest.raises(ValueError, match='must be a scalar'):
    tx.update(params, state)


def test_mismatched_trees_between_init_and_update():
  tx = fop_optax.fop(0.1)
  state = tx.init({'a': jnp.ones((2, 2)), 'b': jnp.ones(2)})
  with pytest.raises(ValueError, match='does not match the tree'):
    tx.update({'a': jnp.ones((2, 2))}, state)
  with pytest.raises(ValueError, match=r"\['a'\] has shape \(3, 2\)"):
    tx.update({'a': jnp.ones((3, 2)), 'b': jnp.ones(2)}, state)
  hd = fop_optax.sgd_hd(0.1)
  with pytest.raises(ValueError, match='does not match the tree'):
    hd.update([jnp.ones(2)], hd.init({'a': jnp.ones(2)}))


def test_structural_int_injected_as_array():
  with pytest.raises(TypeError, match='static_args'):
    optax.inject_hyperparams(fop_optax.fop)(learning_rate=0.1, rank=4).init(jnp.ones((100, 3)))
  # With static_args it works.
  tx = optax.inject_hyperparams(fop_optax.fop, static_args=('rank',))(learning_rate=0.1, rank=4)
  state = tx.init(jnp.ones((100, 3)))
  m = fop_optax.diagnostics.find_fop_state(state).preconditioners
  assert m.shape == (2, 100, 4)


@pytest.mark.parametrize('structure', ['auto', 'none', 'scalar', 'diagonal', 'full', 'low_rank'])
def test_zero_size_and_scalar_leaves(structure):
  params = {'empty': jnp.ones((0, 3)), 'scalar': jnp.ones(()), 'w': jnp.ones((3, 2))}
  specs = {'empty': structure, 'scalar': 'auto' if structure in ('full', 'low_rank') else structure,
           'w': structure}
  tx = fop_optax.fop(0.1, structures=specs)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(params, state, params)
  assert updates['empty'].shape == (0, 3)
  assert updates['scalar'].shape == ()
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_scale_by_fop_alone_propagates_nan_as_documented():
  tx = fop_optax.scale_by_fop(0.1)
  params = {'w': jnp.ones((3, 2))}
  state = tx.init(params)
  _, state = tx.update(params, state)
  updates, state = tx.update({'w': jnp.full((3, 2), jnp.nan)}, state)
  assert bool(jnp.isnan(updates['w']).all())
