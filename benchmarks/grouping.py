"""Would grouping equal-shaped leaves pay? The depth model's block kernels, per leaf or stacked.

benchmarks/depth.py's residual MLP at ``--depth`` blocks: ``fop``'s update with one low-rank
``P`` per block kernel as separate leaves (today's default), against the same kernels as one
stacked ``(2·depth, 256, 256)`` leaf with one ``P`` per stack index (``WithDimensions`` over
``batch=(0,)``, which runs the structure under ``jax.vmap``), and momentum's update for scale.
Prints the update's median ms over interleaved rounds, the XLA:CPU thunks a step runs and the
LAPACK calls it executes (``benchmarks._harness.profile_thunks``).

  python3 -m benchmarks.grouping --depth 8
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import fop_optax
from benchmarks import _harness, depth


def stacked_blocks(tree, depth_: int):
  """The depth model's tree with the block kernels and biases stacked into one leaf each."""
  stack = lambda key: jnp.stack([b[n][key] for b in tree['blocks'] for n in ('fc1', 'fc2')])
  return {'input': tree['input'], 'head': tree['head'],
          'blocks': {'kernel': stack('kernel'), 'bias': stack('bias')}}


def main(argv=None):
  p = _harness.parser(__doc__.splitlines()[0], name='grouping', rounds=20)
  p.add_argument('--depth', type=int, default=8)
  p.add_argument('--inner', type=int, default=5)
  args = _harness.apply_quick(p.parse_args(argv), p, depth=1, rounds=2, inner=1)
  t0 = time.perf_counter()
  params = depth.init_params(jax.random.key(0), args.depth)
  x = jnp.ones((depth.BATCH, depth.INPUTS))
  y = jnp.arange(depth.BATCH) % depth.CLASSES
  grads = jax.grad(depth.loss_fn)(params, x, y)
  stacked_grads = stacked_blocks(grads, args.depth)
  per_stack = fop_optax.WithDimensions(fop_optax.structures.LowRank(),
                                       fop_optax.FopDimensionNumbers(rows=(1,), batch=(0,)))
  grouped = {'input': 'auto', 'head': 'auto', 'blocks': {'kernel': per_stack, 'bias': 'auto'}}
  cases = {
      'per leaf': (fop_optax.fop(0.05, momentum=0.9), grads, params),
      'stacked': (fop_optax.fop(0.05, momentum=0.9, structures=grouped), stacked_grads,
                  stacked_blocks(params, args.depth)),
      'momentum': (optax.sgd(0.05, momentum=0.9), grads, params),
  }
  runners, texts = {}, {}
  for name, (tx, g, prm) in cases.items():
    update = jax.jit(tx.update)
    box = [tx.init(prm)]
    for _ in range(3):
      u, box[0] = update(g, box[0], prm)
    jax.block_until_ready(u)

    def run(update=update, box=box, g=g, prm=prm):
      u, box[0] = update(g, box[0], prm)
      jax.block_until_ready(u)

    runners[name], texts[name] = run, update.lower(g, box[0], prm).compile().as_text()
  times = _harness.interleaved(runners, args.rounds, args.inner)
  rows = []
  print(f'{"update":>10} {"ms (median)":>12} {"thunks/step":>12}  LAPACK calls run per step')
  for name in cases:
    _, by_kind, _ = _harness.profile_thunks(runners[name], texts[name], 3)
    lapack = {k: n for k, (_, n) in by_kind.items() if 'lapack' in k}
    row = dict(case=name, ms=statistics.median(times[name]) * 1e3,
               thunks=sum(n for _, n in by_kind.values()), lapack=lapack)
    rows.append(row)
    print(f'{name:>10} {row["ms"]:>12.2f} {row["thunks"]:>12.0f}  {lapack}')
  meta = _harness.metadata(args, module='benchmarks.grouping', t0=t0)
  _harness.save_rows(args.out, meta, rows)


if __name__ == '__main__':
  main()
