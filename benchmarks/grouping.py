"""Does grouping equal-shaped leaves pay? ``fop``'s update with its groups, without, and stacked.

``scale_by_fop`` runs the linear algebra of leaves that share a structure and shapes as one
group (``fop_optax._grouping``: stacked, vmapped, branches decided per group). Here its update
("grouped", the default) is timed against the same update with every leaf alone ("per leaf":
the grouping switched off by :func:`leaves_alone`, as before it existed) and, on the depth
model, against the block kernels stacked by hand into one ``(2·depth, 256, 256)`` leaf with one
``P`` per stack index ("stacked": ``WithDimensions`` over ``batch=(0,)``), with momentum's
update for scale. ``--model depth`` is benchmarks/depth.py's residual MLP at ``--depth``
blocks; ``lm`` and ``mlp256`` are benchmarks/before_after.py's models (the Einsum-attention
language model, the MLP 784-256-256-10). Prints the update's median ms and its ratio to the
grouped update per round (interleaved rounds), the XLA:CPU thunks a step runs and the LAPACK
calls it executes (``benchmarks.depth.executed_calls``, from a profile), and checks that the grouped and
per-leaf updates agree.

  python3 -m benchmarks.grouping --depth 8
  python3 -m benchmarks.grouping --model lm
"""

from __future__ import annotations

import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import fop_optax
from benchmarks import _harness, depth
from fop_optax import transform


@contextlib.contextmanager
def leaves_alone():
  """``scale_by_fop`` traced with every leaf in a group of its own (no grouping), for comparison."""
  keys = transform._group_keys
  transform._group_keys = lambda structs, columns: list(range(len(structs)))
  try:
    yield
  finally:
    transform._group_keys = keys


def stacked_blocks(tree, depth_: int):
  """The depth model's tree with the block kernels and biases stacked into one leaf each."""
  stack = lambda key: jnp.stack([b[n][key] for b in tree['blocks'] for n in ('fc1', 'fc2')])
  return {'input': tree['input'], 'head': tree['head'],
          'blocks': {'kernel': stack('kernel'), 'bias': stack('bias')}}


def main(argv=None):
  p = _harness.parser(__doc__.splitlines()[0], name='grouping', rounds=20)
  p.add_argument('--depth', type=int, default=8)
  p.add_argument('--model', default='depth', choices=('depth', 'lm', 'mlp256'))
  p.add_argument('--inner', type=int, default=5)
  args = _harness.apply_quick(p.parse_args(argv), p, depth=1, rounds=2, inner=1)
  t0 = time.perf_counter()
  if args.model == 'depth':
    params = depth.init_params(jax.random.key(0), args.depth)
    x = jnp.ones((depth.BATCH, depth.INPUTS))
    y = jnp.arange(depth.BATCH) % depth.CLASSES
    grads = jax.grad(depth.loss_fn)(params, x, y)
  else:
    from benchmarks.before_after import problem
    params, loss = problem(args.model)
    grads = jax.grad(loss)(params)
  cases = {
      # (two instances: jit would reuse one instance's trace for the other)
      'grouped': (fop_optax.fop(0.05, momentum=0.9), grads, params, contextlib.nullcontext),
      'per leaf': (fop_optax.fop(0.05, momentum=0.9), grads, params, leaves_alone),
  }
  if args.model == 'depth':
    per_stack = fop_optax.WithDimensions(fop_optax.structures.LowRank(),
                                         fop_optax.FopDimensionNumbers(rows=(1,), batch=(0,)))
    stacked = {'input': 'auto', 'head': 'auto', 'blocks': {'kernel': per_stack, 'bias': 'auto'}}
    cases['stacked'] = (fop_optax.fop(0.05, momentum=0.9, structures=stacked),
                        stacked_blocks(grads, args.depth), stacked_blocks(params, args.depth),
                        contextlib.nullcontext)
  cases['momentum'] = (optax.sgd(0.05, momentum=0.9), grads, params, contextlib.nullcontext)
  runners, texts, first = {}, {}, {}
  for name, (tx, g, prm, context) in cases.items():
    with context():   # tracing (the first call and lower) happens in here
      update = jax.jit(tx.update)
      box = [tx.init(prm)]
      for _ in range(3):
        u, box[0] = update(g, box[0], prm)
      jax.block_until_ready(u)
      texts[name] = update.lower(g, box[0], prm).compile().as_text()
    first[name] = u

    def run(update=update, box=box, g=g, prm=prm):
      u, box[0] = update(g, box[0], prm)
      jax.block_until_ready(u)

    runners[name] = run
  times = _harness.interleaved(runners, args.rounds, args.inner)
  ratios = _harness.ratios(times, 'grouped')
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(first['grouped']), jax.tree.leaves(first['per leaf'])))
  rows = []
  print(f'{args.model}: grouped vs per-leaf updates of the third call differ by at most {diff:.1e}')
  print(f'{"update":>10} {"ms (median)":>12} {"÷ grouped":>20} {"thunks/step":>12}  '
        'LAPACK calls run per step')
  for name in cases:
    lapack, thunks = depth.executed_calls(texts[name], runners[name], steps=3)
    row = dict(case=name, ms=statistics.median(times[name]) * 1e3,
               over_grouped=_harness.spread(ratios[name]), thunks=thunks, lapack=lapack)
    rows.append(row)
    print(f'{name:>10} {row["ms"]:>12.2f} {_harness.fmt_spread(row["over_grouped"], ".3f"):>20} '
          f'{row["thunks"]:>12.0f}  {lapack}', flush=True)
  meta = _harness.metadata(args, module='benchmarks.grouping', t0=t0)
  meta['max_abs_update_diff'] = diff
  _harness.save_rows(args.out, meta, rows)


if __name__ == '__main__':
  main()
