"""FOP cannot amplify the base step past its bound along any direction.

Properties the code guarantees, checked at *every* step of noisy runs at a hyper
learning rate far above the paper's: ``λ_max(P) ≤ max_scale`` for every structure
(the guard computes λ_max exactly), FOP-norm's ``‖P̃‖₂ = 1``, and the default
bound keeps a run stable that unbounded FOP wrecks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S

PARAMS = {
    'conv': jnp.full((3, 3, 2, 2), 0.1, jnp.float32),
    'dense': jnp.full((6, 4), 0.2, jnp.float32),
    'wide': jnp.full((70, 3), 0.05, jnp.float32),   # low-rank under the default rule
    'bias': jnp.zeros(4, jnp.float32),
}
# float32 eigenvalues of the (a×a) or (2r×2r) matrices: a few ulps of slack.
RTOL = 1e-4


def noisy_loss(params, key):
  """Each key is a different minibatch; the noise makes P's hypergradient noisy too."""
  noise = jax.random.normal(key, (4,))
  total = 0.0
  for i, x in enumerate(jax.tree.leaves(params)):
    total += jnp.mean((x - 0.5 * noise[i % 4]) ** 2) + 0.1 * jnp.mean(jnp.sin(3 * x))
  return total


def dense_lambda_max(structure, m, normalize=False):
  """Oracle: λ_max of P from a dense float64 ``M`` (numpy), independent of the structure's maths."""
  m = np.asarray(m, np.float64)
  if isinstance(structure, S.NoPreconditioner):
    return 1.0
  if isinstance(structure, (S.Scalar, S.Diagonal)):
    return float(np.max(m ** 2))
  if isinstance(structure, S.LowRank):
    m = np.eye(m.shape[1]) + m[0] @ m[1].T
  lam = np.linalg.eigvalsh(m.T @ m)[-1]
  return 1.0 if normalize else float(lam)


def lambda_max_trajectory(tx, structures, normalize, steps, params=PARAMS, every=10):
  """Per leaf, λ_max of the P applied at every ``every``-th of ``steps`` noisy steps (oracle)."""
  structs = jax.tree.leaves(fop_optax.resolve_structures(params, structures, normalize=normalize))

  @jax.jit
  def run(params):
    def body(carry, i):
      params, state = carry
      grads = jax.grad(noisy_loss)(params, jax.random.key(i))
      updates, state = tx.update(grads, state, params)
      ms = fop_optax.diagnostics.find_fop_state(state).preconditioners
      return (optax.apply_updates(params, updates), state), ms
    (_, state), ms = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return ms, state
  ms, state = run(params)
  ms = [np.asarray(m) for m in jax.tree.leaves(ms)]
  lams = np.array([[dense_lambda_max(s, m[t]) for s, m in zip(structs, ms)]
                   for t in range(0, steps, every)] + [[dense_lambda_max(s, m[-1]) for s, m in zip(structs, ms)]])
  return lams, structs, state, ms


@pytest.mark.parametrize('structures', ['auto', 'full', 'low_rank', 'diagonal', 'scalar'])
@pytest.mark.parametrize('bound', [1.0, 2.0])
def test_lambda_max_never_exceeds_the_bound(structures, bound):
  tx = fop_optax.fop(0.05, hyper_learning_rate=0.1, structures=structures, max_scale=bound)
  lams, structs, state, _ = lambda_max_trajectory(tx, structures, False, 1500, every=1)
  assert np.isfinite(lams).all()
  assert int(state.skipped_steps) == 0
  assert lams.max() <= bound * (1 + RTOL), lams.max(axis=0)
  # Not vacuous: without the guard the same run's P does go past the bound.
  free = fop_optax.fop(0.05, hyper_learning_rate=0.1, structures=structures, max_scale=None)
  assert lambda_max_trajectory(free, structures, False, 1500, every=50)[0].max() > bound * 1.05


@pytest.mark.parametrize('structures', ['auto', 'full', 'low_rank'])
def test_fop_norm_has_unit_spectral_norm_at_every_step(structures):
  tx = fop_optax.fop(0.05, hyper_learning_rate=0.1, structures=structures, normalize=True)
  _, structs, state, ms = lambda_max_trajectory(tx, structures, True, 1000)
  moved = False
  for s, m in zip(structs, ms):
    if isinstance(s, S.NoPreconditioner):
      continue
    for t in range(0, 1000, 25):
      lam = float(s.max_eigenvalue(jnp.asarray(m[t])))
      np.testing.assert_allclose(lam, 1.0, rtol=RTOL)
      # P̃ = P/λ_max(P) against the dense float64 oracle.
      p = np.asarray(s.matrix(jnp.asarray(m[t]), ()), np.float64)
      mm = np.asarray(m[t], np.float64)
      if isinstance(s, S.LowRank):
        mm = np.eye(mm.shape[1]) + mm[0] @ mm[1].T
      dense = mm.T @ mm
      np.testing.assert_allclose(p, dense / np.linalg.eigvalsh(dense)[-1], atol=1e-4)
    moved |= float(np.linalg.eigvalsh(p)[0]) < 0.9   # ... and P̃ really moved away from I
  assert moved


def test_guard_is_exact_not_conservative():
  """A P just over the bound is shrunk onto it (λ_max = bound), not far below."""
  key = jax.random.key(3)
  for structure, shape in [(S.Full(), (6, 4)), (S.Spatial(), (3, 3, 2, 2)),
                           (S.LowRank(rank=3), (20, 4))]:
    m0 = structure.init(shape, jnp.float32, key)
    m = m0 + 0.5 * jax.random.normal(jax.random.fold_in(key, 1), m0.shape)
    lam = float(structure.max_eigenvalue(m))
    assert lam > 2.5, (structure, lam)
    clipped = float(structure.max_eigenvalue(structure.clip(m, 2.0)))
    assert 2.0 * (1 - 1e-3) <= clipped <= 2.0 * (1 + RTOL), (structure, clipped)
    np.testing.assert_array_equal(structure.clip(m, 2 * lam), m)  # within the bound: untouched


def test_max_scale_below_one_is_rejected():
  with pytest.raises(ValueError, match='max_scale must be >= 1'):
    fop_optax.scale_by_fop(0.1, max_scale=0.5)


# A noisy quadratic 1/2 Σ_i h_i ‖x_i‖² on a (64, 16) kernel, rows of curvature 0.01..1,
# at a step η = 1.5 that heavy-ball momentum (β = 0.9) takes stably: η·h_max = 1.5 < 2(1 + β).
CURVATURE = jnp.logspace(-2, 0, 64)
ETA, BETA = 1.5, 0.9


def _quadratic_run(structures, max_scale, steps=3000):
  tx = fop_optax.fop(ETA, BETA, hyper_learning_rate=1e-2, structures=structures,
                     max_scale=max_scale)
  structure = jax.tree.leaves(fop_optax.resolve_structures(jnp.zeros((64, 16)), structures))[0]

  @jax.jit
  def run(x):
    def body(carry, i):
      x, state = carry
      g = CURVATURE[:, None] * x + 0.1 * jax.random.normal(jax.random.key(i), x.shape)
      updates, state = tx.update(g, state, x)
      x = optax.apply_updates(x, updates)
      m = fop_optax.diagnostics.find_fop_state(state).preconditioners
      return (x, state), (structure.max_eigenvalue(m), 0.5 * jnp.sum(CURVATURE[:, None] * x ** 2))
    _, out = jax.lax.scan(body, (x, tx.init(x)), jnp.arange(steps))
    return out
  lams, losses = run(jnp.ones((64, 16)))
  return np.asarray(lams), np.asarray(losses)


@pytest.mark.parametrize('structures', ['full', 'low_rank'])
def test_default_bound_keeps_a_run_stable_that_unbounded_fop_wrecks(structures):
  limit = 2 * (1 + BETA) / (ETA * float(CURVATURE.max()))   # largest stable λ_max(P)
  lams, losses = _quadratic_run(structures, fop_optax.transform.DEFAULT_MAX_SCALE)
  assert lams.max() <= fop_optax.transform.DEFAULT_MAX_SCALE * (1 + RTOL) < limit
  start = 0.5 * 16 * float(CURVATURE.sum())
  assert np.isfinite(losses).all() and losses[-500:].mean() < 0.5 * start, losses[-500:].mean()
  # Without the guard, P's largest eigenvalue goes past the stability limit.
  free_lams, _ = _quadratic_run(structures, None)
  assert free_lams.max() > limit, (free_lams.max(), limit)
