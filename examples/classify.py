"""Image classification with Flax NNX: FOP against the paper's baselines (its Figure 2 in small).

    python3 examples/classify.py                                   # digits CNN, ~5 min on 2 cores
    python3 examples/classify.py --dataset fashion_mnist --model mlp --epochs 3

Every optimiser trains the same model from the same initialisation and batch order for each seed
(seeds 0..N-1). Prints a table (final train loss and test accuracy as mean ± std over seeds,
the mean train loss over all epochs as a convergence-speed summary, wall seconds per epoch) and
writes into ``--out``: ``curves.png`` (mean ± std learning curves), ``results.json`` (arguments,
every run's curves, the summary), ``summary.csv`` and ``curves.csv``.
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

if __package__:  # imported as examples.classify (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/classify.py has examples/ on sys.path
  import common  # noqa: E402


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', choices=common.DATASETS, default='digits')
  parser.add_argument('--data-dir', default=None,
                      help=f'Fashion-MNIST idx .gz folder (default {common.FASHION_MNIST_DIR})')
  parser.add_argument('--model', choices=('cnn', 'mlp'), default='cnn')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--seeds', type=int, default=3, help='number of seeds (0..N-1)')
  parser.add_argument('--optimizers', default=','.join(common.LABELS),
                      help='comma list from: ' + ', '.join(common.LABELS))
  parser.add_argument('--lr', type=float, default=0.05,
                      help=f'SGD-family learning rate (Adam family uses {common.ADAM_LR})')
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--hyper-lr', type=float, default=common.FOP_HYPER_LR,
                      help="FOP's hyper learning rate (Adam on M)")
  parser.add_argument('--subset', type=int, default=None, help='use N training examples')
  parser.add_argument('--test-subset', type=int, default=None, help='use N test examples')
  parser.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch')
  parser.add_argument('--out', default=None, help='default results/classify_<dataset>_<model>')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  args.optimizers = [o.strip() for o in args.optimizers.split(',') if o.strip()]
  unknown = [o for o in args.optimizers if o not in common.LABELS]
  if unknown:
    parser.error(f'unknown optimizers {unknown}; choose from {", ".join(common.LABELS)}')
  args.out = args.out or os.path.join('results', f'classify_{args.dataset}_{args.model}')
  return args


def plot_curves(runs: dict, title: str, path: str) -> None:
  """Mean ± std over seeds of train loss and test accuracy per epoch, one line per optimiser."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, seed_runs in runs.items():
    for ax, key in zip(axes, ('train_loss', 'test_accuracy')):
      values = np.array([r[key] for r in seed_runs], dtype=float)
      epochs = np.arange(1, values.shape[1] + 1)
      mean, std = values.mean(0), values.std(0)
      ax.plot(epochs, mean, marker='.', label=common.LABELS[name])
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
  axes[0].set(xlabel='epoch', ylabel='train loss (epoch mean)', yscale='log')
  axes[1].set(xlabel='epoch', ylabel='test accuracy')
  axes[1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  data, model_fn = common.data_and_model(args)
  print(f'{args.dataset} {args.model}: {len(data[0])} train / {len(data[2])} test, '
        f'{args.epochs} epochs, batch {args.batch_size}, seeds 0..{args.seeds - 1}, '
        f'lr {args.lr}, momentum {args.momentum}, FOP hyper lr {args.hyper_lr}, '
        f'Adam lr {common.ADAM_LR}', flush=True)

  start = time.perf_counter()
  runs = {}
  for name in args.optimizers:
    runs[name] = []
    for seed in range(args.seeds):
      tx = common.make_optimizer(name, args.lr, args.momentum, args.hyper_lr)
      runs[name].append(common.train(
          model_fn, tx, data, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
          progress=not args.no_progress, max_steps=args.max_steps,
          desc=f'{common.LABELS[name]} seed {seed}'))
      run = runs[name][-1]
      print(f'  {common.LABELS[name]:>12} seed {seed}: train loss {run["train_loss"][-1]:.4f}, '
            f'test acc {run["test_accuracy"][-1]:.4f}', flush=True)
  total = time.perf_counter() - start

  summary = {name: common.summarize(r) for name, r in runs.items()}
  rows = [[common.LABELS[n], f'{s["train_loss_mean"]:.4f} ± {s["train_loss_std"]:.4f}',
           f'{s["train_loss_auc_mean"]:.4f} ± {s["train_loss_auc_std"]:.4f}',
           f'{s["test_accuracy_mean"]:.4f} ± {s["test_accuracy_std"]:.4f}',
           f'{s["sec_per_epoch"]:.2f}'] for n, s in summary.items()]
  common.print_table(rows, ['optimizer', 'final train loss', 'mean train loss (all epochs)',
                            'test accuracy', 's/epoch'])
  print(f'total {total:.0f} s')

  os.makedirs(args.out, exist_ok=True)
  title = (f'{args.dataset} {args.model.upper()}, lr {args.lr}, momentum {args.momentum}, '
           f'{args.seeds} seeds')
  plot_curves(runs, title, os.path.join(args.out, 'curves.png'))
  common.save_json({'args': vars(args), 'fop_hyper_lr': args.hyper_lr,
                    'hd_hyper_lr': common.HD_HYPER_LR, 'adam_lr': common.ADAM_LR,
                    'total_seconds': total, 'summary': summary, 'runs': runs},
                   os.path.join(args.out, 'results.json'))
  common.save_csv([{'optimizer': n, **s} for n, s in summary.items()],
                  os.path.join(args.out, 'summary.csv'))
  common.save_csv([{'optimizer': n, 'seed': seed, 'epoch': e + 1,
                    **{k: r[k][e] for k in ('train_loss', 'test_loss', 'test_accuracy',
                                            'epoch_time')}}
                   for n, seed_runs in runs.items() for seed, r in enumerate(seed_runs)
                   for e in range(args.epochs)],
                  os.path.join(args.out, 'curves.csv'))
  print(f'saved {args.out}/curves.png, results.json, summary.csv, curves.csv')
  return {'summary': summary, 'runs': runs, 'out': args.out}


if __name__ == '__main__':
  main()
