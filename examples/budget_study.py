"""How FOP's effect depends on the budget: its gain over momentum against steps × hyper learning rate.

Reads the runs of :mod:`paper_length` laid out as ``<root>/steps<S>`` (momentum) and
``<root>/steps<S>_h<H>`` (FOP with hyper learning rate ``H``), all on the same model, seeds and
protocol (the decay at 80/150 of each run's own length), and prints, per (S, H), FOP's final
test accuracy minus momentum's (mean over seeds, with the seeds' spread), the smallest mean
eigenvalue of ``P`` at the end (how far ``P`` left the identity), and ``S × H``. ``--plot``
draws the gain against ``S × H``, one line per run length.

The runs behind docs/results_paper_length.md (MLP, 2 seeds; each line one command)::

  for S in 2340 9360; do
    python3 examples/paper_length.py --model mlp --seeds 2 --steps $S --optimizers momentum --out results/budget/steps$S
    for H in 1e-4 1e-3 1e-2; do
      python3 examples/paper_length.py --model mlp --seeds 2 --steps $S --hyper-lr $H --optimizers fop --out results/budget/steps${S}_h$H
    done
  done
  python3 examples/paper_length.py --model mlp --seeds 2 --steps 9360 --hyper-lr 1e-1 --optimizers fop --out results/budget/steps9360_h1e-1
  python3 examples/paper_length.py --model mlp --seeds 2 --steps 58000 --hyper-lr 1e-2 --optimizers fop --out results/budget/steps58000_h1e-2
  # the 58,000-step momentum and FOP (1e-4) runs are the paper-length ones:
  python3 examples/budget_study.py --root results/budget --extra results/paper_length_mlp --plot results/budget/gain.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import numpy as np


def _final(path: str, name: str):
  with open(os.path.join(path, f'{name}.json')) as f:
    rec = json.load(f)
  seeds = rec['history']['seeds']
  acc = np.array([h['test_accuracy'][-1] for h in seeds])
  mean_eig = None
  if 'lambda_mean' in seeds[0]:
    mean_eig = min(min(v[-1] for v in h['lambda_mean'].values()) for h in seeds)
  return rec, acc, mean_eig


def collect(root: str, extra: str | None = None) -> list[dict]:
  """One row per (steps, hyper lr) with a finished FOP run and a finished momentum run."""
  momentum, fops = {}, []
  for path in sorted(glob.glob(os.path.join(root, 'steps*'))):
    m = re.fullmatch(r'steps(\d+)(?:_h(.+))?', os.path.basename(path))
    if not m:
      continue
    steps, h = int(m.group(1)), m.group(2)
    name = 'momentum' if h is None else 'fop'
    if not os.path.exists(os.path.join(path, f'{name}.json')):
      continue
    if h is None:
      momentum[steps] = _final(path, name)
    else:
      fops.append((steps, float(h), path))
  if extra:   # a paper-length run directory: its momentum and FOP (default hyper lr) runs
    if os.path.exists(os.path.join(extra, 'momentum.json')):
      rec, acc, _ = _final(extra, 'momentum')
      momentum.setdefault(rec['config']['steps'], (rec, acc, None))
    if os.path.exists(os.path.join(extra, 'fop.json')):
      rec = _final(extra, 'fop')[0]
      fops.append((rec['config']['steps'], rec['config']['hyper_lr'], extra))
  rows = []
  for steps, h, path in sorted(fops):
    rec, acc, mean_eig = _final(path, 'fop')
    if steps not in momentum or not rec['done'] or not momentum[steps][0]['done']:
      continue
    base = momentum[steps][1]
    gain = acc - base   # same seeds, same data order: paired
    rows.append(dict(steps=steps, hyper_lr=h, budget=steps * h, fop=acc.mean(), momentum=base.mean(),
                     gain=gain.mean(), gain_min=gain.min(), gain_max=gain.max(),
                     mean_eig=mean_eig, seeds=len(acc)))
  return rows


def table(rows: list[dict]) -> str:
  lines = ['| steps | hyper lr | steps × hyper lr | momentum | FOP | gain (FOP − momentum) [min–max over seeds] '
           '| smallest mean eig(P) end |', '|' + '---|' * 7]
  for r in rows:
    lines.append(f"| {r['steps']} | {r['hyper_lr']:g} | {r['budget']:.3g} | {r['momentum']:.4f} | "
                 f"{r['fop']:.4f} | {100 * r['gain']:+.2f} pts [{100 * r['gain_min']:+.2f}, "
                 f"{100 * r['gain_max']:+.2f}] | {r['mean_eig']:.4f} |")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if __package__:  # imported as examples.<name>; as a script, examples/ is on sys.path
    from examples import common
  else:
    import common
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for steps in sorted({r['steps'] for r in rows}):
    rs = sorted((r for r in rows if r['steps'] == steps), key=lambda r: r['budget'])
    x = [r['budget'] for r in rs]
    ax.errorbar(x, [100 * r['gain'] for r in rs],
                yerr=[[100 * (r['gain'] - r['gain_min']) for r in rs],
                      [100 * (r['gain_max'] - r['gain']) for r in rs]],
                marker='o', capsize=3, label=f'{steps} steps')
  ax.axhline(0, color='k', lw=0.8)
  ax.set(xscale='log', xlabel='steps × hyper learning rate',
         ylabel='final test accuracy, FOP − momentum (points)',
         title='FOP vs momentum by budget (Fashion-MNIST MLP)')
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='results/budget')
  parser.add_argument('--extra', default=None, help='a paper_length output dir to include')
  parser.add_argument('--plot', default=None)
  args = parser.parse_args(argv)
  rows = collect(args.root, args.extra)
  print(table(rows))
  if args.plot:
    plot(rows, args.plot)
  return rows


if __name__ == '__main__':
  main()
