"""The shared LM task (``examples/lm.py``): pinned corpus, model size, loss at init, trainability.

Cheap: one fixed batch of 8 windows of 64 bytes, the default model initialised once, 30 Adam
steps in one jitted scan. FOP-Adam runs on a one-layer, width-32 version of the same model
(same layers: Einsum attention, Linear MLP, Embed tables): compiling its update is most of this
file's time, and that scales with the number of preconditioned leaves; the default model's
FOP step is timed by ``python3 -m benchmarks.before_after --models lm``.
"""

from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from examples import lm


@pytest.fixture(scope='module')
def batch():
  return lm.fixed_batch(batch=8, seq=64, seed=0)


@pytest.fixture(scope='module')
def params():
  return lm.init_params(0)


def test_corpus_is_the_pinned_text():
  tokens = lm.load_corpus()
  assert tokens.dtype == np.uint8 and tokens.shape == (lm.CORPUS_BYTES,)
  assert 20 <= len(lm.CORPUS_FILES) <= 40
  train, valid = lm.split(tokens)
  assert len(train) + len(valid) == len(tokens)
  assert len(valid) == round(0.1 * len(tokens))
  np.testing.assert_array_equal(valid, tokens[-len(valid):])   # the last 10%


def _copy_corpus(tmp_path):
  root = tmp_path / 'lib'
  root.mkdir()
  for name in lm.CORPUS_FILES:
    shutil.copy(os.path.join(lm.default_root(), name), root / name)
  return root


def test_corpus_from_another_root(tmp_path):
  root = _copy_corpus(tmp_path)
  np.testing.assert_array_equal(lm.load_corpus(str(root)), lm.load_corpus())


def test_tampered_file_is_named(tmp_path):
  root = _copy_corpus(tmp_path)
  with open(root / 'heapq.py', 'ab') as f:
    f.write(b'# edited\n')
  with pytest.raises(ValueError, match=r'heapq\.py.*sha256'):
    lm.load_corpus(str(root))


def test_missing_file_is_named(tmp_path):
  root = _copy_corpus(tmp_path)
  (root / 'textwrap.py').unlink()
  with pytest.raises(FileNotFoundError, match=r'textwrap\.py'):
    lm.load_corpus(str(root))


def test_batches_are_windows_of_the_text():
  tokens = np.arange(1000) % 256
  b = lm.batches(tokens, 4, 16, jax.random.key(3))
  assert b.shape == (4, 17) and b.dtype == jnp.int32
  # consecutive tokens: each row is one contiguous window
  np.testing.assert_array_equal(np.diff(np.asarray(b), axis=1) % 256, 1)


def test_model_size_and_structure(params):
  assert lm.param_count(params) == lm.DEFAULT_PARAM_COUNT
  assert 100_000 <= lm.DEFAULT_PARAM_COUNT <= 200_000
  assert lm.config_of(params) == lm.DEFAULTS
  attn = params['blocks'][0]['attn']
  assert attn['query']['kernel'].shape == (64, 4, 16)
  assert attn['out']['kernel'].shape == (4, 16, 64)
  # FOP's default rule reads the Einsum kernels as the layers compute them.
  rows = {d.path: d.rows for d in fop_optax.describe(params)}
  assert rows['blocks/0/attn/query/kernel'] == (0,)
  assert rows['blocks/1/attn/value/kernel'] == (0,)
  assert rows['blocks/0/attn/out/kernel'] == (0, 1)


def test_loss_at_init_is_about_ln_256(params, batch):
  loss = float(jax.jit(lm.loss_fn)(params, batch))
  assert abs(loss - math.log(256)) < 0.15


def test_adam_fits_one_batch(params, batch):
  tx = optax.adam(3e-3)

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(lm.loss_fn)(p, batch)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=30)
    return lm.loss_fn(p, batch), losses[0]

  final, first = (float(x) for x in run(params))
  assert final < 0.8 * first, (first, final)


def test_fop_adam_runs_jitted(batch):
  params = lm.init_params(0, layers=1, width=32, heads=2, seq=32)
  tokens = batch[:, :33]
  tx = fop_optax.fop_adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lm.loss_fn)(p, tokens)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return p, s, loss, lm.loss_fn(p, tokens)

  losses = []
  for _ in range(3):
    params, state, loss, final = step(params, state)
    losses.append(float(loss))
  final = float(final)
  assert all(math.isfinite(x) for x in losses + [final])
  assert final < losses[0]
