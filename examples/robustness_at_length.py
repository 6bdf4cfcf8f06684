"""The paper's Figure 3 (robustness to learning rate and momentum) at the paper's training length.

Each (learning rate, momentum) cell is one :mod:`paper_length` run of momentum and FOP+momentum
(same seeds, init and data order, so the gain is paired), in ``<out>/lr<LR>_m<MOM>``; a cell that
finished before is read back, a stopped one resumes from its checkpoints. Prints per cell the
final test accuracy of both (mean over seeds), FOP's gain [min–max over seeds], the cells where a
run ended non-finite, and the smallest mean eigenvalue of FOP's ``P`` at the end (did ``P`` move);
``--plot`` draws the two heatmaps of :mod:`robustness_grid`.

The run behind docs/results_paper_length.md (MLP, 1 seed, the paper's grid hyper lr 5e-4)::

  python3 examples/robustness_at_length.py --model mlp --seeds 1 --lrs 0.05,0.2,0.5 \
      --momenta 0.9,0.99 --out results/robustness_at_length_mlp \
      --plot docs/img/robustness_at_length_mlp.png
  python3 examples/robustness_at_length.py --steps 0 ...   # the same, reading finished cells only

Anything after ``--`` goes to ``paper_length.py`` unchanged (e.g. ``-- --subset 512 --quiet``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

if __package__:  # imported as examples.robustness_at_length (tests, benchmarks)
  from examples import budget_study, paper_length, robustness_grid
else:  # run as a script: python3 examples/robustness_at_length.py has examples/ on sys.path
  import budget_study, paper_length, robustness_grid  # noqa: E402

NAMES = ('momentum', 'fop')


def cell_dir(out: str, lr: float, momentum: float) -> str:
  return os.path.join(out, f'lr{lr:g}_m{momentum:g}')


def _final(path: str, name: str):
  """One run's record, reduced: final test accuracy per seed ('acc') and FOP's smallest mean
  eig(P) at the end (None for momentum), both read by budget_study's reader, whether every
  seed's last train loss is finite, 'done' and 'step'; None when the run has no evaluation yet."""
  file = os.path.join(path, f'{name}.json')
  if not os.path.exists(file):
    return None
  with open(file) as f:
    if not json.load(f)['history']['seeds'][0]['test_accuracy']:
      return None
  rec, acc, mean_eig = budget_study._final(path, name)
  loss = np.array([h['train_loss'][-1] for h in rec['history']['seeds']], np.float64)
  return {'acc': acc, 'finite': bool(np.all(np.isfinite(loss))), 'mean_eig': mean_eig,
          'done': bool(rec['done']), 'step': rec['step']}


def collect(out: str, lrs, momenta) -> list[dict]:
  """One row per cell whose two runs both have a record (finished or not: see 'done')."""
  rows = []
  for mom in momenta:
    for lr in lrs:
      runs = {n: _final(cell_dir(out, lr, mom), n) for n in NAMES}
      if any(r is None for r in runs.values()):
        continue
      gain = runs['fop']['acc'] - runs['momentum']['acc']
      rows.append(dict(lr=lr, momentum=mom, base=runs['momentum']['acc'].mean(),
                       fop=runs['fop']['acc'].mean(), gain=gain.mean(), gain_min=gain.min(),
                       gain_max=gain.max(), seeds=len(gain),
                       finite={n: r['finite'] for n, r in runs.items()},
                       mean_eig=runs['fop']['mean_eig'],
                       done=all(r['done'] for r in runs.values()),
                       step=min(r['step'] for r in runs.values())))
  return rows


def table(rows: list[dict]) -> str:
  lines = ['| lr | momentum | momentum acc | FOP acc | gain (FOP − momentum) [min–max over seeds] '
           '| non-finite at the end | smallest mean eig(P) end | steps |', '|' + '---|' * 8]
  for r in rows:
    bad = ', '.join(n for n in NAMES if not r['finite'][n]) or '–'
    eig = '–' if r['mean_eig'] is None else f"{r['mean_eig']:.4f}"
    steps = f"{r['step']}" + ('' if r['done'] else ' (unfinished)')
    lines.append(f"| {r['lr']:g} | {r['momentum']:g} | {r['base']:.4f} | {r['fop']:.4f} | "
                 f"{100 * r['gain']:+.2f} pts [{100 * r['gain_min']:+.2f}, "
                 f"{100 * r['gain_max']:+.2f}] | {bad} | {eig} | {steps} |")
  return '\n'.join(lines)


def plot(rows: list[dict], lrs, momenta, title: str, path: str) -> None:
  """robustness_grid's two heatmaps; cells without both runs are left blank (NaN)."""
  acc = {n: np.full((len(momenta), len(lrs)), math.nan) for n in NAMES}
  for r in rows:
    i, j = list(momenta).index(r['momentum']), list(lrs).index(r['lr'])
    acc['momentum'][i, j], acc['fop'][i, j] = r['base'], r['fop']
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  robustness_grid.plot_grid(acc, lrs, momenta, title, path)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough = argv[argv.index('--') + 1:] if '--' in argv else []
  argv = argv[:argv.index('--')] if '--' in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='mlp', choices=('mlp', 'cnn'))
  parser.add_argument('--seeds', default='1', help="paper_length's --seeds")
  parser.add_argument('--steps', type=int, default=58000,
                      help='0: run nothing, read the cells that have records')
  parser.add_argument('--lrs', type=robustness_grid._floats, default=[0.05, 0.2, 0.5])
  parser.add_argument('--momenta', type=robustness_grid._floats, default=[0.9, 0.99])
  parser.add_argument('--hyper-lr', type=float, default=robustness_grid.GRID_HYPER_LR,
                      help="FOP's hyper learning rate (the paper's grid used 5e-4)")
  parser.add_argument('--out', default='results/robustness_at_length_mlp')
  parser.add_argument('--plot', default=None, help='save the two heatmaps here (PNG)')
  args = parser.parse_args(argv)
  if args.steps:
    for mom in args.momenta:
      for lr in args.lrs:
        print(f'== cell lr {lr:g} momentum {mom:g}', flush=True)
        paper_length.main(['--model', args.model, '--seeds', args.seeds, '--steps',
                           str(args.steps), '--lr', str(lr), '--momentum', str(mom),
                           '--hyper-lr', str(args.hyper_lr), '--optimizers', ','.join(NAMES),
                           '--out', cell_dir(args.out, lr, mom), *passthrough])
  rows = collect(args.out, args.lrs, args.momenta)
  print(table(rows))
  if args.plot:
    steps = max((r['step'] for r in rows), default=args.steps)
    plot(rows, args.lrs, args.momenta,
         f'{args.model.upper()}, {steps} steps, FOP hyper lr {args.hyper_lr:g}', args.plot)
  return rows


if __name__ == '__main__':
  main()
