"""Demo: a small CNN on scikit-learn's digits, FOP+momentum vs momentum.

    python3 examples/demo.py            # ~1 minute on 2 CPU cores

Trains the same network from the same initialisation and batch order twice, once with
``optax.sgd(lr, momentum)`` and once with ``fop_optax.fop(lr, momentum)``, prints the loss and
accuracy per epoch side by side and saves the learning curves to ``results/demo.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

if __package__:  # imported as examples.demo (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/demo.py has examples/ on sys.path
  import common  # noqa: E402

RUNS = ('momentum', 'fop')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch')
  parser.add_argument('--out', default='results', help='folder for demo.png and demo.json')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)

  data = common.load_dataset('digits')
  model_fn = common.make_model('cnn', data[0].shape[1:])
  print(f'digits: {len(data[0])} train / {len(data[2])} test, CNN, lr={args.lr}, '
        f'momentum={args.momentum}, batch {args.batch_size}, {args.epochs} epochs, '
        f'FOP hyper lr {common.FOP_HYPER_LR}')
  results = {}
  for name in RUNS:
    start = time.perf_counter()
    results[name] = common.train(
        model_fn, common.OPTIMIZERS[name](args.lr, args.momentum), data, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
        max_steps=args.max_steps, desc=common.LABELS[name])
    results[name]['total_time'] = time.perf_counter() - start

  headers = ['epoch'] + [f'{common.LABELS[n]} {k}' for n in RUNS
                         for k in ('train loss', 'test loss', 'test acc')]
  rows = [[e + 1] + [f'{results[n][k][e]:.4f}' for n in RUNS
                     for k in ('train_loss', 'test_loss', 'test_accuracy')]
          for e in range(args.epochs)]
  common.print_table(rows, headers)
  for n in RUNS:
    print(f'{common.LABELS[n]}: {results[n]["total_time"]:.1f} s in all (with compilation)')

  os.makedirs(args.out, exist_ok=True)
  epochs = range(1, args.epochs + 1)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for n in RUNS:
    axes[0].plot(epochs, results[n]['train_loss'], marker='o', label=common.LABELS[n])
    axes[1].plot(epochs, results[n]['test_accuracy'], marker='o', label=common.LABELS[n])
  axes[0].set(xlabel='epoch', ylabel='train loss (epoch mean)', yscale='log')
  axes[1].set(xlabel='epoch', ylabel='test accuracy')
  axes[1].legend()
  fig.suptitle(f'digits CNN, lr {args.lr}, momentum {args.momentum}')
  fig.tight_layout()
  png = os.path.join(args.out, 'demo.png')
  fig.savefig(png, dpi=100)
  plt.close(fig)
  common.save_json({'args': vars(args), 'fop_hyper_lr': common.FOP_HYPER_LR, 'runs': results},
                   os.path.join(args.out, 'demo.json'))
  print(f'saved {png}')
  return results


if __name__ == '__main__':
  main()
