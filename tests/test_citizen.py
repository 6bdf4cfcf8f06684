"""Every public optimiser through the same optax-citizen checks (registry: ``citizen.py``).

Like optax's ``contrib/_common_test.py``: jit without recompilation and with donated buffers;
float32, bfloat16 and float64 parameters; ``optax.inject_hyperparams``; ``optax.MultiSteps``;
``nnx.Optimizer``; Orbax bit-exact resume; a non-finite step skipped and counted; ``vmap`` over
seeds. ``tests/test_optax_harness.py`` runs optax's own alias tests on the aliases.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import fop_optax
from citizen import NOT_FACTORIES, REGISTRY

NAMES = sorted(REGISTRY)
LR = 0.05


def _params(dtype=jnp.float32, shift=0.0):
  return {'w': (jnp.linspace(-0.5, 0.5, 12).reshape(4, 3) + shift).astype(dtype),
          'b': jnp.full((3,), 0.2 + shift, dtype)}


def loss(params):
  def one(x):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(jnp.sin(x + 0.3) ** 2) + 0.5 * jnp.sum(x ** 2)
  return sum(one(x) for x in jax.tree.leaves(params))


def _step_fn(name, tx):
  entry = REGISTRY[name]

  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, **entry.extra(loss, params))
    return optax.apply_updates(params, updates), state
  return step


def _run(name, params, steps, tx=None):
  tx = REGISTRY[name].make(LR) if tx is None else tx
  step = jax.jit(_step_fn(name, tx))
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _assert_finite(tree):
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(x))), tree


def test_registry_covers_all_factories():
  """The registry holds every optimiser factory in ``fop_optax.__all__``, and nothing else."""
  exported = {getattr(fop_optax, n) for n in fop_optax.__all__
              if inspect.isfunction(getattr(fop_optax, n)) and n not in NOT_FACTORIES}
  registered = {entry.factory for entry in REGISTRY.values()}
  assert registered == exported, (
      f'missing: {sorted(f.__name__ for f in exported - registered)}; '
      f'not exported: {sorted(f.__name__ for f in registered - exported)}')
  for n in NOT_FACTORIES:
    assert n in fop_optax.__all__, n


@pytest.mark.parametrize('name', NAMES)
def test_jit_no_recompilation_with_donated_buffers(name):
  tx = REGISTRY[name].make(LR)
  step = jax.jit(_step_fn(name, tx), donate_argnums=(0, 1))
  params, state = step(_params(), tx.init(_params()))
  with test_utils.log_compilations() as logs:
    params, state = step(params, state)
    params, state = step(params, state)
  assert not logs, 'recompiled after the first step'
  _assert_finite(params)
  # Donation changes nothing: the same three steps without it.
  expected, _ = _run(name, _params(), 3)
  test_utils.assert_trees_all_close(params, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float64'])
@pytest.mark.parametrize('name', NAMES)
def test_dtypes(name, dtype):
  """Updates keep the parameters' dtype (bfloat16 and, with x64 on, float64) and stay finite."""
  with jax.enable_x64(dtype == 'float64'):
    params = _params(jnp.dtype(dtype))
    tx = REGISTRY[name].make(LR)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    updates, state = jax.jit(lambda g, s, p: tx.update(
        g, s, p, **REGISTRY[name].extra(loss, p)))(grads, state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype and u.shape == p.shape
    _assert_finite(updates)
    _assert_finite(state)


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams(name):
  """The injected optimiser steps as the plain one; a changed step size changes the step."""
  entry = REGISTRY[name]
  tx = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      **entry.kwargs(LR))
  params = _params()
  expected, _ = _run(name, params, 2)
  got, state = _run(name, params, 2, tx=tx)
  test_utils.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  if entry.learning_rate_arg is not None:
    state.hyperparams[entry.learning_rate_arg] = jnp.asarray(2 * LR)
    step = jax.jit(_step_fn(name, tx))
    faster, _ = step(got, state)
    slower, _ = step(got, tx.init(params)._replace(hyperparams={
        **state.hyperparams, entry.learning_rate_arg: jnp.asarray(LR)}))
    diff = max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(faster), jax.tree.leaves(slower)))
    assert diff > 0, 'the injected step size had no effect'


@pytest.mark.parametrize('name', NAMES)
def test_multisteps_accumulates_then_steps(name):
  """``MultiSteps(k=2)`` over two equal micro-batches equals one plain step.

  The defined behaviour: the inner update sees the mean gradient and the extra arguments
  (``value``, ``value_fn``, ...) of the micro-batch that completes the accumulation.
  """
  tx = REGISTRY[name].make(LR)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  step = jax.jit(_step_fn(name, multi))
  params, state = _params(), multi.init(_params())
  after_one, state = step(params, state)
  test_utils.assert_trees_all_close(after_one, params)   # accumulating: no move yet
  after_two, _ = step(after_one, state)
  expected, _ = _run(name, params, 1)
  test_utils.assert_trees_all_close(after_two, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_nnx_optimizer(name):
  """``nnx.Optimizer`` takes the optimiser and steps as optax does on the same state."""
  nnx = pytest.importorskip('flax.nnx')
  entry = REGISTRY[name]
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)
  graphdef, start = nnx.split(model, nnx.Param)

  def state_loss(p):
    return jnp.mean((nnx.merge(graphdef, p)(x) - 1.0) ** 2)

  grads = jax.grad(state_loss)(start)
  tx = entry.make(LR)
  updates, _ = tx.update(grads, tx.init(start), start, **entry.extra(state_loss, start))
  expected = optax.apply_updates(start, updates)   # before the model is updated in place
  optimizer = nnx.Optimizer(model, entry.make(LR), wrt=nnx.Param)
  optimizer.update(model, grads, **entry.extra(state_loss, start))
  test_utils.assert_trees_all_close(nnx.state(model, nnx.Param), expected, rtol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_orbax_resume_is_bit_exact(name, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  tx = REGISTRY[name].make(LR)
  step = jax.jit(_step_fn(name, tx))
  params, state = _params(), tx.init(_params())
  for _ in range(2):
    params, state = step(params, state)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', {'params': params, 'state': state})
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {'params': params, 'state': state})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'ckpt', abstract)
  p2, s2 = restored['params'], restored['state']
  for _ in range(2):
    params, state = step(params, state)
    p2, s2 = step(p2, s2)
  for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name', NAMES)
def test_nonfinite_step_is_skipped_and_counted(name):
  entry = REGISTRY[name]
  if not entry.skips_nonfinite:
    pytest.skip(f'{name} is a building block: the aliases wrap it in skip_nonfinite')
  tx = entry.make(LR)
  params = _params()
  state = tx.init(params)
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), jax.grad(loss)(params))
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **entry.extra(loss, p)))(
      bad, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(u), 0)
  assert int(optax.tree.get(state, 'skipped_steps')) == 1
  # the next finite step is the one a fresh optimiser takes
  step = jax.jit(_step_fn(name, tx))
  after, state = step(params, state)
  expected, _ = _run(name, params, 1)
  test_utils.assert_trees_all_close(after, expected, rtol=1e-6)
  assert int(optax.tree.get(state, 'skipped_steps')) == 1


@pytest.mark.parametrize('name', NAMES)
def test_vmap_over_seeds(name):
  """``vmap`` of init and step over stacked parameter sets equals one run per set."""
  sets = [_params(shift=s) for s in (0.0, 0.1, -0.2)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *sets)
  tx = REGISTRY[name].make(LR)
  step = jax.jit(jax.vmap(_step_fn(name, tx)))
  params, state = stacked, jax.vmap(tx.init)(stacked)
  for _ in range(2):
    params, state = step(params, state)
  for k, start in enumerate(sets):
    expected, _ = _run(name, start, 2)
    test_utils.assert_trees_all_close(jax.tree.map(lambda x: x[k], params), expected,
                                      rtol=2e-5, atol=1e-6)


def test_no_module_is_shadowed_by_a_function():
  """``import fop_optax.<name>`` never finds a module that the function ``fop_optax.<name>``
  hides (optax.contrib's style: the function's module is private, e.g. ``_lodo``)."""
  import importlib.util
  for name in fop_optax.__all__:
    if inspect.isfunction(getattr(fop_optax, name)):
      assert importlib.util.find_spec(f'fop_optax.{name}') is None, name


def test_a_checkpoint_of_another_state_layout_is_refused(tmp_path):
  """CHANGELOG's promise: restoring a state into another layout raises, naming the keys."""
  ocp = pytest.importorskip('orbax.checkpoint')
  params = _params()
  written = REGISTRY['fop'].make(LR).init(params)
  other = REGISTRY['fop_adam'].make(LR).init(params)   # another layout of the same params
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', written)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, other)
  with pytest.raises(ValueError, match='tree structures do not match'):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.restore(tmp_path / 'ckpt', abstract)
