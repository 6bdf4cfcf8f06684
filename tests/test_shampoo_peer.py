"""benchmarks/_shampoo.py: Shampoo from precondition-opt (Google Research's distributed_shampoo)
imports on this JAX, trains a tiny MLP under jit, and its state round-trips through jit.

Skipped, with the reason, when precondition-opt is not installed (it is in the ``bench``
extra)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _shampoo

try:
  _shampoo._import_shampoo()
except ImportError as e:  # the reason names the package and the pip command
  pytest.skip(str(e), allow_module_level=True)


def _problem():
  """A 12-24-3 tanh MLP on 96 points of three Gaussian blobs (full batch)."""
  kx, ky, k1, k2 = jax.random.split(jax.random.key(0), 4)
  y = jax.random.randint(ky, (96,), 0, 3)
  centres = jax.random.normal(kx, (3, 12)) * 2.0
  x = centres[y] + jax.random.normal(jax.random.key(1), (96, 12))
  params = {'w1': jax.random.normal(k1, (12, 24)) / np.sqrt(12), 'b1': jnp.zeros(24),
            'w2': jax.random.normal(k2, (24, 3)) / np.sqrt(24), 'b2': jnp.zeros(3)}

  def loss(p):
    h = jnp.tanh(x @ p['w1'] + p['b1'])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p['w2'] + p['b2'], y).mean()
  return params, loss


def test_shampoo_trains_and_its_state_round_trips_through_jit():
  params, loss = _problem()
  # The classification preset with blocks of 8 (w1's 12x24 statistics are blocked) and
  # preconditioning from step 5, so the steps exercise the Shampoo branch, not only the graft.
  tx = _shampoo.shampoo(0.05, 'classify', block_size=8, start_preconditioning_step=5)
  eager = tx.init(params)
  state = jax.jit(tx.init)(params)
  assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(state)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  first = float(loss(params))
  for _ in range(30):
    params, state, _ = step(params, state)
  last = float(loss(params))
  assert np.isfinite(last) and last < 0.5 * first, (first, last)
  assert int(state.count) == 30
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(eager)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))
  # Shampoo itself ran: w1's preconditioners moved off their initial identities.
  assert any(not np.allclose(np.asarray(m), np.eye(m.shape[0]))
             for m in state.stats['w1'].preconditioners)


def test_import_reason_when_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, 'precondition', None)
  monkeypatch.setitem(sys.modules, 'precondition.distributed_shampoo', None)
  with pytest.raises(ImportError, match='pip install precondition-opt'):
    _shampoo._import_shampoo()
