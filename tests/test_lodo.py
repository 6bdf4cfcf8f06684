"""LODO: the network's maths against dense matrices, FOP's special case, and the optax contract."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import fop_optax

# ``fop_optax.lodo`` is the alias; the module of the same name is reached through sys.modules.
import fop_optax.lodo  # noqa: F401  (loads the module)
L = sys.modules['fop_optax.lodo']


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _loss(params):
  leaves = jax.tree.leaves(params)
  total = sum(jnp.sum(jnp.sin(x + 0.3 * i) ** 2 + 0.1 * x ** 4) for i, x in enumerate(leaves))
  return total + 0.5 * jnp.sum(leaves[0]) * jnp.sum(leaves[-1])


def _dense_p(w, n, b, seed=0, stream=0):
  """``Eᵀ AᵀA E`` built from dense matrices: permutation matrices and block-diagonal ``Dᵢ``."""
  h = L.hidden_width(n, b)
  perms, _ = L._permutations(h, len(w), seed, stream)
  a = jnp.eye(h, n, dtype=w[0].dtype)   # E
  for i, wi in enumerate(w):
    pi = jnp.eye(h, dtype=wi.dtype)[perms[i]]          # (Π y)_k = y[perm_k]
    d = jax.scipy.linalg.block_diag(*[blk.T for blk in wi])   # (D y) on column vectors
    a = d @ (pi @ a)
  return a.T @ a


def test_identity_at_start_and_psd_later():
  n = 11
  for arch in L.ARCHITECTURES:
    init, apply = fop_optax.lodo_preconditioner(3, 4, architecture=arch)
    p = L.preconditioner_matrix(apply, init(jnp.zeros(n)), n)
    np.testing.assert_allclose(p, jnp.eye(n), atol=1e-6)
  init, apply = fop_optax.lodo_preconditioner(3, 2, seed=5)
  w = [[x + 0.4 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(init(jnp.zeros(n))[0])]]
  p = L.preconditioner_matrix(apply, w, n)
  np.testing.assert_allclose(p, p.T, atol=1e-5)
  assert float(jnp.linalg.eigvalsh(p).min()) > -1e-5
  # The network is the dense product of its permutations and blocks.
  np.testing.assert_allclose(p, _dense_p(w[0], n, 2, seed=5), rtol=1e-4, atol=1e-5)
  assert L.hidden_width(n, 4) == 24 and L.hidden_width(10, 4) == 24   # a whole extra block at 4 | 2n


def test_permutations_are_fixed_by_seed():
  a, ai = L._permutations(30, 3, 7, 0)
  b, _ = L._permutations(30, 3, 8, 0)
  assert sorted(a[0].tolist()) == list(range(30)) and not np.array_equal(a, b)
  np.testing.assert_array_equal(np.take_along_axis(a, ai, axis=1), np.tile(np.arange(30), (3, 1)))
  # Pinned values: the permutations are not stored in the state, so a checkpoint resumes
  # with the same network only if they never change across versions and machines.
  assert a[0][:8].tolist() == PINNED_PERMUTATION


PINNED_PERMUTATION = [1, 26, 25, 17, 22, 7, 6, 0]


def _run(tx, params, steps, loss=_loss):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  history = [(params, state)]
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


HYPER_LR = 2.0 ** -6


@pytest.mark.parametrize('per_leaf', [False, True])
def test_hypergradient_equals_dense_autodiff(x64, per_leaf):
  """The trained weights follow jax.grad of w ↦ J(θ − η·EᵀAᵀAE·m) built from dense matrices."""
  params = {'a': 0.5 * jnp.arange(6.0).reshape(3, 2) - 1, 'b': jnp.linspace(-1, 1, 5)}
  b, layers, eta, beta = 2, 3, 0.125, 0.75
  tx = optax.chain(
      fop_optax.scale_by_lodo(eta, momentum=beta, num_layers=layers, block_size=b, seed=3,
                              meta_optimizer=optax.sgd(HYPER_LR), per_leaf=per_leaf),
      optax.scale_by_learning_rate(eta))
  history = _run(tx, params, 4)
  leaves0 = jax.tree.leaves(params)
  groups = [[0], [1]] if per_leaf else [[0, 1]]

  def apply_dense(w, u):
    flat = [x.reshape(-1) for x in jax.tree.leaves(u)]
    out = []
    for stream, (g, wg) in enumerate(zip(groups, w)):
      x = jnp.concatenate([flat[i] for i in g])
      out.append(_dense_p(wg, x.shape[0], b, seed=3, stream=stream) @ x)
    y = jnp.concatenate(out)
    sizes = np.cumsum([x.size for x in leaves0])[:-1]
    return jax.tree.structure(u).unflatten(
        [p.reshape(x.shape) for p, x in zip(jnp.split(y, sizes), leaves0)])

  worst = 0.0
  for t in range(2, len(history)):
    s_prev, s_now = history[t - 1][1][0], history[t][1][0]
    m = s_prev.last_input   # the preconditioner's input, the momentum m_{t-1}
    j = lambda w: _loss(jax.tree.map(lambda p, d: p - eta * d, history[t - 2][0], apply_dense(w, m)))
    expected = jax.grad(j)(s_prev.preconditioner_params)
    got = jax.tree.map(lambda a, c: (a - c) / HYPER_LR, s_prev.preconditioner_params,
                       s_now.preconditioner_params)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      assert float(jnp.abs(e).max()) > 1e-4
      np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
      worst = max(worst, float(jnp.max(jnp.abs(g - e)) / jnp.max(jnp.abs(e))))
  # m_1 = (1 − β) g_1: an EMA with no bias correction.
  g1 = jax.grad(_loss)(params)
  jax.tree.map(lambda m, g: np.testing.assert_allclose(m, (1 - beta) * g, rtol=1e-12),
               history[1][1][0].last_input, g1)
  print(f'LODO hypergradient vs dense autodiff (per_leaf={per_leaf}): max rel. error {worst:.1e}')


def test_one_block_one_layer_is_fops_formula(x64):
  """L = 1 and one b×b block (b > 2n): M = WᵀΠE and ∂J/∂W = −η ΠE(m gᵀ + g mᵀ)Mᵀ, FOP's form."""
  n, b, eta = 5, 12, 0.125
  params = jnp.linspace(-1.0, 1.2, n)
  loss = lambda x: jnp.sum(jnp.sin(x) ** 2 + 0.1 * x ** 4)
  tx = optax.chain(
      fop_optax.scale_by_lodo(eta, momentum=0.5, num_layers=1, block_size=b,
                              meta_optimizer=optax.sgd(HYPER_LR)),
      optax.scale_by_learning_rate(eta))
  history = _run(tx, params, 3, loss)
  s1, s2 = history[1][1][0], history[2][1][0]
  assert L.hidden_width(n, b) == b
  (w,), = s1.preconditioner_params
  perms, _ = L._permutations(b, 1, 0, 0)
  k = jnp.eye(b, dtype=w.dtype)[perms[0]] @ jnp.eye(b, n, dtype=w.dtype)   # ΠE
  m_mat = w[0].T @ k                                                        # M (b×n)
  m, g = s1.last_input, jax.grad(loss)(history[1][0])
  expected = -eta * k @ (jnp.outer(m, g) + jnp.outer(g, m)) @ m_mat.T
  got = (w - s2.preconditioner_params[0][0]) / HYPER_LR
  np.testing.assert_allclose(got[0], expected, rtol=1e-10, atol=1e-13)


def test_first_step_is_momentum_and_per_leaf_does_not_mix():
  params = {'a': jnp.ones((4, 3)), 'b': jnp.arange(5.0)}
  g = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  for kw in ({}, {'per_leaf': True}, {'architecture': 'diagonal'}, {'architecture': 'global'}):
    tx = fop_optax.lodo(0.1, momentum=0.9, num_layers=4, **kw)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * 0.1 * g, rtol=1e-5), u, g)
  init, apply = fop_optax.lodo_preconditioner(4, 4, per_leaf=True)
  w = init(params)
  w = [[x + 0.3 for x in wg] for wg in w]
  out = apply(w, {'a': jnp.ones((4, 3)), 'b': jnp.zeros(5)})
  assert float(jnp.abs(out['a']).max()) > 0 and float(jnp.abs(out['b']).max()) == 0.0
  out = apply(init(params), params)   # and P = I per leaf at the start
  jax.tree.map(lambda o, p: np.testing.assert_allclose(o, p, atol=1e-5), out, params)
