"""examples/paper_length.py at tiny size: records, the ÷10 decay, exact resume, vmapped seeds."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('flax')
pytest.importorskip('orbax.checkpoint')
from examples import common  # noqa: E402

if not os.path.isdir(common.FASHION_MNIST_DIR):
  pytest.skip('Fashion-MNIST is not installed', allow_module_level=True)

from examples import paper_length  # noqa: E402

import fop_optax  # noqa: E402
import optax  # noqa: E402

# 512 examples at batch 128: 4 steps an epoch; 40 steps = 10 epochs, the decay at step 21.
COMMON = ['--subset', '512', '--test-subset', '200', '--steps', '40', '--decay-at', '0.525',
          '--quiet']
ARGS = [*COMMON, '--optimizers', 'momentum,fop', '--ckpt-every', '20']


def _load(out, name):
  with open(os.path.join(out, f'{name}.json')) as f:
    return json.load(f)


def _assert_same(a, b, exact=True):
  check = (np.testing.assert_array_equal if exact
           else lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-5))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    check(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('paper_length')
  whole, parts, alone = (str(base / d) for d in ('whole', 'parts', 'alone'))
  out = {'whole': paper_length.main([*ARGS, '--seeds', '0,1', '--out', whole]), 'dirs': {}}
  out['first'] = paper_length.main([*ARGS, '--seeds', '0,1', '--out', parts,
                                    '--stop-after', '20'])
  out['first_json'] = _load(parts, 'fop')
  out['resumed'] = paper_length.main([*ARGS, '--seeds', '0,1', '--out', parts])
  out['alone'] = paper_length.main([*COMMON, '--optimizers', 'fop', '--seeds', '1,',
                                    '--out', alone, '--stop-after', '20'])
  out['unrolled'] = paper_length.main([*COMMON, '--optimizers', 'momentum', '--seeds', '0,1',
                                       '--seed-axis', 'unroll', '--out', str(base / 'unrolled'),
                                       '--stop-after', '20'])
  out['dirs'] = {'whole': whole, 'parts': parts, 'alone': alone}
  return out


def test_records(runs):
  for name in ('momentum', 'fop'):
    rec = _load(runs['dirs']['whole'], name)
    assert rec['done'] and rec['step'] == 40 and rec['optimizer'] == name
    assert rec['config']['seeds'] == [0, 1] and rec['config']['model'] == 'mlp'
    assert rec['argv'][0].endswith('paper_length.py') and '--stop-after' not in rec['argv']
    assert rec['jax_version'] == jax.__version__ and rec['machine']['cpu_count']
    hist = rec['history']
    assert hist['step'] == list(range(4, 41, 4)) and len(hist['wall_seconds']) == 10
    assert [h['seed'] for h in hist['seeds']] == [0, 1]
    for h in hist['seeds']:
      for key in ('test_accuracy', 'test_loss', 'train_loss'):
        assert len(h[key]) == 10 and all(math.isfinite(v) for v in h[key])
      assert 0 < h['test_accuracy'][-1] <= 1
      assert h['train_loss'][-1] < h['train_loss'][0]
      assert ('lambda_max' in h) == (name == 'fop')
    if name == 'fop':
      for h in hist['seeds']:
        assert len(h['lambda_max']) == 3  # the MLP's three kernels
        for leaf, values in h['lambda_max'].items():
          assert len(values) == 10 and all(0.5 < v < 2 for v in values), leaf
          assert all(0 < m <= v + 1e-6 for m, v in zip(h['lambda_mean'][leaf], values))


def test_learned_reads_p_from_the_last_checkpoint(runs):
  """--learned restores the final checkpoint: its λ_max per leaf and seed is what the run logged
  at its last evaluation (same state), within the guard's bound, and momentum has no rows."""
  table = paper_length.learned(runs['dirs']['whole'], ['momentum', 'fop'])
  rows = [line.split(' | ') for line in table.splitlines()[2:]]
  assert len(rows) == 6 and {r[0].lstrip('| ') for r in rows} == {'FOP+momentum'}
  hist = _load(runs['dirs']['whole'], 'fop')['history']
  for h in hist['seeds']:
    mine = sorted(float(r[6]) for r in rows if r[1] == str(h['seed']) and r[2] == '40')
    logged = sorted(v[-1] for v in h['lambda_max'].values())
    np.testing.assert_allclose(mine, logged, atol=2e-4)
    assert all(v <= 1 + 1e-4 for v in mine)


def test_learning_rate_divided_by_ten_at_the_decay_step(runs):
  rec = _load(runs['dirs']['whole'], 'fop')
  assert rec['decay_step'] == 21  # round(0.525 · 40): steps 0..20 at 0.05, from 21 at 0.005
  # lr of each epoch's last step (steps 3, 7, ..., 39)
  np.testing.assert_allclose(rec['history']['lr'], [0.05] * 5 + [0.005] * 5, rtol=1e-6)
  config = rec['config']
  for name in ('momentum', 'fop'):
    schedule = paper_length.lr_schedule(config['lr'], 40, config['decay_at'])
    assert float(schedule(20)) == pytest.approx(0.05) and float(schedule(21)) == pytest.approx(0.005)
  # and the schedule reaches the optimiser: one step at count 21 moves 10x less than at 20
  tx = paper_length.build_optimizer('momentum', dict(config, momentum=0.0))
  params = {'w': np.ones(3, np.float32)}
  state = tx.init(params)
  state = jax.tree.map(lambda x: np.asarray(20, x.dtype) if np.ndim(x) == 0 else x, state)
  u20, state = tx.update(params, state, params)
  u21, _ = tx.update(params, state, params)
  np.testing.assert_allclose(np.asarray(u21['w']), 0.1 * np.asarray(u20['w']), rtol=1e-6)


def test_interrupted_and_resumed_run_is_bit_identical(runs):
  first = runs['first_json']
  assert not first['done'] and first['step'] == 20 and len(first['history']['step']) == 5
  for name in ('momentum', 'fop'):
    whole, resumed = runs['whole'][name], runs['resumed'][name]
    _assert_same(whole['params'], resumed['params'])
    _assert_same(whole['opt_state'], resumed['opt_state'])
    a, b = whole['record']['history'], resumed['record']['history']
    assert a['step'] == b['step'] and a['lr'] == b['lr']
    assert a['seeds'] == b['seeds']  # every loss, accuracy and eigenvalue, bit for bit
    assert resumed['record']['done']


def test_rerun_of_a_finished_run_is_skipped(runs):
  again = paper_length.main([*ARGS, '--seeds', '0,1', '--out', runs['dirs']['whole']])
  assert 'params' not in again['fop'] and again['fop']['record']['done']


def test_vmapped_seeds_match_a_seed_run_alone(runs):
  """Seed 1 of the vmapped pair [0, 1] against seed 1 alone, both stopped after step 20."""
  both, alone = runs['first']['fop'], runs['alone']['fop']
  _assert_same(jax.tree.map(lambda x: x[1], both['params']),
               jax.tree.map(lambda x: x[0], alone['params']), exact=False)
  h2, h1 = both['record']['history']['seeds'][1], alone['record']['history']['seeds'][0]
  assert h1['seed'] == h2['seed'] == 1
  np.testing.assert_allclose(h1['train_loss'], h2['train_loss'], rtol=1e-4)
  np.testing.assert_allclose(h1['test_accuracy'], h2['test_accuracy'], atol=0.011)


def test_unrolled_seeds_match_vmapped_seeds(runs):
  """--seed-axis unroll (the CNN's default) computes what vmap does, to float tolerance."""
  vmapped, unrolled = runs['first']['momentum'], runs['unrolled']['momentum']
  assert unrolled['record']['config']['seed_axis'] == 'unroll'
  assert vmapped['record']['config']['seed_axis'] == 'vmap'
  _assert_same(vmapped['params'], unrolled['params'], exact=False)


def test_plot(runs, tmp_path):
  path = str(tmp_path / 'curves.png')
  paper_length.plot(runs['dirs']['whole'], path)
  assert os.path.getsize(path) > 1000


def test_summary_is_mean_and_std_over_seeds(runs):
  table = paper_length.summary(runs['dirs']['whole'], target=0.0)
  lines = table.splitlines()
  assert lines[0].startswith('| optimiser |') and len(lines) == 4   # header, rule, 2 optimisers
  rec = _load(runs['dirs']['whole'], 'fop')
  acc = [h['test_accuracy'][-1] for h in rec['history']['seeds']]
  row = next(line for line in lines if line.startswith('| FOP'))
  assert f'{np.mean(acc):.4f} ± {np.std(acc):.4f}' in row
  assert '| 4 |' in row   # target 0: reached at the first evaluation (step 4)


def test_hd_runs_log_their_learned_step_size(tmp_path):
  """S-HD's history holds the median, min and max learned α of the state at each evaluation."""
  out = str(tmp_path / 'shd')
  res = paper_length.main([*COMMON, '--steps', '8', '--optimizers', 'shd', '--seeds', '0,1',
                           '--out', out])['shd']
  hd = next(x for x in jax.tree.leaves(
      res['opt_state'], is_leaf=lambda x: isinstance(x, fop_optax.hypergradient.HypergradientState))
            if isinstance(x, fop_optax.hypergradient.HypergradientState))
  alpha = np.stack([np.ravel(a) for a in jax.tree.leaves(hd.learning_rates)], -1)  # (seed, leaf)
  for k, h in enumerate(res['record']['history']['seeds']):
    assert len(h['alpha_median']) == 2    # evaluations at steps 4 and 8
    np.testing.assert_allclose(h['alpha_median'][-1], np.median(alpha[k]), rtol=1e-6)
    assert h['alpha_min'][-1] == pytest.approx(alpha[k].min()) and h['alpha_max'][-1] == pytest.approx(alpha[k].max())
    assert h['alpha_median'][-1] != pytest.approx(0.05)   # α was learned, not left at α_0
  row = paper_length.summary(out, ['shd']).splitlines()[2].split(' | ')
  assert float(row[-2]) == pytest.approx(np.mean(np.median(alpha, -1)), rel=1e-2)


def test_resumed_history_gains_the_series_its_run_did_not_log():
  """A checkpoint from before α was logged resumes with α padded to the evaluations it missed."""
  old = paper_length._new_history([0, 1], fop=False, hd=False)
  old['step'] += [4, 8]
  for h in old['seeds']:
    h['test_accuracy'] += [0.5, 0.6]
  paper_length._add_missing_series(old, paper_length._new_history([0, 1], fop=False, hd=True))
  for k, h in enumerate(old['seeds']):
    assert h['seed'] == k and h['test_accuracy'] == [0.5, 0.6]
    assert h['alpha_median'] == h['alpha_min'] == h['alpha_max'] == [None, None]
  fop = paper_length._new_history([0], fop=True)
  paper_length._add_missing_series(fop, paper_length._new_history([0], fop=True, hd=True))
  assert fop['seeds'][0]['lambda_max'] == {} and fop['seeds'][0]['alpha_median'] == []


def test_budget_study_pairs_fop_with_momentum_of_the_same_length(runs, tmp_path):
  from examples import budget_study
  whole = runs['dirs']['whole']
  os.symlink(whole, tmp_path / 'steps40')            # momentum.json
  os.symlink(whole, tmp_path / 'steps40_h0.0001')    # fop.json
  os.symlink(whole, tmp_path / 'steps80_h0.01')      # no 80-step momentum: left out
  rows = budget_study.main(['--root', str(tmp_path), '--plot', str(tmp_path / 'gain.png')])
  assert len(rows) == 1 and rows[0]['steps'] == 40 and rows[0]['hyper_lr'] == 1e-4
  fop = np.array([h['test_accuracy'][-1] for h in _load(whole, 'fop')['history']['seeds']])
  mom = np.array([h['test_accuracy'][-1] for h in _load(whole, 'momentum')['history']['seeds']])
  np.testing.assert_allclose(rows[0]['gain'], np.mean(fop - mom))
  assert rows[0]['gain_min'] == np.min(fop - mom) and rows[0]['budget'] == pytest.approx(40e-4)
  assert os.path.getsize(tmp_path / 'gain.png') > 1000


def test_robustness_at_length_reads_each_cell_and_pairs_the_seeds(runs, tmp_path):
  """A cell is a paper_length dir; the gain is FOP − momentum per seed; missing cells are left out."""
  from examples import robustness_at_length as ral
  whole = runs['dirs']['whole']   # lr 0.05, momentum 0.9: paper_length's defaults
  os.symlink(whole, ral.cell_dir(str(tmp_path), 0.05, 0.9))
  rows = ral.main(['--steps', '0', '--lrs', '0.05,0.2', '--momenta', '0.9', '--out', str(tmp_path),
                   '--plot', str(tmp_path / 'grid.png')])
  assert len(rows) == 1 and (rows[0]['lr'], rows[0]['momentum']) == (0.05, 0.9)
  fop = np.array([h['test_accuracy'][-1] for h in _load(whole, 'fop')['history']['seeds']])
  mom = np.array([h['test_accuracy'][-1] for h in _load(whole, 'momentum')['history']['seeds']])
  np.testing.assert_allclose([rows[0]['base'], rows[0]['fop'], rows[0]['gain']],
                             [mom.mean(), fop.mean(), np.mean(fop - mom)])
  assert rows[0]['gain_max'] == np.max(fop - mom) and rows[0]['done'] and rows[0]['seeds'] == 2
  lam = _load(whole, 'fop')['history']['seeds']
  assert rows[0]['mean_eig'] == min(v[-1] for h in lam for v in h['lambda_mean'].values())
  assert '| 0.05 | 0.9 |' in ral.table(rows) and os.path.getsize(tmp_path / 'grid.png') > 1000


def test_robustness_at_length_runs_every_cell_with_its_lr_and_momentum(monkeypatch, tmp_path):
  from examples import robustness_at_length as ral
  calls = []
  monkeypatch.setattr(ral.paper_length, 'main', lambda argv: calls.append(argv))
  ral.main(['--steps', '40', '--lrs', '0.1,0.3', '--momenta', '0.5', '--hyper-lr', '1e-3',
            '--out', str(tmp_path), '--', '--subset', '512'])
  assert len(calls) == 2
  for argv, lr in zip(calls, ('0.1', '0.3')):
    opts = dict(zip(argv[:-2:2], argv[1:-2:2]))
    assert opts['--lr'] == lr and opts['--momentum'] == '0.5' and opts['--hyper-lr'] == '0.001'
    assert opts['--optimizers'] == 'momentum,fop' and opts['--steps'] == '40'
    assert opts['--out'] == ral.cell_dir(str(tmp_path), float(lr), 0.5)
    assert argv[-2:] == ['--subset', '512']


@pytest.mark.parametrize('arm', ['fop_gamma_b1', 'fop_s4'])
def test_a_faithful_arm_trains_and_reads_its_p(arm):
  """Issue 28's arms with their own keywords build, learn, and their diagnostics read their P.

  γ(t) with bound 1 applies no eigenvalue above 1 (its P clipped before the division), fop_s4
  none above 4 on the spatial P and 1 on the dense one. (The other arms are fop's own options,
  run at length on docs/results_faithful.md.)
  """
  params = {'conv': jax.random.normal(jax.random.key(0), (3, 3, 2, 4)) / 3,
            'dense': jax.random.normal(jax.random.key(1), (16, 8)) / 4}
  tx = common.make_optimizer(arm, 0.05, 0.9)
  state = tx.init(params)
  for k in range(4):
    g = jax.tree.map(lambda p: jnp.sin((k + 1) * p) + 0.1 * k, params)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  spectra = fop_optax.diagnostics.spectra(state, params, **common.fop_arm_rule(arm))
  top = {k: float(v[0]) for k, v in spectra.items() if v is not None}
  assert top, spectra
  if arm in ('fop_b1', 'fop_gamma_b1', 'fop_norm_paper'):
    assert max(top.values()) <= 1 + 1e-5, top
  if arm == 'fop_s4':
    assert top['dense'] <= 1 + 1e-5 and top['conv'] <= 4 + 1e-5, top
