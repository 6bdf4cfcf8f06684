"""FOP, SGD and Adam on the Booth and Himmelblau functions (the paper's Figure 1).

Each optimiser starts from the same point; FOP and SGD share the learning rate
``--lr`` (FOP here is FOP + plain SGD, no momentum, so the only difference is
the learned preconditioner ``P``). Adam gets ``--adam-lr``, by default the same
rate, as in the paper's figure (whose Adam takes thousands of iterations).

Converged means ``f(θ) < --tol`` (default 1e-6; every minimum of both functions
has value 0), counted as the first iteration after which that holds. Prints a
table of iterations, the minimum reached, and writes per function a PNG with
the trajectories over the contours plus the loss curves, and a JSON summary::

  python3 examples/toy_functions.py                 # seconds on a CPU
  python3 examples/toy_functions.py --lr 0.005 --start 1 -4 --out /tmp/toy
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax


def booth(p):
  x, y = p[0], p[1]
  return (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2


def himmelblau(p):
  x, y = p[0], p[1]
  return (x ** 2 + y - 11) ** 2 + (x + y ** 2 - 7) ** 2


# name: (f, default start, minima, plot window (xmin, xmax, ymin, ymax))
FUNCTIONS = {
    'booth': (booth, (-5.0, -5.0), [(1.0, 3.0)], (-6, 6, -6, 6)),
    'himmelblau': (himmelblau, (0.0, 0.0),
                   [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186),
                    (3.584428, -1.848126)], (-5, 5, -5, 5)),
}
# The paper's Figure 1 (iterations to converge; its criterion is not stated).
PAPER = {'booth': {'fop': 543, 'sgd': 832, 'adam': 6221},
         'himmelblau': {'fop': 289, 'sgd': 386, 'adam': 5398}}
COLOURS = {'fop': 'tab:red', 'sgd': 'tab:blue', 'adam': 'tab:green'}


def optimisers(lr, adam_lr, hyper_lr, hyper_b2):
  return {
      # The parameters are one 2-vector: 'full' gives it a 2×2 P (the default
      # rule leaves 1-D leaves unpreconditioned). Adam with b2=0.9 as the
      # hyper-optimiser lets P adapt within the few hundred steps these take.
      # max_scale=None: the paper's unbounded FOP, whose speed-up here comes from
      # steps longer than SGD's (the default guard, λ_max(P) ≤ 1, forbids them).
      'fop': fop_optax.fop(lr, momentum=0, structures='full', max_scale=None,
                           hyper_optimizer=optax.adam(hyper_lr, b2=hyper_b2)),
      'sgd': optax.sgd(lr),
      'adam': optax.adam(adam_lr),
  }


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def run(f, tx, x0, max_iters):
  """Returns the trajectory (max_iters + 1, 2) and losses (max_iters + 1,)."""
  def step(carry, _):
    x, state = carry
    u, state = tx.update(jax.grad(f)(x), state, x)
    x = optax.apply_updates(x, u)
    return (x, state), x
  _, xs = jax.lax.scan(step, (x0, tx.init(x0)), length=max_iters)
  xs = jnp.concatenate([x0[None], xs])
  return xs, jax.vmap(f)(xs)


def iterations_to_converge(losses, tol):
  """First iteration k with f(θ_k) < tol, or None if never."""
  below = np.flatnonzero(np.asarray(losses) < tol)
  return int(below[0]) if below.size else None


def _count(k):
  return 'n/c' if k is None else k


def plot(name, f, window, minima, runs, tol, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.2))
  xmin, xmax, ymin, ymax = window
  gx, gy = np.meshgrid(np.linspace(xmin, xmax, 300), np.linspace(ymin, ymax, 300))
  z = np.asarray(jax.vmap(f)(jnp.stack([gx.ravel(), gy.ravel()], 1))).reshape(gx.shape)
  ax.contour(gx, gy, np.log10(z + 1e-3), levels=25, cmap='Greys', linewidths=0.6)
  for key, r in runs.items():
    xs = r['trajectory']
    stop = (r['iterations'] or len(xs) - 1) + 1
    label = f"{key.upper()} ({_count(r['iterations'])} iterations)"
    ax.plot(xs[:stop, 0], xs[:stop, 1], '.-', ms=2, lw=1, color=COLOURS[key])
    ax_loss.semilogy(np.maximum(r['losses'][:stop], 1e-12), color=COLOURS[key], label=label)
  start = next(iter(runs.values()))['trajectory'][0]
  ax.plot(*start, 'ko', ms=6)
  ax.plot(*np.array(minima).T, 'k*', ms=10)
  ax.set(xlim=(xmin, xmax), ylim=(ymin, ymax), aspect='equal',
         title=f'{name}: trajectories from ● to the minima ★')
  ax_loss.axhline(tol, color='k', ls=':', lw=1)
  ax_loss.set(xscale='log', xlabel='iteration', ylabel='f(θ)',
              title=f'{name}: loss (converged: f < {tol:g})')
  ax_loss.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--lr', type=float, default=0.002, help='learning rate of FOP and SGD')
  parser.add_argument('--adam-lr', type=float, default=None, help="Adam's rate (default: --lr)")
  parser.add_argument('--hyper-lr', type=float, default=0.1, help="FOP's hyper-optimiser (Adam) rate")
  parser.add_argument('--hyper-b2', type=float, default=0.9, help="FOP's hyper-optimiser b2")
  parser.add_argument('--start', type=float, nargs=2, default=None, metavar=('X', 'Y'),
                      help='start point for every function (default: booth -5 -5, himmelblau 0 0)')
  parser.add_argument('--max-iters', type=int, default=20_000)
  parser.add_argument('--tol', type=float, default=1e-6, help='converged when f(θ) < tol')
  parser.add_argument('--functions', nargs='+', choices=sorted(FUNCTIONS), default=list(FUNCTIONS))
  parser.add_argument('--out', default='results', help='output directory')
  parser.add_argument('--no-plot', action='store_true')
  args = parser.parse_args(argv)
  adam_lr = args.lr if args.adam_lr is None else args.adam_lr
  os.makedirs(args.out, exist_ok=True)
  txs = optimisers(args.lr, adam_lr, args.hyper_lr, args.hyper_b2)

  summary = {'settings': {**vars(args), 'adam_lr': adam_lr}, 'functions': {}}
  print(f'iterations until f(θ) < {args.tol:g} (max {args.max_iters}); lr {args.lr:g} for FOP '
        f'and SGD, {adam_lr:g} for Adam; paper in brackets')
  print(f"{'function':<11} {'start':>13} {'FOP':>12} {'SGD':>12} {'Adam':>13}  minima (FOP / SGD / Adam)")
  for name in args.functions:
    f, start, minima, window = FUNCTIONS[name]
    x0 = jnp.array(args.start if args.start is not None else start, jnp.float32)
    runs = {}
    for key, tx in txs.items():
      xs, losses = map(np.asarray, run(f, tx, x0, args.max_iters))
      k = iterations_to_converge(losses, args.tol)
      final = xs[k if k is not None else -1]
      runs[key] = {'iterations': k, 'final': final.tolist(),
                   'final_loss': float(losses[k if k is not None else -1]),
                   'trajectory': xs, 'losses': losses}
    cell = lambda key: f"{_count(runs[key]['iterations'])} ({PAPER[name][key]})"
    ends = ' / '.join('({:.2f}, {:.2f})'.format(*runs[key]['final']) for key in txs)
    print(f"{name:<11} {'({:g}, {:g})'.format(*map(float, x0)):>13} {cell('fop'):>12} "
          f"{cell('sgd'):>12} {cell('adam'):>13}  {ends}")
    if not args.no_plot:
      path = os.path.join(args.out, f'toy_{name}.png')
      plot(name, f, window, minima, runs, args.tol, path)
    summary['functions'][name] = {
        'start': [float(v) for v in x0], 'paper': PAPER[name],
        'plot': None if args.no_plot else os.path.join(args.out, f'toy_{name}.png'),
        **{key: {k: v for k, v in r.items() if k not in ('trajectory', 'losses')}
           for key, r in runs.items()}}
  with open(os.path.join(args.out, 'toy_functions.json'), 'w') as fh:
    json.dump(summary, fh, indent=2)
  print(f'wrote {args.out}/toy_functions.json' + ('' if args.no_plot else ' and toy_*.png'))
  return summary


if __name__ == '__main__':
  main()
