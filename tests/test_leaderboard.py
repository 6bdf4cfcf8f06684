"""benchmarks/leaderboard.py: the registry covers every optimiser fop_optax exports, and
``--smoke`` runs every entry on every task (finite metrics, or an explicit skip reason)."""

import inspect
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax

leaderboard = pytest.importorskip('benchmarks.leaderboard')

# Exported callables that are building blocks, not optimisers a user would pick: the
# transformations behind the aliases (scale_by_*), the guard every alias already wraps, and
# helpers. Anything else exported must be a leaderboard entry.
NOT_OPTIMISERS = {'skip_nonfinite', 'resolve_structures', 'lodo_preconditioner',
                  'scale_by_learned_preconditioner', 'describe', 'einsum_dimensions',
                  'structures_for'}


def exported_optimisers():
  names = set()
  for name in fop_optax.__all__:
    obj = getattr(fop_optax, name)
    if inspect.ismodule(obj) or inspect.isclass(obj) or not callable(obj):
      continue
    if name.startswith('scale_by_') or name in NOT_OPTIMISERS:
      continue
    names.add(name)
  return names


def test_registry_covers_every_exported_optimiser():
  covered = {c for e in leaderboard.ENTRIES.values() for c in e.covers}
  missing = exported_optimisers() - covered
  assert not missing, f'fop_optax exports optimisers with no leaderboard entry: {missing}'
  assert {'fop', 'fop_adam', 'sgd_hd', 'adam_hd', 'lodo', 'adam_qlr', 'series_sfn',
          'one_pass_hpo', 'one_pass_hpo_injected'} <= exported_optimisers()
  # and the peers the issue names
  assert {'momentum', 'adam', 'muon', 'psgd_kron', 'kfac', 'shampoo'} <= set(leaderboard.ENTRIES)
  for e in leaderboard.ENTRIES.values():
    assert e.drive in ('grad', 'curvature', 'hpo', 'kfac'), e
    for kind in ('classify', 'ppo'):
      if e.grid[kind] and e.default[kind] is not None:
        assert e.default[kind] in e.grid[kind], (e.name, kind)


def _two_steps(entry, value):
  """The updates of two steps of ``entry`` at ``value`` on a tiny softmax regression, driven
  as ``run_classify`` drives it (the extra arguments of its ``drive``)."""
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jnp.arange(16) % 3
  params = {'w': 0.1 * jax.random.normal(jax.random.key(1), (5, 3)), 'b': jnp.zeros(3)}
  apply = lambda p: x @ p['w'] + p['b']
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  loss_fn = lambda p: ce(apply(p))
  tx = optax.with_extra_args_support(entry.make(value, 'mlp'))
  state = tx.init(params)
  out = []
  for _ in range(2):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    extra = {'grad': {},
             'curvature': dict(value=loss, grad=grads, value_fn=loss_fn, model_fn=apply,
                               loss_fn=ce),
             'hpo': dict(value_fn=loss_fn, validation_value_fn=loss_fn)}[entry.drive]
    updates, state = tx.update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


@pytest.mark.parametrize('name', [n for n, e in leaderboard.ENTRIES.items()
                                  if e.drive != 'kfac' and e.grid['classify']])
def test_every_swept_value_changes_the_optimiser(name):
  """A sweep over a hyperparameter the optimiser ignores is no sweep: series SFN's
  learning_rate (ignored by its default adaptive step) once gave a run identical to the default's."""
  entry = leaderboard.ENTRIES[name]
  reason = leaderboard.skip_reason(entry, 'mlp')
  if reason:
    pytest.skip(reason)
  default = entry.default['classify']
  # One other value is enough: a knob the optimiser ignores gives the same updates at every value.
  value = min((v for v in entry.grid['classify'] if v != default), key=lambda v: abs(v - default))
  base, other = _two_steps(entry, default), _two_steps(entry, value)
  differs = any(not np.allclose(a, b, rtol=1e-6, atol=0)
                for u, v in zip(base, other) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)))
  assert differs, f'{name}: {entry.sweep} = {value} gives the same updates as {default}'


# The MLP smoke (~50 s on 2 cores) runs in CI; CNN (~2 min), PPO (~1.5 min) and the LM (~1.5
# min) would push the suite past its ~15 min budget: FOP_LEADERBOARD_SMOKE=all runs them too
# (test_lm_smoke below runs two LM entries in CI).
ALL_SMOKE = os.environ.get('FOP_LEADERBOARD_SMOKE') == 'all'


@pytest.mark.slow
@pytest.mark.parametrize('task', leaderboard.TASKS)
def test_smoke_every_entry(task, tmp_path):
  if task != 'mlp' and not ALL_SMOKE:
    pytest.skip('CNN, PPO and LM smoke: FOP_LEADERBOARD_SMOKE=all (minutes on 2 cores)')
  if task in ('mlp', 'cnn'):
    from examples.common import FASHION_MNIST_DIR
    if not os.path.isdir(FASHION_MNIST_DIR):
      pytest.skip('Fashion-MNIST not installed')
  else:
    pytest.importorskip('gymnax')
  out = leaderboard.main(['--smoke', '--tasks', task, '--out', str(tmp_path / 'lb.json'),
                          '--markdown', '--plot', str(tmp_path / 'lb.png')])
  rows = {r['entry']: r for r in out['board']}
  assert set(rows) == set(leaderboard.ENTRIES)
  for name, r in rows.items():
    if r['status'] == 'skipped':
      assert r['reason'], name
      continue
    assert r['status'] == 'works', (name, r['reason'])
    final = r['default']['final']
    assert final is not None and math.isfinite(final['median']), (name, r)
    assert r['default']['ms_per_step'] is not None
  # Only entries that cannot run here are skipped: the gradient-driven ones run everywhere.
  for name in ('momentum', 'adam', 'fop', 'fop_adam', 'shd', 'lodo', 'muon'):
    assert rows[name]['status'] == 'works', name
  if task != 'ppo':
    for name in ('adam_qlr', 'series_sfn') + (('one_pass_hpo', 'one_pass_adam')
                                              if task != 'lm' else ()):
      assert rows[name]['status'] == 'works', name
  assert out['meta']['command'] and os.path.isfile(tmp_path / 'lb.json')
  assert os.path.isfile(tmp_path / 'lb.png')
  again = leaderboard.main(['--from-json', str(tmp_path / 'lb.json'), '--markdown'])
  assert [r['status'] for r in again['board']] == [r['status'] for r in out['board']]


def test_best_value_is_the_highest_median_final():
  runs = []
  for value, finals in ((0.05, [0.80, 0.82, 0.81]), (0.5, [0.84, 0.83, 0.30]),
                        (0.005, [0.70, 0.71, 0.72])):
    for seed, f in enumerate(finals):
      runs.append(dict(task='mlp', entry='momentum', value=value, seed=seed, final=f,
                       target_step=100 if f > 0.8 else None, target_wall_s=1.0 if f > 0.8 else
                       None, ms_per_step=1.0, error=None, history=[]))
  (row,) = leaderboard.board(runs, {}, ['momentum'])
  assert row['default']['value'] == 0.05 and row['best']['value'] == 0.5
  assert row['best']['final']['median'] == pytest.approx(0.83)
  assert row['default']['target_step']['median'] == 100
  assert row['best']['reached'] == 2   # 2 of 3 seeds: the median is still given
  # Mean ± std (population) over the seeds, for the closing notes' headline numbers.
  final = row['best']['final']
  assert final['mean'] == pytest.approx((0.84 + 0.83 + 0.30) / 3)
  assert final['std'] == pytest.approx(math.sqrt(sum(
      (x - final['mean']) ** 2 for x in (0.84, 0.83, 0.30)) / 3))
  assert final['n'] == 3
  table = leaderboard.mean_std(leaderboard.board(runs, {}, ['momentum']))
  assert '| momentum | 0.05 | 0.810 ± 0.008 (n = 3) | 0.5 | 0.657 ± 0.252 (n = 3) |' in table


def test_a_value_whose_seeds_diverge_is_not_the_best():
  """A diverged run (loss non-finite: no final metric) counts as a failure: K-FAC at a fixed
  rate once 'won' the sweep with one surviving seed of three, its diverged seeds dropped."""
  runs = []
  for value, finals in ((0.01, [0.73, 0.70, 0.75]), (0.1, [None, None, 0.754]),
                        (1.0, [None, None, None])):
    for seed, f in enumerate(finals):
      runs.append(dict(task='mlp', entry='momentum', value=value, seed=seed, final=f,
                       target_step=None, target_wall_s=None, ms_per_step=1.0, error=None,
                       stopped_at=None, history=[]))
  # A run stopped by --run-time-limit has no final metric either, but did not diverge.
  runs.append(dict(task='mlp', entry='momentum', value=0.05, seed=0, final=None,
                   target_step=None, target_wall_s=None, ms_per_step=1.0, error=None,
                   stopped_at=300, history=[]))
  (row,) = leaderboard.board(runs, {}, ['momentum'])
  assert row['best']['value'] == 0.01 and row['best']['diverged'] == 0
  by_value = {r['value']: r for r in leaderboard.summarize_runs(runs)}
  assert by_value[0.1]['diverged'] == 2 and by_value[1.0]['diverged'] == 3
  assert by_value[0.05]['diverged'] == 0
  assert leaderboard._cells(by_value[0.1])[2] == '0.754 [2/3 diverged]'


def test_resume_runs_only_what_the_partial_file_lacks(tmp_path, monkeypatch):
  """Every finished run is appended to OUT.partial.jsonl; ``--resume`` keeps those and runs the
  rest of the plan; entries resumed but left out of this call's --entries stay on the board."""
  calls = []

  def fake_run_one(task, entry, value, seed, args):
    calls.append((entry.name, value, seed))
    return dict(task=task, entry=entry.name, value=value, seed=seed, final=0.5 + seed / 10,
                target_step=None, target_wall_s=None, ms_per_step=1.0, error=None, history=[],
                seconds_with_compile=0.0, loadavg_before=None)
  monkeypatch.setattr(leaderboard, 'run_one', fake_run_one)
  out = str(tmp_path / 'lb.json')
  base = ['--tasks', 'mlp', '--no-sweep', '--seeds', '2', '--out', out]
  leaderboard.main([*base, '--entries', 'momentum,fop'])
  assert calls == [('momentum', 0.05, 0), ('fop', 0.05, 0), ('momentum', 0.05, 1),
                   ('fop', 0.05, 1)]
  with open(out + '.partial.jsonl') as f:
    assert len(f.readlines()) == 4
  calls.clear()
  res = leaderboard.main([*base, '--seeds', '3', '--entries', 'momentum,adam', '--resume'])
  assert calls == [('adam', 0.001, 0), ('adam', 0.001, 1), ('momentum', 0.05, 2),
                   ('adam', 0.001, 2)]
  rows = {r['entry']: r for r in res['board']}
  assert set(rows) == {'momentum', 'adam', 'fop'} and rows['fop']['default']['seeds'] == 2
  assert rows['momentum']['default']['seeds'] == 3 and res['meta']['resumed_runs'] == 4
  calls.clear()
  leaderboard.main([*base, '--entries', 'momentum'])   # without --resume: starts afresh
  assert calls == [('momentum', 0.05, 0), ('momentum', 0.05, 1)]
  calls.clear()
  # --from-partial runs nothing: the board holds the partial file's runs and names the plan's
  # missing ones (here seed 2, which the fresh call above did not run).
  res = leaderboard.main([*base, '--seeds', '3', '--entries', 'momentum', '--from-partial',
                          '--markdown'])
  assert calls == [] and res['meta']['missing_runs'] == ['mlp/momentum/0.05/seed 2']
  assert res['board'][0]['default']['seeds'] == 2
  text = leaderboard.markdown(res['board'], res['meta'])
  assert "nothing run; 1 planned runs missing: mlp/momentum/0.05/seed 2" in text
  with pytest.raises(SystemExit, match='no partial file'):
    leaderboard.main(['--tasks', 'mlp', '--out', str(tmp_path / 'none.json'), '--from-partial'])


def test_lm_smoke(tmp_path):
  """Two LM entries for 3 steps (--smoke) on a tiny configuration of examples/lm.py's Transformer: finite
  train and validation losses in the history, the final metric is the last validation loss, and
  both entries start from the same initialisation and see the same batches (same first loss)."""
  out = leaderboard.main(['--smoke', '--tasks', 'lm', '--entries', 'momentum,fop',
                          '--out', str(tmp_path / 'lm.json'), '--markdown'])
  rows = {r['entry']: r for r in out['board']}
  assert set(rows) == {'momentum', 'fop'}
  firsts = []
  for run in out['runs']:
    assert run['error'] is None and run['steps'] == 3, run
    steps, walls, trains, valids = zip(*run['history'])
    assert steps == (1, 2, 3) and all(w > 0 for w in walls)
    assert all(math.isfinite(v) and 0 < v < 8 for v in trains + valids)
    assert run['final'] == valids[-1] and run['valid_windows'] == 16
    firsts.append(trains[0])   # the EMA's first value is the first step's loss
  assert firsts[0] == pytest.approx(firsts[1], rel=1e-6)
  for r in rows.values():
    assert r['status'] == 'works' and math.isfinite(r['default']['final']['median'])


def test_lm_ranks_lower_validation_loss_first():
  """The LM's final metric is a loss: the best swept value, the board order and the target (a
  loss at or below it) all go the other way from accuracy's."""
  runs = []
  for name, value, finals in (('momentum', 0.05, [2.10, 2.20, 2.15]),
                              ('momentum', 0.15, [1.90, 1.95, 1.92]),
                              ('adam', 0.001, [1.70, 1.75, 1.80])):
    for seed, f in enumerate(finals):
      runs.append(dict(task='lm', entry=name, value=value, seed=seed, final=f,
                       target_step=300 if f <= 2.0 else None, target_wall_s=None,
                       ms_per_step=1.0, error=None, history=[]))
  skips = {('lm', 'one_pass_hpo'): leaderboard.skip_reason(leaderboard.ENTRIES['one_pass_hpo'],
                                                            'lm')}
  assert 'n/a on lm' in skips[('lm', 'one_pass_hpo')]
  result = leaderboard.board(runs, skips, ['momentum', 'adam', 'one_pass_hpo'])
  rows = {r['entry']: r for r in result}
  assert rows['momentum']['default']['value'] == 0.05
  assert rows['momentum']['best']['value'] == 0.15   # the lower loss, not the higher
  assert rows['momentum']['best']['final']['median'] == pytest.approx(1.92)
  assert [r['entry'] for r in sorted(result, key=leaderboard._rank)] == [
      'adam', 'momentum', 'one_pass_hpo']
  # The same numbers as accuracies: the higher median is the best.
  acc = [dict(r, task='mlp') for r in runs]
  assert leaderboard.board(acc, {}, ['momentum'])[0]['best']['value'] == 0.05
  text = leaderboard.markdown(result, dict(
      command='x', jax='j', optax='o', args=dict(target={'lm': 2.0}, lm_valid_windows=256,
                                                 lm_seq=64)))
  assert 'target validation loss ≤ 2.0' in text
  assert text.index('| Adam |') < text.index('| momentum |')


def test_classifier_best_value_is_chosen_on_validation_and_reports_its_test_accuracy():
  """mlp/cnn: the sweep's best value is the one with the higher median *validation* accuracy
  (the held-out split), and the board reports that value's test accuracy, even where another
  value has the higher test accuracy."""
  runs = []
  for value, val, test in ((0.05, [0.86, 0.87, 0.85], [0.90, 0.91, 0.89]),
                           (0.15, [0.88, 0.89, 0.88], [0.84, 0.85, 0.83])):
    for seed, (v, t) in enumerate(zip(val, test)):
      runs.append(dict(task='mlp', entry='momentum', value=value, seed=seed, final=t,
                       final_val=v, target_step=None, target_wall_s=None, ms_per_step=1.0,
                       error=None, history=[]))
  (row,) = leaderboard.board(runs, {}, ['momentum'])
  assert row['best']['value'] == 0.15
  assert row['best']['final']['median'] == pytest.approx(0.84)
  assert row['best']['final_val']['median'] == pytest.approx(0.88)
  # Records without a validation metric (PPO, the LM, older boards) are chosen on the final one.
  old = [{k: v for k, v in r.items() if k != 'final_val'} for r in runs]
  assert leaderboard.board(old, {}, ['momentum'])[0]['best']['value'] == 0.05
