"""LODO on a ≈94k-parameter CNN on Fashion-MNIST, against momentum, Adam and FOP (CPU-sized).

The LODO paper's network experiment trains a ≈95k-parameter convolutional network (an MNIST
autoregression model) for 300k steps on a GPU. Here: a plain ≈94k-parameter CNN *classifier*
(not the paper's autoregressive model) on a Fashion-MNIST subset, for as many steps as 2 shared
CPU cores allow (LODO's network over all 94k parameters costs ~0.2-0.4 s a step there, see
``benchmarks/lodo_overhead.py``). Every optimiser trains the same model from the same
initialisation and batch order per seed.

* momentum: ``optax.sgd(0.05, momentum=0.9)``; Adam: ``optax.adam(1e-3)``;
* FOP: ``fop_optax.fop(0.05)`` (package defaults: spatial/full/low-rank per leaf, guard ``B = 1``);
* LODO: ``fop_optax.lodo(α, meta_lr)``; with ``α = 0.5`` its first steps equal momentum's
  (``α·EMA = 0.05·trace`` at β = 0.9). ``--lodo-lr``/``--lodo-meta-lr`` change them.

Run: ``python examples/lodo_fashion_mnist.py`` (10k/2k subset, batch 128, 4 epochs = 312 steps,
2 seeds: ~15 minutes on 2 CPU cores, mostly LODO); ``--quick``: 20 steps, 1 seed. Writes
``docs/img/lodo_fashion_mnist.png`` and ``results/lodo_fashion_mnist.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

if __package__:  # imported as examples.lodo_fashion_mnist (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/lodo_fashion_mnist.py has examples/ on sys.path
  import common  # noqa: E402
import fop_optax  # noqa: E402

LABELS = {'momentum': 'momentum', 'adam': 'Adam', 'fop': 'FOP + momentum', 'lodo': 'LODO'}
COLORS = {'momentum': 'k', 'adam': 'C1', 'fop': 'C0', 'lodo': 'C3'}


class SmallCNN(nnx.Module):
  """3×3 convs 1→32, 32→32 (stride 2), 32→64 (stride 2), 64→64, global average pool, dense
  64→384→10: 93,802 parameters."""

  def __init__(self, rngs: nnx.Rngs):
    self.convs = nnx.List([
        nnx.Conv(1, 32, (3, 3), rngs=rngs), nnx.Conv(32, 32, (3, 3), strides=2, rngs=rngs),
        nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs), nnx.Conv(64, 64, (3, 3), rngs=rngs)])
    self.hidden = nnx.Linear(64, 384, rngs=rngs)
    self.head = nnx.Linear(384, 10, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(nnx.relu(self.hidden(x.mean(axis=(1, 2)))))


def make(name: str, args) -> optax.GradientTransformation:
  if name == 'momentum':
    return optax.sgd(0.05, momentum=0.9)
  if name == 'adam':
    return optax.adam(1e-3)
  if name == 'fop':
    return fop_optax.fop(0.05)
  if name == 'lodo':
    return fop_optax.lodo(args.lodo_lr, args.lodo_meta_lr)
  raise ValueError(name)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--subset', type=int, default=10000)
  parser.add_argument('--test-subset', type=int, default=2000)
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch')
  parser.add_argument('--optimizers', default=','.join(LABELS))
  parser.add_argument('--lodo-lr', type=float, default=0.5)
  parser.add_argument('--lodo-meta-lr', type=float, default=1e-3)
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--quick', action='store_true', help='1 epoch of 20 steps, 1 seed')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--plot', default=os.path.join('docs', 'img', 'lodo_fashion_mnist.png'))
  parser.add_argument('--out', default=os.path.join('results', 'lodo_fashion_mnist.json'))
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.max_steps, args.seeds, args.test_subset = 1, 20, 1, 500
  data = common.subset(common.load_dataset('fashion_mnist', args.data_dir), args.subset,
                       args.test_subset)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(SmallCNN(nnx.Rngs(0)), nnx.Param)))
  print(f'SmallCNN: {n_params} parameters; {len(data[0])} train / {len(data[2])} test images',
        flush=True)
  t0 = time.perf_counter()
  runs = {}
  for name in args.optimizers.split(','):
    runs[name] = []
    for seed in range(args.seeds):
      h = common.train(lambda s: SmallCNN(nnx.Rngs(s)), make(name, args), data,
                       epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                       progress=not args.no_progress, max_steps=args.max_steps,
                       desc=f'{name} seed {seed}')
      runs[name].append({k: v for k, v in h.items() if k not in ('model', 'optimizer')})
      print(f'[{time.perf_counter() - t0:6.0f}s] {LABELS[name]:<15} seed {seed}: train loss '
            f'{h["train_loss"][-1]:.4f}, test accuracy {h["test_accuracy"][-1]:.4f}, '
            f'{np.mean(h["epoch_time"][1:] or h["epoch_time"]):.1f} s/epoch', flush=True)

  steps = (args.max_steps or len(data[0]) // args.batch_size)
  summary = {name: common.summarize(r) for name, r in runs.items()}
  rows = [[LABELS[n], f"{s['train_loss_mean']:.4f} ± {s['train_loss_std']:.4f}",
           f"{s['test_accuracy_mean']:.4f} ± {s['test_accuracy_std']:.4f}",
           f"{s['train_loss_auc_mean']:.4f}", f"{s['sec_per_epoch']:.1f}"]
          for n, s in summary.items()]
  print(f'\n{args.epochs} epochs × {steps} steps, batch {args.batch_size}, {args.seeds} seeds '
        '(mean ± std):')
  common.print_table(rows, ['optimiser', 'final train loss', 'test accuracy',
                            'mean train loss (all epochs)', 's/epoch'])

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  epochs = np.arange(1, args.epochs + 1)
  for name, rs in runs.items():
    for key, ax in (('train_loss', ax1), ('test_accuracy', ax2)):
      v = np.array([r[key] for r in rs])
      ax.plot(epochs, v.mean(0), 'o-', color=COLORS[name], label=LABELS[name])
      ax.fill_between(epochs, v.min(0), v.max(0), color=COLORS[name], alpha=0.2)
  ax1.set(xlabel='epoch', ylabel='train loss (epoch mean)', yscale='log')
  ax2.set(xlabel='epoch', ylabel='test accuracy')
  ax1.legend()
  fig.suptitle(f'Fashion-MNIST, {n_params}-parameter CNN, {len(data[0])} train images, '
               f'{args.seeds} seeds (CPU-sized)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.plot) or '.', exist_ok=True)
  fig.savefig(args.plot, dpi=110)
  common.save_json(dict(args=vars(args), n_params=n_params, summary=summary, runs=runs), args.out)
  print(f'saved {args.plot} and {args.out} ({time.perf_counter() - t0:.0f}s)')
  return summary


if __name__ == '__main__':
  main()
