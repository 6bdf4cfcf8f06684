"""benchmarks/depth.py's solver-call counter and per-block slope, on programs whose answer is known."""

import jax
import jax.numpy as jnp

from benchmarks import depth


def _calls(fn, *args):
  return depth.solver_calls(jax.jit(fn).lower(*args).compile().as_text())


def test_counts_one_call_per_solver():
  p = jnp.eye(6) + 0.1
  calls = _calls(lambda p: (jnp.linalg.eigh(p)[0], jnp.linalg.qr(p[:, :3])[0]), p)
  assert sum(v for k, v in calls.items() if 'syevd' in k) == 1
  assert sum(v for k, v in calls.items() if 'geqrf' in k) == 1
  assert _calls(lambda p: 2.0 * p @ p, p) == {}


def test_the_model_grows_by_two_kernels_per_block():
  for n in (1, 3):
    params = depth.init_params(jax.random.key(0), n)
    assert len(params['blocks']) == n
    assert params['blocks'][0]['fc1']['kernel'].shape == (depth.WIDTH, depth.WIDTH)


def test_per_block_is_the_slope_between_the_extreme_depths():
  rows = [dict(optimizer=o, depth=d, time=dict(median=t))
          for o, (a, b) in {'momentum': (1.0, 3.0), 'fop': (2.0, 8.0),
                            'adam': (1.0, 2.0), 'fop_adam': (1.0, 4.0)}.items()
          for d, t in ((2, a), (4, b))]
  slopes = depth.per_block(rows, [2, 4])
  assert slopes['momentum'] == 1.0 and slopes['fop'] == 3.0
  assert slopes['fop/momentum'] == 3.0 and slopes['fop_adam/adam'] == 3.0


def test_executed_calls_count_only_the_branch_taken():
  p = jnp.eye(5) + 0.1
  fn = jax.jit(lambda take, p: jax.lax.cond(take, lambda: jnp.linalg.eigh(p)[0],
                                            lambda: jnp.diag(p)))
  text = fn.lower(True, p).compile().as_text()
  assert sum(depth.solver_calls(text).values()) == 1   # in the program either way
  for take, expected in ((True, 1.0), (False, 0.0)):
    run = lambda take=take: jax.block_until_ready(fn(take, p))
    run()
    executed = depth.executed_solver_calls(text, run, steps=2)
    assert sum(executed.values()) == expected, executed


def test_profile_names_each_thunk_kind():
  from benchmarks import _harness
  p = jnp.eye(5) + 0.1
  fn = jax.jit(lambda p: jnp.linalg.eigh(2.0 * p + 1.0)[0] * 3.0)
  text = fn.lower(p).compile().as_text()
  kinds = _harness.thunk_kinds(text)
  assert 'lapack_ssyevd_ffi' in kinds.values()
  run = lambda: jax.block_until_ready(fn(p))
  run()
  wall, by_kind, _ = _harness.profile_thunks(run, text, steps=2)
  assert by_kind['lapack_ssyevd_ffi'][1] == 1.0   # one call per step
  assert wall > 0 and all(ms >= 0 for ms, _ in by_kind.values())


def test_solver_calls_of_any_backend():
  text = ('%a = f32[4,4] custom-call(%p), custom_call_target="lapack_ssyevd_ffi"\n'
          '%b = f32[4,4] custom-call(%q), custom_call_target="cusolver_geqrf_ffi"\n'
          '%c = f32[4,4] custom-call(%r), custom_call_target="cusolver_syevd_ffi"\n'
          '%d = f32[4,4] custom-call(%s), custom_call_target="xla_ffi_python_cpu_callback"\n')
  assert depth.solver_calls(text) == {'lapack_ssyevd_ffi': 1, 'cusolver_geqrf_ffi': 1,
                                            'cusolver_syevd_ffi': 1}


def test_grouping_stacks_the_block_kernels():
  from benchmarks import grouping
  params = depth.init_params(jax.random.key(0), 3)
  s = grouping.stacked_blocks(params, 3)
  assert s['blocks']['kernel'].shape == (6, depth.WIDTH, depth.WIDTH)
  assert (s['blocks']['kernel'][3] == params['blocks'][1]['fc2']['kernel']).all()
