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
import test_reliability
from fop_optax import structures as S

PARAMS = {
    'conv': jnp.full((3, 3, 2, 2), 0.1, jnp.float32),
    'dense': jnp.full((6, 4), 0.2, jnp.float32),
    'wide': jnp.full((70, 3), 0.05, jnp.float32),   # low-rank under the default rule
    'bias': jnp.zeros(4, jnp.float32),
}
# float32 eigenvalues of the (a×a) or (2r×2r) matrices: a few ulps of slack.
RTOL = 1e-4


# A noisy objective: each key is a different minibatch, so P's hypergradient is noisy too.
noisy_loss = test_reliability.loss


def applied_matrices(structure, ms, shape):
  """Oracle: the P each state applies, read off by preconditioning an identity probe.

  Float64 numpy arrays of shape (steps, a, a) (elementwise m² for scalar/diagonal),
  so λ_max comes from numpy's eigensolver, not from the structure's own maths.
  """
  ms = jnp.asarray(ms)
  if isinstance(structure, (S.Scalar, S.Diagonal)):
    return np.asarray(ms, np.float64) ** 2
  if isinstance(structure, S.NoPreconditioner):
    return np.ones((ms.shape[0], 1, 1))
  if isinstance(structure, S.Spatial):
    rows = shape[:-2]
  else:
    rows = shape[:structure.row_axes]
  a = int(np.prod(rows))
  extra = (1,) if isinstance(structure, S.Spatial) else ()  # (*taps, in, out) layout
  probe = jnp.eye(a, dtype=ms.dtype).reshape(*rows, a, *extra)
  p = jax.vmap(lambda m: structure.precondition(m, probe))(ms)
  p = np.asarray(p, np.float64).reshape(-1, a, a)
  return 0.5 * (p + np.swapaxes(p, 1, 2))


def oracle_lambda_max(structure, ms, shape):
  p = applied_matrices(structure, ms, shape)
  if p.ndim == 3 and p.shape[1] == p.shape[2] and not isinstance(structure, (S.Scalar, S.Diagonal)):
    return np.linalg.eigvalsh(p)[:, -1]
  return p.reshape(p.shape[0], -1).max(axis=1)


def lambda_max_trajectory(tx, structures, normalize, steps, params=PARAMS, max_scale=None):
  """Per step and leaf, λ_max of the P applied (oracle), the structures and the final state."""
  structs = jax.tree.leaves(fop_optax.resolve_structures(
      params, structures, normalize=normalize, max_scale=max_scale))

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
  lams = np.stack([oracle_lambda_max(s, m, p.shape) for s, m, p in
                   zip(structs, jax.tree.leaves(ms), jax.tree.leaves(params))], axis=1)
  return lams, structs, state, [np.asarray(m) for m in jax.tree.leaves(ms)]


@pytest.mark.parametrize('structures', ['auto', 'full', 'low_rank', 'diagonal', 'scalar'])
@pytest.mark.parametrize('bound', [1.0, 2.0])
def test_lambda_max_never_exceeds_the_bound(structures, bound):
  tx = fop_optax.fop(0.05, hyper_learning_rate=0.1, structures=structures, max_scale=bound)
  lams, structs, state, _ = lambda_max_trajectory(tx, structures, False, 1000, max_scale=bound)
  assert np.isfinite(lams).all()
  assert int(state.skipped_steps) == 0
  # Every structure holds to rounding, low rank included: it applies P̃ = I + Q (f(Ŝ) − I) Qᵀ
  # on an orthonormal basis Q of span(U, V) (a Householder QR of the normalised [U, V]).
  tol = RTOL
  assert (lams <= bound * (1 + tol)).all(), lams.max(axis=0)
  # Not vacuous: without the guard the same run's P does go past the bound.
  free = fop_optax.fop(0.05, hyper_learning_rate=0.1, structures=structures, max_scale=None)
  assert lambda_max_trajectory(free, structures, False, 1000)[0].max() > bound * 1.05


@pytest.mark.parametrize('structures', ['auto', 'full', 'low_rank'])
def test_fop_norm_has_unit_spectral_norm_at_every_step(structures):
  tx = fop_optax.fop(0.05, hyper_learning_rate=0.1, structures=structures, normalize=True)
  lams, structs, _, ms = lambda_max_trajectory(tx, structures, True, 800)
  learned = [i for i, s in enumerate(structs) if not isinstance(s, S.NoPreconditioner)]
  np.testing.assert_allclose(lams[:, learned], 1.0, rtol=RTOL)
  # ... and P̃ really moved away from I: some eigenvalue is well below 1.
  smallest = [np.linalg.eigvalsh(applied_matrices(structs[i], ms[i][-1:], p.shape))[0, 0]
              for i, p in enumerate(jax.tree.leaves(PARAMS)) if i in learned]
  assert min(smallest) < 0.9, smallest


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
  structure = jax.tree.leaves(fop_optax.resolve_structures(jnp.zeros((64, 16)), structures,
                                                           max_scale=max_scale))[0]

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
