"""The generic learned preconditioner: its hypergradient is autodiff's, and FOP is an instance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _loss(params):
  # A nonconvex loss coupling all leaves, so that every hypergradient is non-trivial.
  leaves = jax.tree.leaves(params)
  total = sum(jnp.sum(jnp.sin(x + 0.3 * i) ** 2 + 0.1 * x ** 4) for i, x in enumerate(leaves))
  return total + 0.5 * jnp.sum(leaves[0]) * jnp.sum(leaves[-1])


def _params(dtype=jnp.float64):
  key = jax.random.key(0)
  shapes = {'conv': (3, 3, 2, 3), 'dense': (5, 4), 'big': (12, 3), 'vec': (6,)}
  return {k: jax.random.normal(jax.random.fold_in(key, i), s, dtype)
          for i, (k, s) in enumerate(shapes.items())}


def fop_as_apply_fn(params, structures, seed=0):
  """FOP's structures written as a learned preconditioner: ``(init_fn, apply_fn)``.

  ``w`` is the list of per-leaf ``M`` s (as scale_by_fop initialises them: the same
  key per leaf, float64 for float64 leaves), ``apply_fn`` applies each ``MᵀM`` with the
  structure's own ``precondition``. Nothing of FOP's closed-form hypergradient is used.
  """
  structs = jax.tree.leaves(S.resolve_structures(params, structures, max_scale=None))

  def init_fn(params):
    key = jax.random.key(seed)
    return [s.init(tuple(p.shape), jnp.promote_types(jnp.float32, p.dtype),
                   jax.random.fold_in(key, i))
            for i, (s, p) in enumerate(zip(structs, jax.tree.leaves(params)))]

  def apply_fn(w, u):
    leaves, treedef = jax.tree.flatten(u)
    return treedef.unflatten([s.precondition(m, g) for s, m, g in zip(structs, w, leaves)])

  return init_fn, apply_fn


def _run(tx, params, steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
  out = []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    out.append((updates, state))
  return out


STRUCTURES = {
    'default rule (spatial, full, low rank, none)': None,
    'full': {'conv': S.Full(row_axes=2), 'dense': 'full', 'big': 'full', 'vec': 'full'},
    'low_rank': {'conv': S.LowRank(rank=2, row_axes=2), 'dense': S.LowRank(rank=2),
                 'big': S.LowRank(rank=3), 'vec': S.LowRank(rank=2)},
    'diagonal': 'diagonal',
    'scalar': 'scalar',
}


HYPER_SGD_LR = 0.01   # the matrices move by 0.15-1.6 in 5 steps; 0.05 overflows some


@pytest.mark.parametrize('name,hyper', [(name, 'sgd') for name in STRUCTURES]
                         + [('default rule (spatial, full, low rank, none)', 'adam')])
def test_fop_structures_as_apply_fn_equal_scale_by_fop(x64, name, hyper):
  """Every FOP structure, trained by jax.vjp, equals scale_by_fop's closed forms (float64)."""
  params = _params()
  structures = STRUCTURES[name]
  eta = 0.05
  # Hyper learning rates large enough that the matrices move far from I in 5 steps.
  make_hyper = {'sgd': lambda: optax.sgd(HYPER_SGD_LR), 'adam': lambda: optax.adam(0.05)}[hyper]
  fop_tx = optax.chain(
      fop_optax.scale_by_fop(eta, hyper_optimizer=make_hyper(), structures=structures,
                             max_scale=None),
      optax.sgd(eta, momentum=0.9))
  init_fn, apply_fn = fop_as_apply_fn(params, structures)
  learned_tx = optax.chain(
      fop_optax.scale_by_learned_preconditioner(apply_fn, init_fn, eta, make_hyper()),
      optax.sgd(eta, momentum=0.9))
  fop_run, learned_run = _run(fop_tx, params, 5), _run(learned_tx, params, 5)
  moved = err_u = err_m = 0.0
  for (u_f, s_f), (u_l, s_l) in zip(fop_run, learned_run):
    flat_l = jnp.concatenate([x.ravel() for x in jax.tree.leaves(u_l)])
    flat_f = jnp.concatenate([x.ravel() for x in jax.tree.leaves(u_f)])
    np.testing.assert_allclose(flat_l, flat_f, rtol=1e-10, atol=1e-13)
    err_u = max(err_u, float(jnp.max(jnp.abs(flat_l - flat_f)) / jnp.max(jnp.abs(flat_f))))
    ms_f = jax.tree.leaves(s_f[0].preconditioners)
    ms_l = s_l[0].preconditioner_params
    assert len(ms_f) == len(ms_l)
    for m_f, m_l in zip(ms_f, ms_l):
      assert m_f.dtype == m_l.dtype == jnp.float64
      np.testing.assert_allclose(m_l, m_f, rtol=1e-10, atol=1e-13)
      err_m = max(err_m, float(jnp.max(jnp.abs(m_l - m_f))))
  for m, m0 in zip(ms_l, init_fn(params)):
    moved = max(moved, float(jnp.max(jnp.abs(m - m0))))
  assert 1e-3 < moved < 10, f'the matrices moved by {moved}: the comparison would be vacuous'
  print(f'FOP {name} ({hyper}): updates max rel. error {err_u:.1e}, matrices max abs. error '
        f'{err_m:.1e}, matrices moved by up to {moved:.2f}')


HYPER_LR = 2.0 ** -6


def _nonlinear_apply(w, u):
  # Nonlinear in w and u; a different map per leaf kind.
  def one(x, k):
    scale = jax.nn.softplus(w['a'][k])
    return scale * jnp.tanh(w['b'][k] * x) + w['c'] ** 2 * x ** 3 / (1 + x ** 2)
  leaves, treedef = jax.tree.flatten(u)
  return treedef.unflatten([one(x, i) for i, x in enumerate(leaves)])


def _nonlinear_init(params):
  n = len(jax.tree.leaves(params))
  return {'a': jnp.linspace(0.2, 1.0, n), 'b': jnp.linspace(1.5, 0.5, n), 'c': jnp.asarray(0.7)}


@pytest.mark.parametrize('direction', ['identity', 'ema'])
def test_hypergradient_equals_autodiff(x64, direction):
  """∂J(θ_t)/∂w_{t−1} = jax.grad of w ↦ J(θ_{t−1} − η·apply_fn(w, u_{t−1})), at every step."""
  params = _params()
  # Powers of two: exact in float32, so the oracle and the transformation use the same η.
  schedule = optax.exponential_decay(0.125, transition_steps=1, decay_rate=0.5)
  make_dir = {'identity': lambda: None, 'ema': lambda: optax.ema(0.7, debias=False)}[direction]
  tx = optax.chain(
      # SGD(2⁻⁶) as hyper-optimiser: w_t = w_{t-1} − 2⁻⁶·hypergradient, read back exactly.
      fop_optax.scale_by_learned_preconditioner(
          _nonlinear_apply, _nonlinear_init, schedule, optax.sgd(HYPER_LR), make_dir()),
      optax.scale_by_learning_rate(schedule))
  state = tx.init(params)
  history = [(params, state)]
  update = jax.jit(tx.update)
  for _ in range(4):
    updates, state = update(jax.grad(_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  worst = 0.0
  for t in range(2, len(history)):
    # Call t-1 produced θ_{t-1} = θ_{t-2} − η_{t-2}·apply(w_{t-1}, u_{t-1}) (w and u as
    # stored by it); call t's hypergradient is the gradient of J(θ_{t-1}) in that w.
    s_prev, s_now = history[t - 1][1][0], history[t][1][0]
    eta = schedule(t - 2)

    def j_of_w(w):
      step = _nonlinear_apply(w, s_prev.last_input)
      return _loss(jax.tree.map(lambda p, d: p - eta * d, history[t - 2][0], step))

    expected = jax.jit(jax.grad(j_of_w))(s_prev.preconditioner_params)
    got = jax.tree.map(lambda a, b: (a - b) / HYPER_LR, s_prev.preconditioner_params,
                       s_now.preconditioner_params)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      assert float(jnp.max(jnp.abs(e))) > 1e-6
      np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-14)
      worst = max(worst, float(jnp.max(jnp.abs(g - e) / (jnp.abs(e) + 1e-300))))
  print(f'hypergradient vs jax.grad ({direction}): max relative error {worst:.2e}')
  # The first call leaves w untouched.
  first = history[1][1][0].preconditioner_params
  jax.tree.map(np.testing.assert_array_equal, first, _nonlinear_init(params))


def test_direction_is_the_preconditioners_input():
  params = {'w': jnp.arange(3.0)}
  tx = fop_optax.scale_by_learned_preconditioner(
      lambda w, u: jax.tree.map(lambda x: w * x, u), lambda p: jnp.asarray(2.0), 0.1,
      direction=optax.ema(0.5, debias=False))
  state = tx.init(params)
  g = {'w': jnp.ones(3)}
  out, state = tx.update(g, state)
  np.testing.assert_allclose(out['w'], 2.0 * 0.5 * jnp.ones(3))
  np.testing.assert_allclose(state.last_input['w'], 0.5 * jnp.ones(3))
  assert state._fields[0] == 'count' and 'preconditioner_params' in state._fields


def test_bad_inputs_raise_clear_errors():
  params = {'w': jnp.ones(3)}
  with pytest.raises(TypeError, match='apply_fn must be a callable'):
    fop_optax.scale_by_learned_preconditioner(None, lambda p: 1.0)
  with pytest.raises(ValueError, match='learning_rate'):
    fop_optax.scale_by_learned_preconditioner(lambda w, u: u, lambda p: jnp.ones(()), -1.0)
  wrong_shape = fop_optax.scale_by_learned_preconditioner(
      lambda w, u: jax.tree.map(lambda x: x[:2], u), lambda p: jnp.ones(()))
  with pytest.raises(ValueError, match='must keep every leaf'):
    wrong_shape.init(params)
  wrong_dtype = fop_optax.scale_by_learned_preconditioner(
      lambda w, u: jax.tree.map(lambda x: x.astype(jnp.float16), u), lambda p: jnp.ones(()))
  with pytest.raises(ValueError, match='dtype'):
    wrong_dtype.init(params)
  int_w = fop_optax.scale_by_learned_preconditioner(
      lambda w, u: u, lambda p: jnp.arange(3))
  with pytest.raises(TypeError, match='floating point'):
    int_w.init(params)
  ok = fop_optax.scale_by_learned_preconditioner(lambda w, u: u, lambda p: jnp.ones(()))
  with pytest.raises(TypeError, match='floating-point'):
    ok.init({'i': jnp.arange(3)})
  state = ok.init(params)
  with pytest.raises(ValueError, match='does not match'):
    ok.update({'v': jnp.ones(3)}, state)
