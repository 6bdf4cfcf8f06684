"""benchmarks/_kfac_recipe.py: K-FAC (kfac-jax) with its authors' minibatch recipe.

A tiny MLP (20-16-16-3, batch 32): the recipe trains (loss falls over 20 steps), the schedule is
the examples' warm-up + cosine, every dense kernel is in a Kronecker-factored block, and a dense
layer written so that kfac-jax's graph matcher cannot see it (an elementwise product and a sum
instead of a matmul) is reported by name.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

if importlib.util.find_spec('kfac_jax') is None:
  pytest.skip('kfac_jax is not installed (pip install kfac-jax, or the "bench" extra)',
              allow_module_level=True)

from benchmarks import _kfac_recipe as R  # noqa: E402

SIZES = (20, 16, 16, 3)


def _params(seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SIZES) - 1)
  return {f'dense{i}': {'kernel': jax.random.normal(k, (a, b)) / np.sqrt(a),
                        'bias': jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))}


def _data(n=32 * 20, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, SIZES[0])).astype(np.float32)
  w = rng.normal(size=(SIZES[0], SIZES[-1])).astype(np.float32)
  return x, np.argmax(x @ w, -1).astype(np.int32)


def _loss(hide=None):
  kfac_jax = R._import_kfac()

  def apply(p, x):
    for i in range(len(SIZES) - 1):
      w, b = p[f'dense{i}']['kernel'], p[f'dense{i}']['bias']
      # A matmul the graph matcher does not recognise as a dense layer.
      x = ((x[:, :, None] * w[None]).sum(1) if i == hide else x @ w) + b
      x = jax.nn.tanh(x) if i < len(SIZES) - 2 else x
    return x

  def loss_fn(p, data):
    logits = apply(p, data[0])
    kfac_jax.register_softmax_cross_entropy_loss(logits, data[1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, data[1]).mean()
  return loss_fn


def test_schedule_is_warmup_then_cosine():
  s = R.recipe_schedule(1.0, 90)                 # warm-up 5/90 of 90 steps = 5
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 1.0, rtol=1e-6)
  assert 0.0 < float(s(2)) < float(s(4)) < 1.0
  np.testing.assert_allclose(float(s(5 + 85 // 2)), 0.5, atol=0.02)
  assert float(s(90)) == pytest.approx(0.0, abs=1e-6)


def test_recipe_trains_and_registers_every_dense_layer():
  x, y = _data()
  batch = lambda i: (jnp.asarray(x[32 * i:32 * (i + 1)]), jnp.asarray(y[32 * i:32 * (i + 1)]))
  params = _params()
  opt = R.kfac_recipe(3e-2, 1e-3, 20, _loss(), inverse_update_period=5)
  state = opt.init(params, batch(0))
  blocks = R.assert_all_dense_registered(opt, params)
  assert [blocks[f'dense{i}/kernel'] for i in range(3)] == ['DenseTwoKroneckerFactored'] * 3
  assert blocks['dense0/bias'] == 'DenseTwoKroneckerFactored'   # kernel and bias: one block
  assert len(R.registered_blocks(opt.optimizer, params)) == 6   # the optimizer works too
  losses = []
  for i in range(20):
    params, state, loss = opt.step(params, state, batch(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_hidden_dense_layer_is_named():
  x, y = _data(32)
  params = _params()
  opt = R.kfac_recipe(1e-2, 1e-3, 10, _loss(hide=1))
  opt.init(params, (jnp.asarray(x), jnp.asarray(y)))
  with pytest.raises(AssertionError, match=r'dense1/kernel \(16, 16\)') as err:
    R.assert_all_dense_registered(opt, params)
  assert 'dense0' not in str(err.value) and 'dense2' not in str(err.value)


def test_recipe_make_factory_takes_total_steps():
  make = R.recipe_make(1e-2)
  factory = make(1e-3, 'mlp')
  assert factory.needs_total_steps
  opt = factory(_loss(), total_steps=100)
  assert (opt.learning_rate, opt.damping, opt.total_steps) == (1e-3, 1e-2, 100)
  assert set(R.RECIPE_GRID) == {'learning_rate', 'damping'}
  assert R.RECIPE['damping'] in R.RECIPE_GRID['damping']
