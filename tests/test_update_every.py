"""``update_every=k``: the hyper step runs on calls k, 2k, ... only, and is still exact there."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S

ETA = 0.2
PARAMS = {'wide': jnp.zeros((20, 6)), 'small': jnp.zeros((5, 3))}
STRUCTS = {'wide': S.LowRank(rank=2), 'small': S.Full()}


def _grads(i):
  key = jax.random.fold_in(jax.random.key(3), i)
  return {n: jax.random.normal(jax.random.fold_in(key, j), p.shape, p.dtype)
          for j, (n, p) in enumerate(PARAMS.items())}


@pytest.mark.parametrize('every', [1, 3])
def test_hyper_step_only_every_k_calls_and_exact_there(every):
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: p.astype(jnp.float64), PARAMS)
    tx = fop_optax.scale_by_fop(ETA, hyper_optimizer=optax.sgd(1.0), structures=STRUCTS,
                                max_scale=None, update_every=every)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ms = state.preconditioners
    g_prev = None
    for i in range(7):
      g = jax.tree.map(lambda x: x.astype(jnp.float64), _grads(i))
      out, state = update(g, state)
      learns = i > 0 and i % every == 0
      for name, st in STRUCTS.items():
        expected_m = ms[name]
        if learns:
          expected_m = ms[name] - st.hypergradient(ms[name], g[name], g_prev[name], ETA)
        np.testing.assert_allclose(state.preconditioners[name], expected_m, rtol=1e-12, atol=1e-14)
        # The update of every call is P·G with the M just learned (or kept).
        np.testing.assert_allclose(out[name], st.precondition(expected_m, g[name]),
                                   rtol=1e-12, atol=1e-14)
      changed = any(not np.array_equal(state.preconditioners[n], ms[n]) for n in STRUCTS)
      assert changed == learns, (i, changed)
      ms, g_prev = state.preconditioners, g


def test_aliases_take_update_every():
  for tx in (fop_optax.fop(0.1, update_every=4), fop_optax.fop_adam(1e-3, update_every=4)):
    start = fop_optax.diagnostics.find_fop_state(tx.init(PARAMS)).preconditioners
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    learned = []
    for i in range(6):
      _, state = step(_grads(i), state, PARAMS)
      m = fop_optax.diagnostics.find_fop_state(state).preconditioners
      learned.append(any(not np.array_equal(a, b)
                         for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(start))))
    assert learned == [False] * 4 + [True] * 2   # the first hyper step is call 4 (the fifth)


@pytest.mark.parametrize('bad', [0, -2, 1.5, True, '2'])
def test_update_every_rejects_non_positive_ints(bad):
  with pytest.raises(ValueError, match='update_every'):
    fop_optax.scale_by_fop(0.1, update_every=bad)
