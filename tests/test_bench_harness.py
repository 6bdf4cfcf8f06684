"""benchmarks/_harness.py: round-robin order, per-round ratios, spreads, --quick and the JSON."""

import json
import os

from benchmarks import _harness as H


class FakeClock:
  """A clock that only moves when a fake runner 'works' (``tick``)."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now

  def runner(self, log, name, costs):
    """A runner taking ``costs[round]`` seconds per call in each round, logging its calls."""
    def run():
      log.append(name)
      self.now += costs[sum(1 for n in log if n == name) - 1]
    return run


def test_round_order_rotates_so_each_variant_leads_in_turn():
  assert [H.round_order('abc', r) for r in range(4)] == [
      ['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'], ['a', 'b', 'c']]


def test_interleaved_runs_round_robin_and_times_each_call():
  clock, log = FakeClock(), []
  # One call per round (inner=1): a costs 1, 2, 4 s in rounds 0-2 (the machine slows down);
  # b always twice a's cost of the same round.
  runners = {'a': clock.runner(log, 'a', [1.0, 2.0, 4.0]),
             'b': clock.runner(log, 'b', [2.0, 4.0, 8.0])}
  times = H.interleaved(runners, rounds=3, clock=clock)
  assert log == ['a', 'b', 'b', 'a', 'a', 'b']   # rotated every round
  assert times == {'a': [1.0, 2.0, 4.0], 'b': [2.0, 4.0, 8.0]}
  # Ratios within a round are exact although the rounds' speeds differ 4x.
  assert H.ratios(times, 'a') == {'a': [1.0, 1.0, 1.0], 'b': [2.0, 2.0, 2.0]}
  summary = H.summarize(times, ref='a')
  assert summary['b']['ratio'] == dict(median=2.0, q1=2.0, q3=2.0, min=2.0, max=2.0, n=3)
  assert summary['b']['time']['median'] == 4.0 and summary['b']['time']['max'] == 8.0


def test_per_round_ratios_are_immune_to_a_slow_round():
  # One round 10x slower for everything: per-round ratios stay 1.5; times' min-max spread does not.
  times = {'ref': [1.0, 10.0, 1.0], 'x': [1.5, 15.0, 1.5]}
  assert H.ratios(times, 'ref')['x'] == [1.5, 1.5, 1.5]
  assert H.summarize(times, 'ref')['x']['time']['max'] == 15.0


def test_inner_calls_are_averaged_and_several_clocks_read():
  clock, log = FakeClock(), []
  cpu = FakeClock()
  runners = {'a': clock.runner(log, 'a', [1.0, 3.0, 5.0, 7.0])}
  out = H.interleaved_clocks(runners, rounds=2, inner=2, clocks={'wall': clock, 'cpu': cpu})
  assert out['wall'] == {'a': [2.0, 6.0]}   # (1 + 3) / 2, (5 + 7) / 2
  assert out['cpu'] == {'a': [0.0, 0.0]}


def test_spread_median_iqr_min_max():
  s = H.spread([5.0, 1.0, 3.0, 2.0, 4.0])
  assert (s['median'], s['q1'], s['q3'], s['min'], s['max'], s['n']) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
  assert H.spread([7.0]) == dict(median=7.0, q1=7.0, q3=7.0, min=7.0, max=7.0, n=1)
  assert H.fmt_spread(s, '.1f') == '3.0 [1.0-5.0]'


def test_parser_common_options_and_quick():
  p = H.parser('x', name='demo_bench', rounds=9)
  p.add_argument('--inner', type=int, default=5)
  args = p.parse_args([])
  assert (args.rounds, args.out, args.quick) == (9, os.path.join('results', 'demo_bench.json'), False)
  assert p.parse_args(['--reps', '3']).rounds == 3   # the old name still works
  quick = H.apply_quick(p.parse_args(['--quick']), p, rounds=2, inner=1)
  assert (quick.rounds, quick.inner, quick.out) == (2, 1, os.path.join('results', 'demo_bench_quick.json'))
  # Options given on the command line win over --quick's settings; so does --out.
  mixed = H.apply_quick(p.parse_args(['--quick', '--rounds', '4', '--out', 'o.json']), p,
                        rounds=2, inner=1)
  assert (mixed.rounds, mixed.inner, mixed.out) == (4, 1, 'o.json')
  assert not hasattr(H.parser('x', name='y').parse_args([]), 'rounds')


def test_json_has_the_metadata(tmp_path, capsys):
  p = H.parser('x', name='demo_bench', rounds=3)
  args = p.parse_args(['--rounds', '3'])
  meta = H.metadata(args, argv=['--rounds', '3'], module='benchmarks.demo_bench', t0=0.0, extra=1)
  path = H.write_json(str(tmp_path / 'sub' / 'r.json'), meta, rows=[{'a': 1}])
  assert 'saved' in capsys.readouterr().out
  saved = json.loads(open(path).read())
  assert saved['rows'] == [{'a': 1}]
  m = saved['meta']
  for key in ('command', 'date', 'git', 'jax', 'jaxlib', 'optax', 'python', 'platform', 'cpus',
              'openblas_num_threads', 'args', 'seconds'):
    assert key in m, key
  assert m['command'].endswith('-m benchmarks.demo_bench --rounds 3')
  assert m['args']['rounds'] == 3 and m['extra'] == 1 and m['cpus'] == os.cpu_count()
  assert m['openblas_num_threads'] == os.environ.get('OPENBLAS_NUM_THREADS')
  assert m['date'].endswith('+00:00')
  if m['git']['commit'] is not None:
    assert len(m['git']['commit']) == 40


def test_benchmarks_and_examples_never_edit_the_import_path():
  root = os.path.dirname(os.path.dirname(os.path.abspath(H.__file__)))
  found = []
  for folder in ('benchmarks', 'examples'):
    for name in sorted(os.listdir(os.path.join(root, folder))):
      if name.endswith('.py'):
        src = open(os.path.join(root, folder, name)).read()
        found += [f'{folder}/{name}' for verb in ('insert', 'append') if f'sys.path.{verb}(' in src]
  assert not found, found
