"""FopState.spans: what a step decomposes of each M, kept for the next step.

Low rank under the guard keeps ``(M, Q, T, μ, W, QᵀG)`` (its span basis and
eigenpairs, and the basis' product with the gradient the step preconditioned),
so the next step's hypergradient and a step that does not learn need no QR and
no eigensolver of their own, and the hypergradient no pass over ``G_{t-1}`` for
``QᵀG_{t-1}``. Checked here: the kept span is
the decomposition of the stored ``M`` (against a float64 dense oracle), also
after the guard shrank ``V``; a run with spans equals one without to
rounding; a span is never used for another ``M``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax

jax.config.update('jax_enable_x64', False)


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {'w': 0.3 * jax.random.normal(k[0], (96, 40)),     # low rank (96 > 32 rows)
          'c': 0.3 * jax.random.normal(k[1], (3, 3, 2, 4)),  # spatial
          'b': jnp.zeros((40,))}


def _loss(p):
  return sum(jnp.sum(jnp.sin(2 * v) * v + 0.1 * v ** 2) for v in jax.tree.leaves(p))


def _run(tx, steps, state_fn=lambda s: s):
  params = _params()
  state = state_fn(tx.init(params))
  update = jax.jit(tx.update)
  states, outs = [], []
  for _ in range(steps):
    u, state = update(jax.grad(_loss)(params), state, params)
    params = optax.apply_updates(params, u)
    states.append(state)
    outs.append(u)
  return params, states, outs


def _low_rank_span(state):
  return state.spans['w']


def _dense_p(m):
  u, v = np.asarray(m[0], np.float64), np.asarray(m[1], np.float64)
  mm = np.eye(u.shape[0]) + u @ v.T
  return mm.T @ mm


@pytest.mark.parametrize('hyper_lr', [1e-2, 0.3])
def test_the_kept_span_is_the_decomposition_of_the_stored_m(hyper_lr):
  tx = fop_optax.scale_by_fop(0.1, hyper_learning_rate=hyper_lr)
  _, states, _ = _run(tx, 8)
  top = []
  # init stores a placeholder (zeros: no solver in init); every call, learning or not,
  # stores the span of the M it applied and of the gradient it preconditioned.
  assert not any(np.any(np.asarray(x)) for x in _low_rank_span(tx.init(_params())))
  for state in states:
    m0, q, t, mu, w, qg = _low_rank_span(state)
    np.testing.assert_array_equal(np.asarray(m0), np.asarray(state.preconditioners['w']))
    q64 = np.asarray(q, np.float64)
    np.testing.assert_allclose(q64.T @ q64, np.eye(q.shape[1]), atol=1e-5)
    # P = I + Q (W diag(μ) Wᵀ) Qᵀ, and [U, V] = Q T.
    w64, mu64 = np.asarray(w, np.float64), np.asarray(mu, np.float64)
    p_span = np.eye(q.shape[0]) + q64 @ (w64 * mu64) @ w64.T @ q64.T
    p = _dense_p(m0)
    np.testing.assert_allclose(p_span, p, atol=2e-5 * max(1.0, np.abs(p).max()))
    np.testing.assert_allclose(q64 @ np.asarray(t, np.float64),
                               np.concatenate([np.asarray(m0[0]), np.asarray(m0[1])], 1),
                               atol=1e-5)
    # QᵀG of the gradient this step preconditioned: the one it stored for the next step.
    np.testing.assert_allclose(qg, q64.T @ np.asarray(state.last_gradient['w'], np.float64),
                               atol=1e-5 * max(1.0, float(np.abs(qg).max())))
    top.append(np.linalg.eigvalsh(p)[-1])
  if hyper_lr == 0.3:
    # The guard shrank V (the raw λ_max held at 2·max_scale): T's V half was rescaled too.
    assert max(top) > 1.9


@pytest.mark.parametrize('every', [None, 2])
def test_spans_change_nothing_but_rounding(every):
  # every=2: a call that does not learn stores QᵀG of its own input, which the next
  # (learning) call's hypergradient takes as QᵀG_{t-1}; a stale one would differ here.
  tx = fop_optax.fop(0.1, momentum=0.9, hyper_learning_rate=0.1, update_every=every)
  with_spans, states, outs = _run(tx, 10)
  without, states0, outs0 = _run(tx, 10, lambda s: _strip_spans(s))
  assert all(_fop(s).spans == () for s in states0)
  for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(outs0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  # The M's after 10 Adam hyper steps: Adam's m/√v turns rounding in a hypergradient
  # entry near 0 into a relative difference of that entry, so compare at M's scale.
  for a, b in zip(jax.tree.leaves(_fop(states[-1]).preconditioners),
                  jax.tree.leaves(_fop(states0[-1]).preconditioners)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                               atol=1e-4 * max(1.0, float(np.abs(b).max())))


def test_a_span_is_never_used_for_another_m():
  tx = fop_optax.scale_by_fop(0.1, hyper_learning_rate=0.1, update_every=2)
  params = _params()
  _, states, _ = _run(tx, 4)
  state = states[-1]   # the next call (count 4) learns; count 5 does not
  g = jax.grad(_loss)(params)
  replaced = jax.tree.map(lambda m: 0.5 * m, state.preconditioners)
  stale = state._replace(preconditioners=replaced)            # spans for the old M
  fresh = _strip_spans(stale)                                 # nothing to reuse
  for s1, s2 in [(stale, fresh), (stale._replace(count=state.count + 1),
                                  fresh._replace(count=state.count + 1))]:
    u1, _ = jax.jit(tx.update)(g, s1, params)
    u2, _ = jax.jit(tx.update)(g, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def _fop(state):
  return state if isinstance(state, fop_optax.FopState) else [
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, fop_optax.FopState))
      if isinstance(s, fop_optax.FopState)][0]


def _strip_spans(state):
  """The same state built by hand without spans (FopState's default ``()``)."""
  if isinstance(state, fop_optax.FopState):
    return fop_optax.FopState(state.count, state.preconditioners, state.last_gradient,
                              state.hyper_state)
  strip = lambda s: _strip_spans(s) if isinstance(s, fop_optax.FopState) else s
  return jax.tree.map(strip, state, is_leaf=lambda x: isinstance(x, fop_optax.FopState))
