"""Robustness to learning rate and momentum, with and without FOP (the paper's Figure 3 in small).

    python3 examples/robustness_grid.py                      # digits CNN, ~5 min on 2 cores
    python3 examples/robustness_grid.py --dataset fashion_mnist --model mlp --subset 10000

For every (learning rate, momentum) cell, trains the same model (same init and batch order)
with SGD+momentum and with FOP+momentum and records the final test accuracy (mean over seeds);
then sweeps Adam's learning rate with and without FOP. Writes into ``--out``: ``grid.png`` (two
heatmaps side by side), ``adam.png`` (accuracy against Adam's lr) and ``grid.json``.

Each optimiser family is built once with ``optax.inject_hyperparams`` and its learning rate and
momentum are set in the state, so the whole sweep compiles one train step per family.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

if __package__:  # imported as examples.robustness_grid (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/robustness_grid.py has examples/ on sys.path
  import common  # noqa: E402
import fop_optax  # noqa: E402

# The paper trained M with Adam at 5e-4 in its robustness grid (1e-4 on CIFAR-10's main run).
GRID_HYPER_LR = 5e-4


def _floats(text):
  return [float(v) for v in text.split(',') if v.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', choices=common.DATASETS, default='digits')
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--model', choices=('cnn', 'mlp'), default='cnn')
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--seeds', type=int, default=1, help='number of seeds (0..N-1)')
  parser.add_argument('--lrs', type=_floats, default=[0.003, 0.01, 0.03, 0.1, 0.3])
  parser.add_argument('--momenta', type=_floats, default=[0.0, 0.5, 0.9, 0.99])
  parser.add_argument('--adam-lrs', type=_floats, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                      help='empty string to skip the Adam sweep')
  parser.add_argument('--hyper-lr', type=float, default=GRID_HYPER_LR,
                      help="FOP's hyper learning rate (the paper's grid used 5e-4)")
  parser.add_argument('--subset', type=int, default=None, help='use N training examples')
  parser.add_argument('--test-subset', type=int, default=None, help='use N test examples')
  parser.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch')
  parser.add_argument('--out', default=None, help='default results/grid_<dataset>_<model>')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  args.out = args.out or os.path.join('results', f'grid_{args.dataset}_{args.model}')
  return args


def _families(hyper_lr):
  """One transformation per family; hyperparameters are overwritten per run (see module doc)."""
  inject = optax.inject_hyperparams
  static = ('hyper_learning_rate',)
  return {
      'momentum': inject(optax.sgd)(learning_rate=0.1, momentum=0.9),
      'fop': inject(fop_optax.fop, static_args=static)(
          learning_rate=0.1, momentum=0.9, hyper_learning_rate=hyper_lr),
      'adam': inject(optax.adam)(learning_rate=1e-3),
      'fop_adam': inject(fop_optax.fop_adam, static_args=static)(
          learning_rate=1e-3, hyper_learning_rate=hyper_lr),
  }


def plot_grid(acc, lrs, momenta, title, path):
  """Two heatmaps (momentum, FOP+momentum) of final test accuracy, sharing one colour scale."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, name in zip(axes, ('momentum', 'fop')):
    image = ax.imshow(acc[name], vmin=0, vmax=1, cmap='viridis', origin='lower', aspect='auto')
    for (i, j), value in np.ndenumerate(acc[name]):
      if np.isnan(value):   # a cell not run (yet)
        continue
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=8,
              color='white' if value < 0.6 else 'black')
    ax.set(xticks=range(len(lrs)), xticklabels=[f'{v:g}' for v in lrs], xlabel='learning rate',
           yticks=range(len(momenta)), yticklabels=[f'{v:g}' for v in momenta],
           title=common.LABELS[name])
  axes[0].set_ylabel('momentum')
  fig.colorbar(image, ax=axes, label='final test accuracy')
  fig.suptitle(title)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_adam(acc, lrs, title, path):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in ('adam', 'fop_adam'):
    ax.plot(lrs, acc[name], marker='o', label=common.LABELS[name])
  ax.set(xscale='log', xlabel='Adam learning rate', ylabel='final test accuracy', ylim=(0, 1),
         title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  data, model_fn = common.data_and_model(args)
  families = _families(args.hyper_lr)
  print(f'{args.dataset} {args.model}: {len(data[0])} train / {len(data[2])} test, '
        f'{args.epochs} epochs, batch {args.batch_size}, {args.seeds} seed(s), '
        f'FOP hyper lr {args.hyper_lr}', flush=True)

  def final_accuracy(name, **hyperparams):
    accs = [common.train(model_fn, families[name], data, epochs=args.epochs,
                         batch_size=args.batch_size, seed=seed, progress=not args.no_progress,
                         max_steps=args.max_steps, hyperparams=hyperparams,
                         desc=f'{name} {hyperparams}')['test_accuracy'][-1]
            for seed in range(args.seeds)]
    return float(np.mean(accs))

  start = time.perf_counter()
  grid = {n: np.zeros((len(args.momenta), len(args.lrs))) for n in ('momentum', 'fop')}
  rows = []
  for i, mom in enumerate(args.momenta):
    for j, lr in enumerate(args.lrs):
      for name in grid:
        grid[name][i, j] = final_accuracy(name, learning_rate=lr, momentum=mom)
      rows.append([f'{lr:g}', f'{mom:g}', f'{grid["momentum"][i, j]:.4f}',
                   f'{grid["fop"][i, j]:.4f}', f'{grid["fop"][i, j] - grid["momentum"][i, j]:+.4f}'])
      print(f'  lr {lr:g} momentum {mom:g}: momentum {grid["momentum"][i, j]:.4f}, '
            f'FOP {grid["fop"][i, j]:.4f}', flush=True)
  adam = {n: [final_accuracy(n, learning_rate=lr) for lr in args.adam_lrs]
          for n in ('adam', 'fop_adam')} if args.adam_lrs else {}
  total = time.perf_counter() - start

  print('\nFinal test accuracy, SGD with momentum vs FOP+momentum:')
  common.print_table(rows, ['lr', 'momentum', 'momentum', 'FOP+momentum', 'FOP − momentum'])
  if adam:
    print('\nFinal test accuracy, Adam learning-rate sweep:')
    common.print_table([[f'{lr:g}', f'{a:.4f}', f'{f:.4f}', f'{f - a:+.4f}']
                        for lr, a, f in zip(args.adam_lrs, adam['adam'], adam['fop_adam'])],
                       ['Adam lr', 'Adam', 'FOP+Adam', 'FOP − Adam'])
  print(f'total {total:.0f} s')

  os.makedirs(args.out, exist_ok=True)
  title = f'{args.dataset} {args.model.upper()}, {args.epochs} epochs, {args.seeds} seed(s)'
  plot_grid(grid, args.lrs, args.momenta, title, os.path.join(args.out, 'grid.png'))
  if adam:
    plot_adam(adam, args.adam_lrs, title, os.path.join(args.out, 'adam.png'))
  result = {'args': vars(args), 'total_seconds': total,
            'grid': {n: g.tolist() for n, g in grid.items()}, 'adam': adam}
  common.save_json(result, os.path.join(args.out, 'grid.json'))
  print(f'saved {args.out}/grid.png{", adam.png" if adam else ""}, grid.json')
  return result


if __name__ == '__main__':
  main()
