"""LODO on Liao et al.'s Rosenbrock function, against FOP, momentum, Adam and RMSprop.

``f(x, y) = 0.01(1 − x)² + (y − x²)²`` from ``(−0.5, 2)``, 200 steps, as in the LODO paper's
Rosenbrock experiment (its minimum is ``f(1, 1) = 0``; the valley floor ``y = x²`` is nearly flat).
Every optimiser is tuned, as in the paper: its learning rate on a log grid (LODO and FOP also
their meta / hyper learning rate), keeping the setting with the lowest mean of ``log₁₀ f`` over
the 200 steps (a fast *and* deep descent) on LODO seed 0. LODO's network (initialisation and
permutations) depends on its seed, so the tuned LODO is then run on ``--seeds`` seeds; the others
are deterministic.

FOP here is FOP + heavy-ball momentum with a full 2×2 ``P`` over the parameter vector and the
paper's unbounded form (``max_scale=None``; the package's default guard ``λ_max(P) ≤ 1`` could only
shorten steps, and this valley needs longer ones).

Run: ``python examples/lodo_rosenbrock.py`` (about 2 minutes on 2 CPU cores; ``--quick``: a
coarse grid). Writes
``docs/img/lodo_rosenbrock.png`` and ``results/lodo_rosenbrock.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax  # noqa: E402

START = (-0.5, 2.0)
LABELS = {'lodo': 'LODO', 'fop': 'FOP (full P) + momentum', 'momentum': 'momentum',
          'adam': 'Adam', 'rmsprop': 'RMSprop'}
COLORS = {'lodo': 'C3', 'fop': 'C0', 'momentum': 'k', 'adam': 'C1', 'rmsprop': 'C2'}
LRS = tuple(float(x) for x in np.logspace(-3, 1, 13))   # 1e-3 … 10, ×2.15 apart


def rosenbrock(p):
  x, y = p[0], p[1]
  return 0.01 * (1 - x) ** 2 + (y - x ** 2) ** 2


def grid(name: str, quick: bool):
  lrs = LRS[::3] if quick else LRS
  if name == 'lodo':
    return [dict(lr=lr, meta_lr=m) for lr, m in itertools.product(
        lrs, (1e-3,) if quick else (1e-4, 1e-3, 1e-2))]
  if name == 'fop':
    return [dict(lr=lr, hyper_lr=h) for lr, h in itertools.product(
        lrs, (1e-2,) if quick else (1e-3, 1e-2, 1e-1))]
  return [dict(lr=lr) for lr in lrs]


# name -> (factory(**hyperparameters) -> optax transformation, {setting key: its argument}).
# skip_nonfinite=False: a diverging setting shows as NaN (and is ranked last), and under
# jax.vmap skip_nonfinite's warning callback would run on every step.
def factories(seed: int):
  return {
      'lodo': (lambda learning_rate, meta_learning_rate: fop_optax.lodo(
          learning_rate, meta_learning_rate, seed=seed, skip_nonfinite=False),
               {'lr': 'learning_rate', 'meta_lr': 'meta_learning_rate'}),
      'fop': (lambda learning_rate, hyper_learning_rate: fop_optax.fop(
          learning_rate, 0.9, hyper_learning_rate=hyper_learning_rate, structures='full',
          max_scale=None, skip_nonfinite=False),
              {'lr': 'learning_rate', 'hyper_lr': 'hyper_learning_rate'}),
      'momentum': (lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
                   {'lr': 'learning_rate'}),
      'adam': (lambda learning_rate: optax.adam(learning_rate), {'lr': 'learning_rate'}),
      'rmsprop': (lambda learning_rate: optax.rmsprop(learning_rate), {'lr': 'learning_rate'}),
  }


def run(name: str, settings: list[dict], steps: int, seed: int = 0):
  """Trajectories ``(k, steps + 1, 2)`` and losses ``(k, steps + 1)`` of ``k`` settings.

  One compilation per optimiser: the settings are ``optax.inject_hyperparams`` values,
  run side by side under ``jax.vmap``.
  """
  factory, names = factories(seed)[name]
  tx = optax.inject_hyperparams(factory)(**{names[k]: v for k, v in settings[0].items()})
  p0 = jnp.asarray(START, jnp.float32)
  state0 = tx.init(p0)

  def with_setting(setting):
    hyper = dict(state0.hyperparams)
    for k, v in setting.items():
      hyper[names[k]] = jnp.asarray(v, hyper[names[k]].dtype)
    return state0._replace(hyperparams=hyper)

  states = jax.tree.map(lambda *x: jnp.stack(x), *[with_setting(s) for s in settings])

  def body(carry, _):
    p, state = carry
    g = jax.grad(rosenbrock)(p)
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  def one(state):
    return jax.lax.scan(body, (p0, state), None, length=steps)[1]

  paths = np.asarray(jax.jit(jax.vmap(one))(states))
  paths = np.concatenate([np.broadcast_to(np.asarray(p0), (len(settings), 1, 2)), paths], 1)
  losses = np.asarray(jax.vmap(jax.vmap(rosenbrock))(jnp.asarray(paths)))
  return paths, losses


def score(losses):
  """Mean of log₁₀ f over the run (lower: faster and deeper); inf if it diverged."""
  if not np.all(np.isfinite(losses)):
    return float('inf')
  return float(np.mean(np.log10(np.maximum(losses, 1e-30))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--seeds', type=int, default=5, help="LODO's seeds for the tuned setting")
  parser.add_argument('--optimizers', default=','.join(LABELS))
  parser.add_argument('--quick', action='store_true', help='a coarse grid, 2 LODO seeds')
  parser.add_argument('--plot', default=os.path.join('docs', 'img', 'lodo_rosenbrock.png'))
  parser.add_argument('--out', default=os.path.join('results', 'lodo_rosenbrock.json'))
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds = 2
  t0 = time.perf_counter()
  results = {}
  for name in args.optimizers.split(','):
    settings = grid(name, args.quick)
    scores = [score(l) for l in run(name, settings, args.steps)[1]]
    best = settings[int(np.argmin(scores))]
    seeds = range(args.seeds) if name == 'lodo' else range(1)
    runs = []
    for seed in seeds:
      paths, losses = run(name, [best], args.steps, seed)
      runs.append((paths[0], losses[0]))
    finals = [float(r[1][-1]) for r in runs]
    results[name] = dict(setting=best, tuning=[(str(a), b) for a, b in zip(settings, scores)],
                         final=finals, score=[score(r[1]) for r in runs],
                         path=runs[0][0].tolist(), losses=[r[1].tolist() for r in runs])
    print(f'[{time.perf_counter() - t0:5.0f}s] {LABELS[name]:<24} tuned {best}: final f median '
          f'{np.median(finals):.3g} [{min(finals):.3g}-{max(finals):.3g}], mean log10 f '
          f'{np.median(results[name]["score"]):.2f}', flush=True)

  print(f'\n| optimiser | tuned setting | f after {args.steps} steps: median [min-max] | '
        'mean log₁₀ f over the run |')
  print('|---|---|---|---|')
  for name, r in results.items():
    f = r['final']
    print(f"| {LABELS[name]} | {r['setting']} | {np.median(f):.3g} [{min(f):.3g}-{max(f):.3g}]"
          f" ({len(f)} run{'s' if len(f) > 1 else ''}) | {np.median(r['score']):.2f} |")

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
  xs, ys = np.meshgrid(np.linspace(-1.5, 1.5, 300), np.linspace(-0.5, 2.5, 300))
  zs = 0.01 * (1 - xs) ** 2 + (ys - xs ** 2) ** 2
  ax1.contour(xs, ys, np.log10(zs + 1e-6), levels=20, cmap='Greys', linewidths=0.6)
  for name, r in results.items():
    path = np.asarray(r['path'])
    ax1.plot(path[:, 0], path[:, 1], '.-', ms=2, lw=0.8, color=COLORS[name], label=LABELS[name])
    losses = np.asarray(r['losses'])
    ax2.plot(np.median(losses, 0), color=COLORS[name], label=LABELS[name])
    if len(losses) > 1:
      ax2.fill_between(np.arange(losses.shape[1]), losses.min(0), losses.max(0),
                       color=COLORS[name], alpha=0.2)
  ax1.plot(*START, 'ko')
  ax1.plot(1, 1, 'k*', ms=10)
  ax1.set(xlim=(-1.5, 1.5), ylim=(-0.5, 2.5), xlabel='x', ylabel='y',
          title='trajectories (tuned; LODO seed 0)')
  ax2.set(yscale='log', xlabel='step', ylabel='f', title=f'f (LODO: median, range of {args.seeds} seeds)')
  ax2.legend(fontsize=8)
  fig.suptitle('Rosenbrock f = 0.01(1−x)² + (y−x²)² from (−0.5, 2)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.plot) or '.', exist_ok=True)
  fig.savefig(args.plot, dpi=110)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(args=vars(args), results=results, seconds=time.perf_counter() - t0), f)
  print(f'saved {args.plot} and {args.out} ({time.perf_counter() - t0:.0f}s)')
  return results


if __name__ == '__main__':
  main()
