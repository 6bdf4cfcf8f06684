"""What FOP learns: the spatial preconditioners of a small CNN (the paper's Figure 5).

Trains ``common.CNN`` with FOP + momentum on digits (or Fashion-MNIST) and, at
``--snapshots`` evenly spaced steps, reads the learned ``P`` of every layer with
:mod:`fop_optax.diagnostics` (``preconditioner_matrices``, ``spectra``); every
step it records the angle between the gradient ``g`` and ``P·g``
(``rotation_angles``). Writes to ``--out``:

* ``learned_matrices.png``: each 3×3 conv's 9×9 ``P`` over training (rows:
  layers, columns: snapshots), and ``learned_centre.png``: the centre tap's row
  of ``P`` as a 3×3 stencil (how the centre tap's step mixes its neighbours'
  gradients; whitening looks like a positive centre with a negative cross);
* ``learned_histograms.png``: the final entries of each ``P`` (diagonal vs
  off-diagonal);
* ``learned_spectra.png``: sorted eigenvalues of every layer's ``P`` over
  training; ``learned_angles.png``: angle(g, P·g) per step;
* ``what_fop_learns.json``: settings, accuracy, and per layer the numbers the
  text summary prints.

The paper (trained on CIFAR-10 for 150 epochs) reports a whitening pattern in
the 3×3 matrices: positive diagonal, negative immediate neighbours. Since
``P = MᵀM`` is PSD its diagonal is always positive; the informative part is the
sign of the off-diagonal entries between taps that are 4-neighbours in the 3×3
window::

  python3 examples/what_fop_learns.py                       # digits, ~40 s on 2 cores
  python3 examples/what_fop_learns.py --dataset fashion_mnist --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# examples/common.py: data, models, evaluation
if __package__:  # imported as examples.what_fop_learns (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/what_fop_learns.py has examples/ on sys.path
  import common  # noqa: E402

import fop_optax  # noqa: E402
from fop_optax import diagnostics  # noqa: E402


def layer_name(path) -> str:
  """``('convs', 0, 'kernel', .value)`` -> ``'convs.0.kernel'``."""
  parts = []
  for key in path:
    for attr in ('key', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '.'.join(parts)


def named(tree, np_=True) -> dict:
  """Flattens a diagnostics tree to ``{layer name: array}`` (skipping ``None``)."""
  return {layer_name(p): np.asarray(v) if np_ else v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tap_masks(k: int = 3):
  """Boolean k²×k² masks: diagonal, 4-neighbour taps, diagonal-neighbour taps, the rest."""
  rows, cols = np.divmod(np.arange(k * k), k)
  dr = np.abs(rows[:, None] - rows[None, :])
  dc = np.abs(cols[:, None] - cols[None, :])
  return {'diagonal': (dr + dc) == 0, 'neighbour': (dr + dc) == 1,
          'corner': (dr == 1) & (dc == 1), 'far': np.maximum(dr, dc) == 2}


def pattern(p: np.ndarray) -> dict:
  """Mean of P's entries per tap relation, and whether P shows the whitening pattern."""
  stats = {name: float(p[mask].mean()) for name, mask in tap_masks(int(round(len(p) ** 0.5))).items()}
  stats['others'] = float(p[tap_masks()['corner'] | tap_masks()['far']].mean())
  stats['whitening'] = bool(stats['diagonal'] > 0 and stats['neighbour'] < 0)
  # |cos| between P's top eigenvector and the constant (all taps equal) direction: near 1
  # means P mostly rescales the step along the kernel's mean, not across neighbours.
  top = np.linalg.eigh(p)[1][:, -1]
  stats['top_eigvec_vs_constant'] = float(abs(top.sum()) / (np.sqrt(len(p)) * np.linalg.norm(top)))
  # Weaker, scale-free version: neighbours pushed below the other off-diagonal entries.
  stats['neighbours_below_others'] = bool(stats['neighbour'] < stats['others'])
  return stats


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', choices=common.DATASETS, default='digits')
  parser.add_argument('--data-dir', default=None, help='Fashion-MNIST idx files')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--momentum', type=float, default=0.9)
  # 10× the paper's 1e-4 (150 CIFAR-10 epochs): over our 440 steps 1e-4 moves P only a little
  # (top eigenvalue ~1.15); 1e-3 makes its structure visible. See docs/results_toy_and_learned.md.
  parser.add_argument('--hyper-lr', type=float, default=1e-3,
                      help="Adam rate of FOP's M (paper: 1e-4 over 150 CIFAR-10 epochs)")
  parser.add_argument('--widths', type=int, nargs='+', default=[32, 64])
  parser.add_argument('--snapshots', type=int, default=6, help='snapshots after step 0')
  parser.add_argument('--max-train', type=int, default=None, help='train on a subset (quick runs)')
  parser.add_argument('--max-steps', type=int, default=None, help='cap on steps per epoch')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='results/what_fop_learns')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  start_time = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)

  data = common.subset(common.load_dataset(args.dataset, args.data_dir), args.max_train)
  x_train, y_train, x_test, y_test = data
  model = common.CNN(x_train.shape[-1], 10, tuple(args.widths), rngs=nnx.Rngs(args.seed))
  tx = fop_optax.fop(args.lr, args.momentum, hyper_learning_rate=args.hyper_lr)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = lambda: nnx.state(model, nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    # The state now holds the P that was just applied to these gradients. A zero
    # gradient (dead layer) has no direction: NaN instead of arccos(0) = 90°.
    angles = named(diagnostics.rotation_angles(optimizer.opt_state, grads), np_=False)
    live = named(jax.tree.map(lambda g: jnp.any(g != 0), grads), np_=False)
    return loss, {n: jnp.where(live[n], a, jnp.nan) for n, a in angles.items()}

  steps_per_epoch = len(x_train) // args.batch_size
  if args.max_steps:
    steps_per_epoch = min(steps_per_epoch, args.max_steps)
  total = steps_per_epoch * args.epochs
  snap_steps = sorted({int(round(s)) for s in np.linspace(0, total, args.snapshots + 1)})
  snapshots = []  # (step, {layer: P}, {layer: eigenvalues})

  def snapshot(step):
    state = optimizer.opt_state
    snapshots.append((step, named(diagnostics.preconditioner_matrices(state, params())),
                      named(diagnostics.spectra(state, params()))))

  from tqdm.auto import tqdm
  rng = np.random.default_rng(args.seed)
  angles, losses, accuracy = [], [], []
  snapshot(0)
  bar = tqdm(total=total, disable=args.no_progress, desc='FOP+momentum')
  for epoch in range(args.epochs):
    perm = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
      loss, angle = train_step(model, optimizer, x_train[idx], y_train[idx])
      losses.append(loss)
      angles.append(angle)
      step = epoch * steps_per_epoch + i + 1
      if step in snap_steps:
        snapshot(step)
      bar.update()
    accuracy.append(common.evaluate(model, x_test, y_test)[1])
    bar.set_postfix(loss=f'{float(losses[-1]):.3f}', test_acc=f'{accuracy[-1]:.3f}')
  bar.close()
  losses = np.asarray(jnp.stack(losses))
  angles = {name: np.array([a[name] for a in angles]) for name in angles[0]}
  seconds = time.perf_counter() - start_time

  final_p, final_eigs = snapshots[-1][1], snapshots[-1][2]
  spatial = [n for n, p in final_p.items() if p.shape == (9, 9)]
  layers = {}
  for name in final_p:
    eig = final_eigs[name]
    half = angles[name][len(angles[name]) // 2:]
    layers[name] = {
        'shape': list(final_p[name].shape),
        'eigenvalue_min': float(eig.min()), 'eigenvalue_max': float(eig.max()),
        'eigenvalue_median': float(np.median(eig)),
        'angle_median': float(np.nanmedian(angles[name])),
        'angle_median_second_half': float(np.nanmedian(half)),
        'angle_max': float(np.nanmax(angles[name])),
        'zero_gradient_steps': int(np.isnan(angles[name]).sum()),
        **({'pattern': pattern(final_p[name]),
            'pattern_over_time': [dict(step=s, **pattern(p[name])) for s, p, _ in snapshots]}
           if name in spatial else {}),
    }

  print(f'\n{args.dataset}: {total} steps ({args.epochs} epochs), lr {args.lr:g}, momentum '
        f'{args.momentum:g}, hyper lr {args.hyper_lr:g}; final train loss {losses[-1]:.4f}, '
        f'test accuracy {accuracy[-1]:.4f}; {seconds:.0f} s')
  print(f"{'layer':<16} {'P':>7} {'diag':>7} {'neighb':>7} {'others':>7} {'whiten':>6} "
        f"{'eig min':>8} {'eig max':>8} {'angle med':>9} {'angle max':>9}")
  for name, s in layers.items():
    pat = s.get('pattern')
    cells = (f"{pat['diagonal']:7.3f} {pat['neighbour']:7.3f} {pat['others']:7.3f} "
             f"{'yes' if pat['whitening'] else 'no':>6}" if pat else ' ' * 31)
    print(f"{name:<16} {'×'.join(map(str, s['shape'])):>7} {cells} {s['eigenvalue_min']:8.3f} "
          f"{s['eigenvalue_max']:8.3f} {s['angle_median']:8.1f}° {s['angle_max']:8.1f}°")
  n_white = sum(layers[n]['pattern']['whitening'] for n in spatial)
  print('top eigenvector of P vs the constant direction, |cos|: ' + ', '.join(
      f"{n} {layers[n]['pattern']['top_eigvec_vs_constant']:.3f}" for n in spatial))
  print(f'whitening pattern (positive diagonal, negative 4-neighbour mean) in {n_white} of '
        f'{len(spatial)} 3×3 conv layers; neighbours below the other off-diagonals in '
        f"{sum(layers[n]['pattern']['neighbours_below_others'] for n in spatial)}")

  figures = plot(args.out, snapshots, spatial, angles, losses, steps_per_epoch)
  summary = {'settings': vars(args), 'steps': total, 'seconds': seconds,
             'final_train_loss': float(losses[-1]), 'test_accuracy': accuracy,
             'snapshot_steps': [s for s, _, _ in snapshots], 'layers': layers,
             'whitening_layers': n_white, 'spatial_layers': len(spatial), 'figures': figures,
             'final_matrices': {n: final_p[n].tolist() for n in spatial}}
  path = os.path.join(args.out, 'what_fop_learns.json')
  common.save_json(summary, path)
  print(f'wrote {path} and {len(figures)} figures to {args.out}/')
  return summary


def plot(out, snapshots, spatial, angles, losses, steps_per_epoch):
  """Writes the figures; returns their paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  paths = {}

  def save(fig, name):
    fig.tight_layout()
    paths[name] = os.path.join(out, f'learned_{name}.png')
    fig.savefig(paths[name], dpi=80)
    plt.close(fig)

  # 9×9 matrices over time, one colour scale per layer centred at 0 (red +, blue −).
  for kind in ('matrices', 'centre'):
    fig, axes = plt.subplots(len(spatial), len(snapshots), squeeze=False,
                             figsize=(1.6 * len(snapshots) + 0.8, 1.6 * len(spatial)))
    for row, name in enumerate(spatial):
      mats = [p[name] if kind == 'matrices' else p[name][4].reshape(3, 3) for _, p, _ in snapshots]
      # Off-diagonal range sets the scale: the diagonal is ~1 and would wash everything out.
      off = [m[~np.eye(len(m), dtype=bool)] if kind == 'matrices' else
             np.delete(m.ravel(), 4) for m in mats]
      vmax = max(1e-6, max(np.abs(o).max() for o in off))
      for col, ((step, _, _), m) in enumerate(zip(snapshots, mats)):
        ax = axes[row, col]
        im = ax.imshow(m, cmap='RdBu_r', vmin=-vmax, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
          ax.set_title(f'step {step}', fontsize=8)
        if col == 0:
          ax.set_ylabel(name, fontsize=8)
      fig.colorbar(im, ax=axes[row, -1], fraction=0.046)
    fig.suptitle('learned P (9×9, colour range = off-diagonal range)' if kind == 'matrices' else
                 "centre tap's row of P as a 3×3 stencil (colour range excludes the centre)",
                 fontsize=9)
    save(fig, kind)

  final = snapshots[-1][1]
  fig, axes = plt.subplots(1, len(spatial), squeeze=False, figsize=(2.6 * len(spatial), 2.4))
  for ax, name in zip(axes[0], spatial):
    p = final[name]
    eye = np.eye(len(p), dtype=bool)
    ax.hist([p[~eye], p[eye]], bins=20, label=['off-diagonal', 'diagonal'], stacked=True)
    ax.axvline(0, color='k', lw=0.8)
    ax.set_title(name, fontsize=8)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f'entries of P at step {snapshots[-1][0]}', fontsize=9)
  save(fig, 'histograms')

  eig_names = [n for n, e in snapshots[-1][2].items() if e.size > 1]  # 1×1 convs: a scalar
  fig, axes = plt.subplots(1, len(eig_names), squeeze=False, figsize=(2.4 * len(eig_names), 2.4))
  colours = plt.cm.viridis(np.linspace(0, 1, len(snapshots)))
  for ax, name in zip(axes[0], eig_names):
    for c, (step, _, eigs) in zip(colours, snapshots):
      ax.plot(np.arange(1, len(eigs[name]) + 1), eigs[name], '.-', ms=3, lw=0.8, color=c,
              label=f'step {step}')
    ax.set_yscale('log')
    ax.set_title(name, fontsize=8)
    ax.set_xlabel('index', fontsize=7)
  axes[0, 0].set_ylabel('eigenvalue of P')
  axes[0, -1].legend(fontsize=6)
  save(fig, 'spectra')

  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(9, 3))
  window = max(1, steps_per_epoch // 2)
  smooth = lambda v: np.convolve(v, np.ones(window) / window, mode='valid')
  for name, a in angles.items():
    if name in eig_names:  # a 1×1 conv's P is a scalar: the angle is always 0
      ax.plot(np.arange(len(smooth(a))) + window, smooth(a), lw=1, label=name)
  ax.set(xlabel='step', ylabel='angle(g, Pg) [degrees]', title='rotation of the gradient')
  ax.legend(fontsize=7)
  ax_loss.semilogy(np.arange(len(smooth(losses))) + window, smooth(losses))
  ax_loss.set(xlabel='step', ylabel='train loss', title='training loss (smoothed)')
  save(fig, 'angles')
  return paths


if __name__ == '__main__':
  main()
