"""One online hypergradient: FOP's closed forms equal the generic ``jax.vjp`` path, and S-HD is an instance.

FOP (``scale_by_fop``) and the generic learned preconditioner
(``scale_by_learned_preconditioner``) are two instances of one online step
(:mod:`fop_optax.online`): the same stored previous input, hyper step, untouched
first step, learn-every-``k`` gate and projection; only the one-step
hypergradient differs (FOP's closed form per structure, or ``jax.vjp`` of
``apply_fn``). These tests run both on the same problem and require the same
updates and the same learned matrices at every step, with the guard off and on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S

STEPS = 6
ETA = 0.05


# The problem of tests/test_learned.py (FOP ≡ the learned path there too), shared.
from test_learned import _loss, _params, x64  # noqa: E402,F401  (x64 is a fixture)


STRUCTURES = {
    'default': None,
    'full': {'conv': S.Full(row_axes=2), 'dense': 'full', 'big': 'full', 'vec': 'full'},
    'spatial': {'conv': 'spatial', 'dense': 'full', 'big': 'scalar', 'vec': 'diagonal'},
    'low_rank': {'conv': S.LowRank(rank=2, row_axes=2), 'dense': S.LowRank(rank=2),
                 'big': S.LowRank(rank=3), 'vec': S.LowRank(rank=2)},
    'diagonal': 'diagonal',
    'scalar': 'scalar',
}


def _structs(params, structures, max_scale, normalize=False):
  return jax.tree.leaves(S.resolve_structures(params, structures, max_scale=max_scale,
                                              normalize=normalize))


def fop_as_learned(params, structures, max_scale=None, normalize=False, seed=0):
  """FOP written as a learned preconditioner, with nothing of its closed-form hypergradient.

  Returns ``(init_fn, apply_fn, project_and_apply)``: ``w`` is the list of per-leaf
  ``M`` s (initialised as ``scale_by_fop`` does), ``apply_fn`` each structure's
  ``P·G`` (the guard's clip of ``P`` included: ``jax.vjp`` learns through it), and
  ``project_and_apply`` the guard's projection of ``M`` after the hyper step with
  the preconditioning by the projected ``M`` (``None`` without the guard).
  """
  structs = _structs(params, structures, max_scale, normalize)

  def init_fn(params):
    key = jax.random.key(seed)
    return [s.init(tuple(p.shape), jnp.promote_types(jnp.float32, p.dtype),
                   jax.random.fold_in(key, i))
            for i, (s, p) in enumerate(zip(structs, jax.tree.leaves(params)))]

  def apply_fn(w, u):
    leaves, treedef = jax.tree.flatten(u)
    return treedef.unflatten([s.precondition(m, g) for s, m, g in zip(structs, w, leaves)])

  def project_and_apply(w, u):
    leaves, treedef = jax.tree.flatten(u)
    pairs = [s.clip_and_precondition(m, max_scale, g) for s, m, g in zip(structs, w, leaves)]
    return [m for m, _ in pairs], treedef.unflatten([out for _, out in pairs])

  return init_fn, apply_fn, (None if max_scale is None else project_and_apply)


def calibrated_adam(params, structures, lr, max_scale=None):
  """``optax.adam(lr)`` with FOP's per-leaf factor ``hyper_step_scale`` on its step (any tree of M s)."""
  structs = _structs(params, structures, max_scale)
  scales = [s.hyper_step_scale(tuple(p.shape)) for s, p in zip(structs, jax.tree.leaves(params))]
  adam = optax.adam(lr)

  def update(updates, state, params=None):
    updates, state = adam.update(updates, state, params)
    leaves, treedef = jax.tree.flatten(updates)
    return treedef.unflatten([u * c for u, c in zip(leaves, scales)]), state

  return optax.GradientTransformation(adam.init, update)


def _run(tx, params, steps=STEPS, start=None):
  state = tx.init(params)
  if start is not None:   # replaces the learned matrices (a list, in leaf order) of state[0]
    first = state[0]
    if hasattr(first, 'preconditioners'):
      first = first._replace(preconditioners=jax.tree.structure(first.preconditioners).unflatten(
          start(jax.tree.leaves(first.preconditioners))))
    else:
      first = first._replace(preconditioner_params=start(first.preconditioner_params))
    state = (first,) + tuple(state[1:])
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
  out = []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    out.append((updates, state[0]))
  return out


def _flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def _compare(fop_run, other_run, init_ms, *, rtol=1e-9, atol=1e-12, min_move=1e-3):
  """Updates and matrices equal at every step; returns (max rel. error, how far M moved)."""
  err = 0.0
  for t, ((u_f, s_f), (u_l, ms_l)) in enumerate(zip(fop_run, other_run)):
    flat_f, flat_l = _flat(u_f), _flat(u_l)
    np.testing.assert_allclose(flat_l, flat_f, rtol=rtol, atol=atol, err_msg=f'updates, step {t}')
    err = max(err, float(jnp.max(jnp.abs(flat_l - flat_f)) / jnp.max(jnp.abs(flat_f))))
    ms_f = jax.tree.leaves(s_f.preconditioners)
    ms_l = jax.tree.leaves(ms_l)
    assert len(ms_f) == len(ms_l)
    for i, (m_f, m_l) in enumerate(zip(ms_f, ms_l)):
      assert m_f.dtype == m_l.dtype
      np.testing.assert_allclose(m_l, m_f, rtol=rtol, atol=atol, err_msg=f'M {i}, step {t}')
  moved = max(float(jnp.max(jnp.abs(m - m0))) for m, m0 in zip(ms_l, init_ms))
  assert moved > min_move, f'the matrices moved by {moved}: the comparison would be vacuous'
  return err, moved


def _fop_tx(structures, hyper, **kw):
  return optax.chain(fop_optax.scale_by_fop(ETA, hyper_optimizer=hyper, structures=structures,
                                            **kw),
                     optax.sgd(ETA, momentum=0.9))


def _learned_tx(init_fn, apply_fn, hyper):
  return optax.chain(
      fop_optax.scale_by_learned_preconditioner(apply_fn, init_fn, ETA, hyper),
      optax.sgd(ETA, momentum=0.9))


@pytest.mark.parametrize('name', list(STRUCTURES))
@pytest.mark.parametrize('hyper', ['sgd', 'calibrated adam'])
def test_fop_equals_vjp_instance_guard_off(x64, name, hyper):
  """max_scale=None: scale_by_fop's closed forms = jax.vjp of P·G, updates and M, 6 steps."""
  params, structures = _params(), STRUCTURES[name]
  make = {'sgd': lambda: optax.sgd(0.01),
          'calibrated adam': lambda: calibrated_adam(params, structures, 0.05)}[hyper]
  init_fn, apply_fn, _ = fop_as_learned(params, structures)
  fop_run = _run(_fop_tx(structures, make(), max_scale=None), params)
  learned_run = [(u, s.preconditioner_params)
                 for u, s in _run(_learned_tx(init_fn, apply_fn, make()), params)]
  err, moved = _compare(fop_run, learned_run, init_fn(params))
  print(f'{name} ({hyper}), guard off: max rel. error {err:.1e}, M moved {moved:.2f}')


def test_fop_norm_equals_vjp_instance(x64):
  """FOP-norm (P/‖P‖₂): the closed form with ∂λ/∂M equals jax.vjp through eigvalsh."""
  params = _params()
  structures = {'conv': 'spatial', 'dense': 'full', 'big': 'full', 'vec': 'full'}
  init_fn, apply_fn, _ = fop_as_learned(params, structures, normalize=True)
  fop_run = _run(_fop_tx(structures, optax.sgd(0.01), max_scale=None, normalize=True), params)
  learned_run = [(u, s.preconditioner_params)
                 for u, s in _run(_learned_tx(init_fn, apply_fn, optax.sgd(0.01)), params)]
  _compare(fop_run, learned_run, init_fn(params), rtol=1e-8, atol=1e-11)


def test_s_hd_through_the_learned_path_is_the_closed_form(x64):
  """S-HD: apply_fn(w, u) = w·u, one scalar per leaf, SGD(β) on w, is α_t = α_{t−1} + βη g_t·u_{t−1}."""
  params = _params()
  alpha0, beta = 0.3, 0.02

  def apply_fn(w, u):
    return jax.tree.map(lambda a, x: (a * x).astype(x.dtype), w, u)

  def init_fn(params):
    return jax.tree.map(lambda p: jnp.full((), alpha0, p.dtype), params)

  tx = fop_optax.scale_by_learned_preconditioner(apply_fn, init_fn, ETA, optax.sgd(beta))
  state = tx.init(params)
  update = jax.jit(tx.update)
  # By hand: the hypergradient of w_{t−1} is −η g_t·u_{t−1}, SGD subtracts β times it.
  alphas = {k: alpha0 for k in params}
  prev = None
  p = params
  for t in range(STEPS):
    g = jax.grad(_loss)(p)
    out, state = update(g, state, p)
    gn = {k: np.asarray(v) for k, v in g.items()}
    if prev is not None:
      alphas = {k: alphas[k] + beta * ETA * float(np.vdot(gn[k], prev[k])) for k in params}
    for k in params:
      np.testing.assert_allclose(out[k], alphas[k] * gn[k], rtol=1e-12, atol=1e-15)
      np.testing.assert_allclose(state.preconditioner_params[k], alphas[k], rtol=1e-12)
    prev = gn
    p = jax.tree.map(lambda x, u: x - ETA * u, p, out)
  assert abs(alphas['dense'] - alpha0) > 1e-4


def test_s_hd_through_the_learned_path_equals_scale_by_hypergradient_additive(x64):
  """Baydin's additive S-HD (scope='leaf', η=1, descent by scale(−1)) is the learned path's w·u."""
  params = _params()
  alpha0, beta = 0.05, 0.01
  hd = optax.chain(fop_optax.scale_by_hypergradient(alpha0, beta, rule='additive', scope='leaf'),
                   optax.scale(-1.0))

  def apply_fn(w, u):
    return jax.tree.map(lambda a, x: (a * x).astype(x.dtype), w, u)

  learned = optax.chain(
      fop_optax.scale_by_learned_preconditioner(
          apply_fn, lambda p: jax.tree.map(lambda x: jnp.full((), alpha0, x.dtype), p), 1.0,
          optax.sgd(beta)),
      optax.scale(-1.0))
  for (u_h, s_h), (u_l, s_l) in zip(_run(hd, params), _run(learned, params)):
    np.testing.assert_allclose(_flat(u_l), _flat(u_h), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(_flat(s_l.preconditioner_params), _flat(s_h.learning_rates),
                               rtol=1e-12)
  assert abs(float(s_l.preconditioner_params['dense']) - alpha0) > 1e-4


def _learned_with_hooks_tx(init_fn, apply_fn, hyper, project_and_apply=None, update_every=1):
  # The generic vjp instance with the online step's projection and gate (learned._scale_by_learned).
  return optax.chain(
      fop_optax.learned._scale_by_learned(  # pylint: disable=protected-access
          apply_fn, init_fn, ETA, hyper, project_and_apply=project_and_apply,
          update_every=update_every),
      optax.sgd(ETA, momentum=0.9))


GUARDED = ['default', 'full', 'spatial', 'low_rank', 'diagonal', 'scalar']
BOUND = 1.2   # above 1, so that scalar and diagonal m² (starting at 1) can reach it


def _generic_start(ms):
  """Low rank: V ≠ 0, so that jax.vjp through the clip's eigh meets no repeated eigenvalue.

  ``scale_by_fop`` starts at ``V = 0`` (``P = I``); its closed form handles that (divided
  differences), autodiff through ``eigh`` returns NaN there. Other ``M`` s are kept.
  """
  key = jax.random.key(1)
  return [m.at[1].set(0.3 * jax.random.normal(jax.random.fold_in(key, i), m[1].shape, m.dtype))
          if m.ndim == 3 else m for i, m in enumerate(ms)]


@pytest.mark.parametrize('name', GUARDED)
def test_fop_equals_vjp_instance_guard_on(x64, name):
  """The guard on: the closed forms through the clip (Daleckii–Krein) and the projection after the
  hyper step = jax.vjp through the clipped P·G with the same projection hook, updates and M."""
  params, structures = _params(), STRUCTURES[name]
  hyper = lambda: optax.sgd(0.05)   # large enough for P to reach the bound within 6 steps
  init_fn, apply_fn, project_and_apply = fop_as_learned(params, structures, max_scale=BOUND)
  fop_run = _run(_fop_tx(structures, hyper(), max_scale=BOUND), params, start=_generic_start)
  learned_run = [(u, s.preconditioner_params) for u, s in _run(
      _learned_with_hooks_tx(init_fn, apply_fn, hyper(), project_and_apply), params,
      start=_generic_start)]
  err, moved = _compare(fop_run, learned_run, _generic_start(init_fn(params)),
                        rtol=1e-8, atol=1e-11)
  # The guard acted: without it the same run differs.
  free_run = _run(_fop_tx(structures, hyper(), max_scale=None), params, start=_generic_start)
  gap = max(float(jnp.max(jnp.abs(_flat(a[0]) - _flat(b[0])))) for a, b in zip(fop_run, free_run))
  assert gap > 1e-6, f'{name}: the guard never acted (gap {gap:.1e}): the comparison is vacuous'
  print(f'{name}, guard on: max rel. error {err:.1e}, M moved {moved:.2f}, guard gap {gap:.1e}')


@pytest.mark.parametrize('name', ['default', 'scalar'])
def test_update_every_equals_vjp_instance(x64, name):
  """update_every=2 (guard on, B = 1.2): the same gate in both instances; M kept on odd calls."""
  params, structures = _params(), STRUCTURES[name]
  init_fn, apply_fn, project_and_apply = fop_as_learned(params, structures, max_scale=BOUND)
  fop_run = _run(_fop_tx(structures, optax.sgd(0.05), update_every=2, max_scale=BOUND), params,
                 start=_generic_start)
  learned_run = [(u, s.preconditioner_params) for u, s in _run(
      _learned_with_hooks_tx(init_fn, apply_fn, optax.sgd(0.05), project_and_apply, 2), params,
      start=_generic_start)]
  _compare(fop_run, learned_run, _generic_start(init_fn(params)), rtol=1e-8, atol=1e-11)
  ms = [jax.tree.leaves(s.preconditioners) for _, s in fop_run]
  # fop_run[t] is the call with count t: counts 0, 1, 3, 5 keep M, counts 2, 4 learn.
  for t in (1, 3, 5):
    for a, b in zip(ms[t], ms[t - 1]):
      np.testing.assert_array_equal(a, b)


def test_online_step_gate_and_hooks():
  """The core itself: first call and off-gate calls keep w and the hyper state and only apply."""
  from fop_optax import online

  def hypergradient(w, last_input, gradient):
    return -last_input * gradient

  def hyper_step(hg, hs, w):
    return w - 0.5 * hg, hs + 1

  apply = lambda w, u: w * u
  project = lambda w, u: (jnp.minimum(w, 2.0), jnp.minimum(w, 2.0) * u)
  w, hs = jnp.asarray(1.0), jnp.asarray(0)
  for count, every, learns in [(0, 1, False), (1, 1, True), (3, 2, False), (4, 2, True)]:
    new_w, new_hs, out = online.online_step(
        jnp.asarray(count), w, hs, jnp.asarray(3.0), jnp.asarray(2.0), jnp.asarray(5.0),
        hypergradient=hypergradient, hyper_step=hyper_step, apply=apply,
        project_and_apply=project, every=every)
    assert bool(online.learn_now(jnp.asarray(count), every)) == learns
    if learns:   # w = 1 + 0.5·6 = 4, projected to 2
      assert float(new_w) == 2.0 and int(new_hs) == 1 and float(out) == 10.0
    else:
      assert float(new_w) == 1.0 and int(new_hs) == 0 and float(out) == 5.0
