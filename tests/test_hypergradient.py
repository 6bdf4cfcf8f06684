"""The hypergradient each structure applies equals autodiff of the one-step loss.

For every structure we take one step θ_1 = θ_0 − η·P(M)·g_0 from a random,
non-identity M (so a transposed or mis-signed formula cannot hide behind
M = I), let ``hyper_optimizer=optax.sgd(1.0)`` apply the closed form, and read
it off the state as M − M_new. It must equal jax.grad of M ↦ J(θ_0 − η·P(M)·g_0).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S



@pytest.fixture(autouse=True)
def _x64():
  # Scoped to this module's tests so the rest of the suite keeps float32 defaults.
  with jax.enable_x64(True):
    yield

ETA = 0.3

CASES = [
    ('full_vector', S.Full(), (5,)),
    ('full_dense', S.Full(), (4, 6)),
    ('full_norm', S.Full(normalize=True), (4, 6)),
    ('full_3d_two_row_axes', S.Full(row_axes=2), (2, 3, 5)),
    ('spatial_conv', S.Spatial(), (3, 3, 2, 4)),
    ('spatial_norm', S.Spatial(normalize=True), (3, 3, 2, 4)),
    ('spatial_conv1d', S.Spatial(), (3, 2, 4)),
    ('low_rank', S.LowRank(rank=2), (7, 5)),
    ('low_rank_norm', S.LowRank(rank=3, normalize=True), (7, 5)),
    # The guard's clip P̃ = Q min(Λ, B) Qᵀ, with some eigenvalues above B and some below.
    ('full_clipped', S.Full(max_scale=1.2), (4, 6)),
    ('spatial_clipped', S.Spatial(max_scale=1.2), (3, 3, 2, 4)),
    ('low_rank_clipped', S.LowRank(rank=2, max_scale=1.2), (7, 5)),
    ('low_rank_clipped_no_complement', S.LowRank(rank=3, max_scale=1.1), (5, 4)),
    # Several column axes: the (k, *columns) products of the span basis.
    ('low_rank_norm_3d', S.LowRank(rank=2, normalize=True), (7, 3, 2)),
    ('low_rank_clipped_3d', S.LowRank(rank=2, max_scale=1.2), (7, 3, 2)),
    ('diagonal', S.Diagonal(), (4, 6)),
    ('scalar', S.Scalar(), (4, 6)),
]


def loss(theta, target):
  # Non-quadratic so the Hessian term is not constant; J depends on all entries.
  return jnp.sum(jnp.cos(theta) * target) + 0.5 * jnp.sum(theta ** 4)


def random_m(structure, shape, key):
  m0 = structure.init(shape, jnp.float64, key)
  return m0 + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), m0.shape, m0.dtype)


@pytest.mark.parametrize('name,structure,shape', CASES, ids=[c[0] for c in CASES])
def test_hypergradient_equals_autodiff(name, structure, shape):
  key = jax.random.key(42)
  k1, k2, k3 = jax.random.split(key, 3)
  theta0 = jax.random.normal(k1, shape, jnp.float64)
  target = jax.random.normal(k2, shape, jnp.float64)
  m_start = random_m(structure, shape, k3)
  grad = jax.grad(loss)

  # max_scale=None: read the raw hyper step, not the blow-up guard's rescaling.
  tx = fop_optax.scale_by_fop(ETA, hyper_optimizer=optax.sgd(1.0), structures=structure,
                              max_scale=None)
  state = tx.init(theta0)
  state = state._replace(preconditioners=m_start)
  g0 = grad(theta0, target)
  update, state = tx.update(g0, state)       # count 0: M untouched, stores g0
  np.testing.assert_array_equal(state.preconditioners, m_start)
  theta1 = theta0 - ETA * update
  _, state = tx.update(grad(theta1, target), state)
  applied = m_start - state.preconditioners

  def one_step_loss(m):
    return loss(theta0 - ETA * structure.precondition(m, g0), target)

  expected = jax.grad(one_step_loss)(m_start)
  if getattr(structure, 'max_scale', None) is not None:
    # The guard really acts at m_start: some eigenvalues are clipped, some are not.
    raw = np.linalg.eigvalsh(np.asarray(
        dataclasses.replace(structure, max_scale=None).matrix(m_start, shape)))
    assert raw.max() > structure.max_scale > raw.min(), raw
  err = float(jnp.max(jnp.abs(applied - expected)))
  scale = float(jnp.max(jnp.abs(expected)))
  print(f'{name}: max |closed form − autodiff| = {err:.2e} (scale {scale:.2e})')
  assert scale > 1e-3  # the check is not vacuous
  if getattr(structure, 'max_scale', None) is not None:
    # The guard projects the state after the hyper step; compare before it too.
    direct = structure.hypergradient(m_start, grad(theta1, target), g0, ETA)
    np.testing.assert_allclose(direct, expected, rtol=1e-10, atol=1e-12)
    expected_state = structure.clip(m_start - expected, structure.max_scale)
    np.testing.assert_allclose(state.preconditioners, expected_state, rtol=1e-9, atol=1e-11)
    return
  np.testing.assert_allclose(applied, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name,structure,shape', CASES, ids=[c[0] for c in CASES])
def test_precondition_is_mtm(name, structure, shape):
  """P·g from each structure equals its dense/elementwise P applied to g."""
  key = jax.random.key(7)
  m = random_m(structure, shape, key)
  g = jax.random.normal(jax.random.fold_in(key, 2), shape, jnp.float64)
  p = structure.matrix(m, shape)
  if isinstance(structure, (S.Diagonal, S.Scalar)):
    expected = p * g
  else:
    rows = structure._row_axes(shape) if isinstance(structure, S.Full) else structure.row_axes
    expected = (p @ S.as_matrix(g, rows)).reshape(shape)
  np.testing.assert_allclose(structure.precondition(m, g), expected, rtol=1e-10, atol=1e-12)
  if p.ndim == 2 and p.shape[0] == p.shape[1] and not isinstance(structure, (S.Diagonal, S.Scalar)):
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    assert float(jnp.linalg.eigvalsh(p).min()) > -1e-10  # PSD


@pytest.mark.parametrize('name,structure,shape', CASES, ids=[c[0] for c in CASES])
def test_init_is_identity(name, structure, shape):
  g = jax.random.normal(jax.random.key(3), shape, jnp.float64)
  m = structure.init(shape, jnp.float64, jax.random.key(0))
  np.testing.assert_allclose(structure.precondition(m, g), g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('per_parameter', [False, True])
def test_baydin_step_size_hypergradient(per_parameter):
  """rule='additive' moves α by β·(−∂J/∂α) of J(θ_0 − α·u_0)."""
  shape = (3, 4)
  key = jax.random.key(5)
  theta0 = jax.random.normal(key, shape, jnp.float64)
  target = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float64)
  alpha0, beta = 0.05, 0.7
  tx = fop_optax.scale_by_hypergradient(alpha0, beta, rule='additive', per_parameter=per_parameter)
  state = tx.init(theta0)
  g0 = jax.grad(loss)(theta0, target)
  u0, state = tx.update(g0, state)
  np.testing.assert_allclose(u0, alpha0 * g0)
  theta1 = theta0 - u0
  _, state = tx.update(jax.grad(loss)(theta1, target), state)
  if per_parameter:
    alpha = jnp.full(shape, alpha0)
    dj = jax.grad(lambda a: loss(theta0 - a * g0, target))(alpha)
  else:
    dj = jax.grad(lambda a: loss(theta0 - a * g0, target))(alpha0)
  np.testing.assert_allclose(state.learning_rates, alpha0 - beta * dj, rtol=1e-12)


@pytest.mark.parametrize('name,structure,shape', CASES, ids=[c[0] for c in CASES])
def test_guard_clips_eigenvalues_above_the_bound_and_keeps_the_rest(name, structure, shape):
  """λ(P̃) = min(λ(P), B): the bound holds, every eigenvalue below it is kept (dense oracle)."""
  key = jax.random.key(11)
  m0 = structure.init(shape, jnp.float64, key)
  bound = 2.0
  huge = m0 + 1.0 * jax.random.normal(key, m0.shape, m0.dtype)
  if isinstance(structure, (S.Diagonal, S.Scalar)):
    np.testing.assert_array_equal(structure.clip(m0, 100.0), m0)  # P = I is within bounds
    raw, clipped = huge ** 2, structure.clip(huge, bound) ** 2
    np.testing.assert_allclose(clipped, np.minimum(raw, bound), rtol=1e-12)
    return
  if structure.normalize:
    return  # FOP-norm's P̃ has λ_max = 1 ≤ B: the guard never acts (tests/test_stability.py)
  raw = np.linalg.eigvalsh(np.asarray(dataclasses.replace(structure, max_scale=None).matrix(huge, shape)))
  bound = max(1.0, float(np.median(raw)))  # some eigenvalues above the bound, some below
  assert raw.max() > bound * 1.01, raw  # the check is not vacuous
  bounded = dataclasses.replace(structure, max_scale=None).with_bound(bound)
  assert bounded.max_scale == bound
  if structure.max_scale is not None:
    assert structure.with_bound(bound) is structure  # an explicit bound is kept
  p = np.asarray(bounded.matrix(huge, shape))
  np.testing.assert_allclose(p, p.T, atol=1e-9 * raw.max())
  np.testing.assert_allclose(np.linalg.eigvalsh(p), np.sort(np.minimum(raw, bound)),
                             rtol=1e-9, atol=1e-9 * raw.max())
  np.testing.assert_allclose(float(bounded.max_eigenvalue(huge)), bound, rtol=1e-9)


def test_default_hyper_step_is_calibrated_per_leaf():
  """The default Adam hyper step is scaled per leaf; a user's hyper_optimizer is not."""
  # 'dense' has 32 rows (full under max_full_dim = 32), 'wide' 784 (low rank, r = 8).
  shapes = {'conv': (3, 3, 2, 4), 'dense': (32, 8), 'wide': (784, 16), 'bias': (16,)}
  factors = {'conv': 1.0, 'dense': 9 / 32, 'wide': 9 / np.sqrt(784 * 8), 'bias': 1.0}
  key = jax.random.key(5)
  params = {k: jax.random.normal(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(shapes.items())}
  # Two calls: the first stores G_0, the second takes one hyper step from the same M_0
  # (later steps would start from different Ms and no longer compare).
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(2)]

  def hyper_steps(tx):
    state = tx.init(params)
    for g in grads:
      m_before = state.preconditioners
      _, state = tx.update(g, state)
    return jax.tree.map(lambda a, b: b - a, m_before, state.preconditioners)

  calibrated = hyper_steps(fop_optax.scale_by_fop(0.1, 1e-3, max_scale=None))
  raw = hyper_steps(fop_optax.scale_by_fop(0.1, hyper_optimizer=optax.adam(1e-3), max_scale=None))
  for name, factor in factors.items():
    if name != 'bias':
      assert float(jnp.max(jnp.abs(raw[name]))) > 1e-4, name  # Adam really moved it
    np.testing.assert_allclose(calibrated[name], factor * raw[name], rtol=1e-5, atol=1e-9)


def _gamma_first_step(structure, shape, seed, **fop_kwargs):
  """A random θ₀, target and ``M`` (float64), and ``scale_by_fop``'s first update from them.

  Returns ``(tx, θ₀, target, M, g₀, update, state)``; the hyper-optimiser is ``sgd(1)``, so a
  later learning step moves ``M`` by exactly minus its hypergradient.
  """
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  theta0 = jax.random.normal(k1, shape, jnp.float64)
  target = jax.random.normal(k2, shape, jnp.float64)
  m_start = random_m(structure, shape, k3)
  tx = fop_optax.scale_by_fop(ETA, hyper_optimizer=optax.sgd(1.0), structures=structure,
                              **fop_kwargs)
  state = tx.init(theta0)._replace(preconditioners=m_start)
  g0 = jax.grad(loss)(theta0, target)
  update, state = tx.update(g0, state)
  return tx, theta0, target, m_start, g0, update, state


GAMMA_CASES = [c for c in CASES if not getattr(c[1], 'normalize', False)
               and getattr(c[1], 'max_scale', None) is None]


@pytest.mark.parametrize('name,structure,shape', GAMMA_CASES, ids=[c[0] for c in GAMMA_CASES])
def test_theorem1_gamma_hypergradient_equals_autodiff(name, structure, shape):
  """P̃ = P/γ, γ = δ‖P‖₂ + (1 − δ)p_∞ (the paper's Theorem 1): closed form = autodiff."""
  delta, p_inf = 0.7, 2.0
  tx, theta0, target, m_start, g0, update, state = _gamma_first_step(
      structure, shape, 42, gamma=(delta, p_inf), max_scale=None)
  grad = jax.grad(loss)

  def p_tilde_g(m, g):
    gam = delta * structure.top_eigen(m)[0] + (1 - delta) * p_inf
    return structure.precondition(m, g) / gam

  np.testing.assert_allclose(update, p_tilde_g(m_start, g0), rtol=1e-12)
  _, state = tx.update(grad(theta0 - ETA * update, target), state)
  expected = jax.grad(lambda m: loss(theta0 - ETA * p_tilde_g(m, g0), target))(m_start)
  assert float(jnp.max(jnp.abs(expected))) > 1e-3
  np.testing.assert_allclose(m_start - state.preconditioners, expected, rtol=1e-9, atol=1e-11)
  # top_eigen's λ is the dense λ_max of MᵀM.
  raw = dataclasses.replace(structure, max_scale=None) if hasattr(structure, 'max_scale') else structure
  if isinstance(structure, (S.Full, S.LowRank)):
    dense = np.linalg.eigvalsh(np.asarray(raw.matrix(m_start, shape)))[-1]
    np.testing.assert_allclose(float(structure.top_eigen(m_start)[0]), dense, rtol=1e-10)


GAMMA_BOUND_CASES = [('full_dense', S.Full(), (4, 6)), ('spatial_conv', S.Spatial(), (3, 3, 2, 4)),
                     ('low_rank', S.LowRank(rank=2), (7, 5))]


@pytest.mark.parametrize('bound', [1.2, 50.0], ids=['clipping', 'inside'])
@pytest.mark.parametrize('name,structure,shape', GAMMA_BOUND_CASES,
                         ids=[c[0] for c in GAMMA_BOUND_CASES])
def test_theorem1_gamma_keeps_the_bound(name, structure, shape, bound):
  """γ with the guard: P̃ = min(P, B)/γ, γ = δ·min(λ_max, B) + (1 − δ)p_∞: closed form = autodiff.

  The oracle is autodiff through the structure's own clipped ``P·G`` (``max_scale = B``) and
  the clipped ``λ_max``; at ``B = 1.2`` the random ``M`` has eigenvalues above the bound (the
  clip and ``min`` act), at ``B = 50`` none (the bounded form equals the paper's).
  """
  delta, p_inf = 0.6, 2.0
  tx, theta0, target, m_start, g0, update, state = _gamma_first_step(
      structure, shape, 43, gamma=(delta, p_inf), max_scale=bound)
  grad = jax.grad(loss)
  bounded = structure.with_bound(bound)
  lam_raw = float(structure.top_eigen(m_start)[0])
  assert (lam_raw > 1.3 * bound) == (bound < 2), lam_raw   # the case is what its id says

  def p_tilde_g(m, g):
    gam = delta * jnp.minimum(structure.top_eigen(m)[0], bound) + (1 - delta) * p_inf
    return bounded.precondition(m, g) / gam

  np.testing.assert_allclose(update, p_tilde_g(m_start, g0), rtol=1e-10, atol=1e-12)
  # (sgd(1) steps M by the hypergradient; the projection after it is checked apart)
  hyper = fop_optax.scale_by_fop(ETA, hyper_optimizer=optax.sgd(1.0), structures=structure,
                                 gamma=(delta, p_inf), max_scale=bound)
  state = hyper.init(theta0)._replace(preconditioners=m_start, count=jnp.ones([], jnp.int32),
                                      last_gradient=g0)
  expected = jax.grad(lambda m: loss(theta0 - ETA * p_tilde_g(m, g0), target))(m_start)
  assert float(jnp.max(jnp.abs(expected))) > 1e-3
  _, new = hyper.update(grad(theta0 - ETA * update, target), state)
  stepped = m_start - expected
  np.testing.assert_allclose(new.preconditioners, bounded.clip(stepped), rtol=1e-8, atol=1e-10)


def test_theorem1_gamma_at_delta_one_is_fop_norm():
  shape, key = (5, 7), jax.random.key(9)
  theta = jax.random.normal(key, shape, jnp.float64)
  grads = [jnp.sin(theta * (i + 1)) for i in range(4)]
  def run(tx):
    state, out = tx.init(theta), []
    for g in grads:
      u, state = tx.update(g, state)
      out.append(u)
    return out
  a = run(fop_optax.scale_by_fop(0.1, 1e-2, structures='full', gamma=(1.0, 3.0), max_scale=None))
  b = run(fop_optax.scale_by_fop(0.1, 1e-2, structures='full', normalize=True, max_scale=None))
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)


def test_span_basis_is_orthonormal_with_dependent_columns():
  """[U, V] with numerically dependent columns (float32): Q stays orthonormal and spans them.

  Adam's sign-like first hyper steps make V's columns nearly equal (rank one); at the
  start V = 0. The guard's basis must stay orthonormal and reproduce [U, V] = Q T in
  both cases (Gram–Schmidt that normalised the rounding noise of a dependent column
  gave QᵀQ off-diagonals of 0.6).
  """
  with jax.enable_x64(False):
    key = jax.random.key(5)
    u = S._orthonormal_columns(jax.random.normal(key, (70, 8), jnp.float32))
    v = jnp.tile(jax.random.normal(jax.random.fold_in(key, 1), (70, 1)), (1, 8))
    v = v + 1e-9 * jax.random.normal(jax.random.fold_in(key, 2), v.shape)
    for v_case in (v, jnp.zeros_like(v), 1e-4 * v):
      m = jnp.stack([u, v_case])
      q, t = S.LowRank._basis(m)
      q, t = np.asarray(q, np.float64), np.asarray(t, np.float64)
      assert q.shape == (70, 16) and t.shape == (16, 16)
      np.testing.assert_allclose(q.T @ q, np.eye(16), atol=1e-5)
      b = np.concatenate([np.asarray(u, np.float64), np.asarray(v_case, np.float64)], axis=1)
      # Every column is reproduced to rounding of its own norm (V's 1e-4 scale included).
      residual = np.linalg.norm(b - q @ t, axis=0)
      assert np.all(residual <= 1e-5 * np.linalg.norm(b, axis=0) + 1e-30), residual
      assert np.all(np.linalg.norm(b - q @ (q.T @ b), axis=0) <= 1e-5 * np.linalg.norm(b, axis=0) + 1e-30)


def test_low_rank_guard_matches_a_dense_oracle_with_dependent_columns():
  """float32 P̃·G with V of eight equal columns (rank one) equals the float64 dense clip of MᵀM.

  Before the span basis dropped dependent columns this case was off by 4.06 (784×1024 leaf).
  """
  with jax.enable_x64(False):
    shape = (120, 40)
    st = S.LowRank(rank=8, max_scale=1.0)
    key = jax.random.key(0)
    m = st.init(shape, jnp.float32, key).at[1].set(0.05)
    g = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32)
    u, v = np.asarray(m[0], np.float64), np.asarray(m[1], np.float64)
    mm = np.eye(shape[0]) + u @ v.T
    lam, q = np.linalg.eigh(mm.T @ mm)
    assert lam[-1] > 1.5 and lam[0] < 0.999   # some eigenvalues clipped, some below 1
    expected = (q * np.minimum(lam, 1.0)) @ q.T @ np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(st.precondition(m, g), np.float64), expected,
                               atol=2e-5 * np.abs(expected).max())
