"""Demo: a small CNN on scikit-learn's digits, FOP+momentum vs momentum.

    python3 examples/demo.py            # ~1-2 minutes on 2 CPU cores (3 seeds)

Trains the same network from the same initialisation and batch order with
``optax.sgd(lr, momentum)`` and with ``fop_optax.fop(lr, momentum)``, once per seed (seed ``s``
initialises the model and orders the batches of both optimisers alike, so the runs are paired),
prints the loss and accuracy per epoch (means over the seeds) side by side, saves the learning
curves to ``results/demo.png`` and ends with a one-line verdict computed from the final test
accuracies: which optimiser ended higher, by how much, and whether the paired difference is
larger than the seed-to-seed spread (its 95% Student-t interval excludes 0).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if __package__:  # imported as examples.demo (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/demo.py has examples/ on sys.path
  import common  # noqa: E402

RUNS = ('momentum', 'fop')


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
  x = np.asarray(values, dtype=float)
  return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def verdict(final: dict[str, Sequence[float]], a: str = 'fop', b: str = 'momentum',
            labels: dict[str, str] | None = None) -> str:
  """One line: who ended higher, by how much, against the seeds' spread.

  ``final[name][k]`` is optimiser ``name``'s final test accuracy (a fraction) on seed ``k``;
  seeds are paired (seed ``k`` gives both optimisers the same initialisation and batches). The
  paired difference ``a − b`` is reported in points (percentage points of accuracy) with its 95%
  Student-t interval; the difference counts as larger than the seeds' spread when that interval
  excludes 0 (one seed: no spread, so no such claim).

  Examples:
    >>> print(verdict({'fop': [0.95, 0.96, 0.97], 'momentum': [0.96, 0.97, 0.99]}))
    verdict: momentum ended higher by 1.3 points (FOP+momentum 0.960 ± 0.010, momentum 0.973 ± 0.015 over 3 seeds; paired difference FOP+momentum − momentum −1.3 points, 95% CI [−2.8, +0.1]); the difference is not larger than the seeds' spread (the interval includes 0)
  """
  from scipy import stats
  labels = labels or common.LABELS
  la, lb = labels.get(a, a), labels.get(b, b)
  xa, xb = np.asarray(final[a], dtype=float), np.asarray(final[b], dtype=float)
  if xa.shape != xb.shape or xa.ndim != 1 or len(xa) == 0:
    raise ValueError(f'need one final value per seed for both, got {len(xa)} and {len(xb)}')
  n = len(xa)
  (ma, sa), (mb, sb) = _mean_std(xa), _mean_std(xb)
  diff = 100 * (xa - xb)   # points
  md = float(diff.mean())
  if md > 0:
    lead = f'{la} ended higher by {md:.1f} points'
  elif md < 0:
    lead = f'{lb} ended higher by {-md:.1f} points'
  else:
    lead = 'both ended level'
  seeds = f'over {n} seed{"s" if n > 1 else ""}'
  means = f'{la} {ma:.3f} ± {sa:.3f}, {lb} {mb:.3f} ± {sb:.3f} {seeds}'

  def signed(v):
    return f'{v:+.1f}'.replace('-', '−')

  if n < 2:
    return (f'verdict: {lead} ({means}); one seed has no spread to compare the difference with '
            '(run with --seeds 3 or more)')
  half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
  lo, hi = md - half, md + half
  larger = lo > 0 or hi < 0
  return (f'verdict: {lead} ({means}; paired difference {la} − {lb} {signed(md)} points, '
          f'95% CI [{signed(lo)}, {signed(hi)}]); the difference is '
          + ('larger than the seeds\' spread (the interval excludes 0)' if larger else
             'not larger than the seeds\' spread (the interval includes 0)'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--seed', type=int, default=0, help='first seed')
  parser.add_argument('--seeds', type=int, default=3,
                      help='number of seeds (seed, seed+1, ...); the verdict needs at least 2')
  parser.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch')
  parser.add_argument('--out', default='results', help='folder for demo.png and demo.json')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error('--seeds must be >= 1')
  seeds = list(range(args.seed, args.seed + args.seeds))

  data = common.load_dataset('digits')
  model_fn = common.make_model('cnn', data[0].shape[1:])
  print(f'digits: {len(data[0])} train / {len(data[2])} test, CNN, lr={args.lr}, '
        f'momentum={args.momentum}, batch {args.batch_size}, {args.epochs} epochs, '
        f'seeds {seeds}, FOP hyper lr {common.FOP_HYPER_LR}')
  results = {}
  for name in RUNS:
    tx = common.OPTIMIZERS[name](args.lr, args.momentum)   # one tx: the seeds share its compilation
    results[name] = []
    for seed in seeds:
      start = time.perf_counter()
      run = common.train(
          model_fn, tx, data, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
          progress=not args.no_progress, max_steps=args.max_steps,
          desc=f'{common.LABELS[name]} seed {seed}')
      run['total_time'] = time.perf_counter() - start
      run['seed'] = seed
      results[name].append(run)

  def mean_curve(name, key):
    return np.mean([r[key] for r in results[name]], axis=0)

  headers = ['epoch'] + [f'{common.LABELS[n]} {k}' for n in RUNS
                         for k in ('train loss', 'test loss', 'test acc')]
  curves = {(n, k): mean_curve(n, k) for n in RUNS
            for k in ('train_loss', 'test_loss', 'test_accuracy')}
  rows = [[e + 1] + [f'{curves[n, k][e]:.4f}' for n in RUNS
                     for k in ('train_loss', 'test_loss', 'test_accuracy')]
          for e in range(args.epochs)]
  print(f'means over {len(seeds)} seed(s):')
  common.print_table(rows, headers)
  final = {n: [r['test_accuracy'][-1] for r in results[n]] for n in RUNS}
  common.print_table([[s] + [f'{final[n][k]:.4f}' for n in RUNS] for k, s in enumerate(seeds)],
                     ['seed'] + [f'{common.LABELS[n]} final test acc' for n in RUNS])
  for n in RUNS:
    print(f'{common.LABELS[n]}: {sum(r["total_time"] for r in results[n]):.1f} s in all '
          '(with compilation)')

  os.makedirs(args.out, exist_ok=True)
  epochs = range(1, args.epochs + 1)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for n in RUNS:
    for ax, key in zip(axes, ('train_loss', 'test_accuracy')):
      line, = ax.plot(epochs, curves[n, key], marker='o',
                      label=f'{common.LABELS[n]} (mean of {len(seeds)})')
      for r in results[n]:
        ax.plot(epochs, r[key], color=line.get_color(), alpha=0.25, lw=1)
  axes[0].set(xlabel='epoch', ylabel='train loss (epoch mean)', yscale='log')
  axes[1].set(xlabel='epoch', ylabel='test accuracy')
  axes[1].legend()
  fig.suptitle(f'digits CNN, lr {args.lr}, momentum {args.momentum}, seeds {seeds}')
  fig.tight_layout()
  png = os.path.join(args.out, 'demo.png')
  fig.savefig(png, dpi=100)
  plt.close(fig)
  line = verdict(final)
  common.save_json({'args': vars(args), 'fop_hyper_lr': common.FOP_HYPER_LR, 'seeds': seeds,
                    'runs': results, 'final_test_accuracy': final, 'verdict': line},
                   os.path.join(args.out, 'demo.json'))
  print(f'saved {png}')
  print(line)
  return results


if __name__ == '__main__':
  main()
