"""LODO: the network's maths against dense matrices, FOP's special case, and the optax contract."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import fop_optax

# ``fop_optax.lodo`` is the alias; its module is the private fop_optax._lodo.
from fop_optax import _lodo as L


# The nonconvex loss of tests/test_learned.py, shared.
from test_learned import _loss, x64  # noqa: E402,F401  (x64 is a fixture)


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


_STEPS = {}


def _run(tx, params, steps, loss=_loss, state=None):
  state = tx.init(params) if state is None else state
  key = (id(tx), loss)
  if key not in _STEPS:   # one compilation per transformation and loss
    _STEPS[key] = (tx, jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p)))
  step = _STEPS[key][1]
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
  history = _run(tx, params, 3)
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
    expected = jax.jit(jax.grad(j))(s_prev.preconditioner_params)
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
  for kw in ({}, {'per_leaf': True}):   # the ablations start at P = I too (test above)
    tx = fop_optax.lodo(0.1, momentum=0.9, num_layers=2, **kw)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * 0.1 * g, rtol=1e-5), u, g)
  init, apply = fop_optax.lodo_preconditioner(2, 4, per_leaf=True)
  w = init(params)
  w = [[x + 0.3 for x in wg] for wg in w]
  apply = jax.jit(apply)
  out = apply(w, {'a': jnp.ones((4, 3)), 'b': jnp.zeros(5)})
  assert float(jnp.abs(out['a']).max()) > 0 and float(jnp.abs(out['b']).max()) == 0.0
  out = apply(init(params), params)   # and P = I per leaf at the start
  jax.tree.map(lambda o, p: np.testing.assert_allclose(o, p, atol=1e-5), out, params)


# ----------------------------------------------------------------------------- the optax contract

PARAMS = {
    'conv': jnp.full((3, 3, 2, 4), 0.1, jnp.float32),
    'dense': jnp.full((8, 5), 0.2, jnp.float32),
    'bias': jnp.zeros(5, jnp.float32),
    'scale': jnp.ones((), jnp.float32),
}


def _sin_loss(params):
  return sum(jnp.sum(jnp.sin(x.astype(jnp.float32) + 0.3) ** 2) for x in jax.tree.leaves(params))


CONTRACT = {
    'lodo': lambda: fop_optax.lodo(0.1, num_layers=3),
    'lodo_diagonal': lambda: fop_optax.lodo(0.1, architecture='diagonal'),
    'lodo_global': lambda: fop_optax.lodo(0.1, architecture='global', momentum=None),
}


@pytest.mark.parametrize('name', CONTRACT)
def test_no_recompilation_and_extra_args(name):
  tx = CONTRACT[name]()

  @jax.jit
  def step(params, state):
    # Unknown extra arguments are accepted, as optax's GradientTransformationExtraArgs.
    updates, state = tx.update(jax.grad(_sin_loss)(params), state, params,
                               unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  params, state = step(PARAMS, tx.init(PARAMS))
  with test_utils.log_compilations() as logs:
    params, state = step(params, state)
  assert not logs, 'recompiled on the second call'
  assert float(_sin_loss(params)) < float(_sin_loss(PARAMS))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32', 'float64'])
def test_dtypes_kept_and_state_stable(dtype):
  with jax.enable_x64(dtype == 'float64'):
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    tx = fop_optax.lodo(0.1, num_layers=2)
    state = tx.init(params)
    grads = jax.grad(_sin_loss)(params)
    update = jax.jit(tx.update)
    updates, new_state = update(grads, state, params)
    updates, new_state = update(grads, new_state, params)   # the hypergradient path too
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype and u.shape == p.shape
      assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
    dtypes = lambda s: jax.tree.map(lambda x: jnp.asarray(x).dtype, s)
    assert dtypes(new_state) == dtypes(state)
    inner = new_state.inner_state[0]
    want = jnp.float64 if dtype == 'float64' else jnp.float32
    assert all(w.dtype == want for w in jax.tree.leaves(inner.preconditioner_params))

    @jax.jit
    def maybe_update(flag, state):
      return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)
    maybe_update(True, state)
  with jax.enable_x64(True):
    tx = fop_optax.lodo(0.1, num_layers=2, weight_dtype=jnp.float64)
    w = tx.init(PARAMS).inner_state[0].preconditioner_params
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(w))


def test_inject_hyperparams():
  inject = optax.inject_hyperparams(fop_optax.lodo, static_args=('num_layers',))
  tx = inject(learning_rate=0.1, meta_learning_rate=1e-2, num_layers=2)
  state = tx.init(PARAMS)
  grads = jax.grad(_sin_loss)(PARAMS)
  update = jax.jit(tx.update)
  u1, state = update(grads, state, PARAMS)
  state.hyperparams['learning_rate'] = jnp.asarray(0.05)
  u2, state = update(grads, state, PARAMS)
  fresh = inject(learning_rate=0.05, meta_learning_rate=1e-2, num_layers=2)
  u_half, _ = jax.jit(fresh.update)(grads, fresh.init(PARAMS), PARAMS)
  # The first step is the EMA's: halving α halves it.
  test_utils.assert_trees_all_close(u1, jax.tree.map(lambda x: 2 * x, u_half), rtol=1e-5)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u2))
  # Shapes must stay static: an int num_layers would be injected as an array.
  with pytest.raises(TypeError, match='static_args'):
    optax.inject_hyperparams(fop_optax.lodo)(learning_rate=0.1, num_layers=4).init(PARAMS)


def test_multisteps_accumulates():
  k = 3
  tx = optax.MultiSteps(fop_optax.lodo(0.1, num_layers=2), every_k_schedule=k)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  grads = jax.grad(_sin_loss)(PARAMS)
  for i in range(2 * k):
    updates, state = update(grads, state, PARAMS)
    nonzero = any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(updates))
    assert nonzero == ((i + 1) % k == 0), i
  assert int(state.inner_opt_state.inner_state[0].count) == 2


def test_nonfinite_step_is_skipped():
  tx = fop_optax.lodo(0.1, num_layers=2)
  update = jax.jit(tx.update)
  grads = jax.grad(_sin_loss)(PARAMS)
  _, state = update(grads, tx.init(PARAMS), PARAMS)
  _, state = update(grads, state, PARAMS)
  bad = dict(grads, dense=grads['dense'].at[0, 0].set(jnp.nan))
  updates, new_state = update(bad, state, PARAMS)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  test_utils.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.skipped_steps) == 1


def test_orbax_checkpoint_resume_is_bit_exact(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  tx = fop_optax.lodo(0.1, meta_learning_rate=1e-2, num_layers=3, seed=4)
  history = _run(tx, PARAMS, 3, _sin_loss)
  params, state = history[-1]
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'step3', {'params': params, 'opt_state': state})
  full = _run(tx, params, 3, _sin_loss, state)[-1]
  target = {'params': PARAMS, 'opt_state': tx.init(PARAMS)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'step3', abstract)
  test_utils.assert_trees_all_equal(restored['opt_state'], state)
  resumed = _run(tx, restored['params'], 3, _sin_loss, restored['opt_state'])[-1]
  test_utils.assert_trees_all_equal(resumed, full)


def test_bad_arguments():
  with pytest.raises(ValueError, match='architecture'):
    fop_optax.lodo(0.1, architecture='residual')
  with pytest.raises(ValueError, match='num_layers'):
    fop_optax.lodo(0.1, num_layers=0)
  with pytest.raises(TypeError, match='Python int'):
    fop_optax.scale_by_lodo(0.1, block_size=2.0)
  with pytest.raises(ValueError, match='momentum'):
    fop_optax.lodo(0.1, momentum=1.0)
  with pytest.raises(ValueError, match='learning_rate'):
    fop_optax.lodo(-0.1)
  with pytest.raises(TypeError, match='floating'):
    fop_optax.lodo(0.1).init({'i': jnp.arange(3)})


def test_lodo_learns_to_beat_momentum_on_an_ill_conditioned_quadratic():
  """Same α, same EMA: the learned network makes the deterministic descent far faster."""
  n, steps = 10, 400
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
  h = jnp.asarray((q * np.logspace(-2, 0, n)) @ q.T, jnp.float32)
  loss = lambda x: 0.5 * x @ h @ x

  def final_loss(tx):
    def body(c, _):
      x, s = c
      u, s = tx.update(jax.grad(loss)(x), s, x)
      return (optax.apply_updates(x, u), s), None
    x0 = jnp.ones(n)
    (x, s), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((x0, tx.init(x0)))
    return float(loss(x)), s

  lodo_loss, state = final_loss(fop_optax.lodo(1.0, 1e-2, momentum=0.5, num_layers=4))
  # LODO's step α·EMA = heavy ball with rate α(1 − β) and momentum β at P = I.
  momentum_loss, _ = final_loss(optax.sgd(0.5, momentum=0.5))
  print(f"LODO {lodo_loss:.2e} vs momentum {momentum_loss:.2e} after {steps} steps")
  assert lodo_loss < 1e-3 * momentum_loss, (lodo_loss, momentum_loss)
  _, apply = fop_optax.lodo_preconditioner(4, 4)
  p = L.preconditioner_matrix(apply, state.inner_state[0].preconditioner_params, n)
  assert float(jnp.abs(p - jnp.eye(n)).max()) > 0.1


def test_sharded_parameters_on_four_devices():
  """Under a mesh (explicit and auto axes) the weights are replicated, updates follow the params."""
  import json
  import os
  import subprocess
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lodo_sharding_worker.py')
  # Appended to XLA_FLAGS: keeps the suite's compile settings (tests/conftest.py).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"))
  proc = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True,
                        timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('REPORT ')]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  report = json.loads(lines[-1][len('REPORT '):])
  assert report['devices'] == 4
  for axis_type in ('Explicit', 'Auto'):
    r = report[axis_type]
    assert r['params'] == r['updates'] == "P(None, 'model')", r
    assert r['weights_replicated'] and not r['state_sharding_changed'], r
    assert r['max_diff'] < 1e-5, r
