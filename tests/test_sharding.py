"""FOP under jax.jit with sharded parameters, on 8 simulated CPU devices.

The 8-device part runs in a subprocess (``tests/sharding_worker.py``) with
``--xla_force_host_platform_device_count=8`` added to ``XLA_FLAGS``, so this process and the
rest of the suite keep their single device. One subprocess run (~20-40 s) is
shared by all tests of the module.
"""

import functools
import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sharding_worker.py')
AXIS_TYPES = ('Explicit', 'Auto')


@functools.lru_cache(maxsize=None)
def report():
  # Appended to XLA_FLAGS: keeps the suite's compile settings (tests/conftest.py).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"))
  proc = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True,
                        timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('REPORT ')]
  if proc.returncode != 0 or not lines:
    pytest.fail(f'sharding worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}')
  return json.loads(lines[-1][len('REPORT '):])


def test_runs_on_eight_devices():
  assert report()['devices'] == 8


@pytest.mark.parametrize('axis_type', AXIS_TYPES)
def test_state_shardings_are_stable_across_updates(axis_type):
  r = report()[axis_type]['params_sharded']
  assert r['changed'] == []
  assert r['finite']
  # No recompilation once the inputs' specs are steady (see the worker).
  assert r['compiles'][-1] == r['compiles'][1] <= 2


@pytest.mark.parametrize('axis_type', AXIS_TYPES)
def test_documented_shardings(axis_type):
  r = report()[axis_type]['params_sharded']
  # The stored gradient is sharded like the parameters ...
  assert r['last_gradient']['conv']['kernel'] == r['params']['conv']['kernel'] \
      == "P(None, None, None, 'model')"
  assert r['last_gradient']['d1']['kernel'] == "P(None, 'model')"
  assert r['last_gradient']['d2']['kernel'].startswith("P('model',")
  # ... the matrices (spatial 9×9, full 16×16, low-rank (2, 128, 8)) and the
  # hyper-optimiser's moments of them are replicated.
  for spec in list(_leaves(r['preconditioners'])) + r['hyper_state']:
    assert 'model' not in spec and 'data' not in spec, spec


@pytest.mark.parametrize('axis_type', AXIS_TYPES)
def test_data_parallel_matches_single_device(axis_type):
  r = report()[axis_type]['data_parallel']
  assert r['devices'] == 8
  assert r['params_moved'] > 1e-2   # the run did train
  assert r['max_param_diff'] < 1e-5
  # Sharded reductions and the guard's eigensolvers round differently: float32 agreement.
  assert r['max_preconditioner_diff'] < 5e-4
  assert r['multi_losses'] == pytest.approx(r['single_losses'], rel=1e-5)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def test_fop_runs_wherever_sgd_runs():
  """Explicit and auto axes, inside and outside ``jax.set_mesh``, kernels sharded along
  each of their axes (rows, columns, both, two mesh axes on one): every case that
  ``optax.sgd`` runs, fop, fop_adam and LODO run too, and equal the one-device run."""
  cases = report()['anywhere']
  assert len(cases) == 32
  failed = {k: v['error'] for k, v in cases.items() if not v['ok']}
  assert not failed, failed
  for case, r in cases.items():
    assert r['max_diff'] < 1e-5, case
    # An explicit mesh puts the layout in the type: updates keep the parameters'.
    # (Auto axes leave the layout of LODO's updates to the compiler.)
    if case.startswith('Explicit'):
      assert r['kept'], case
  outside = [k for k in cases if '/outside/' in k and k.startswith('Explicit')]
  assert {k.split('/')[-1] for k in outside} == {'sgd', 'fop', 'fop_adam', 'lodo'}
