"""Where an optimiser's update spends its time: a profile of XLA:CPU's thunks by kind.

The update of ``fop`` (or momentum, for reference) on benchmarks/depth.py's residual MLP is
run under ``jax.profiler`` (``benchmarks._harness.profile_thunks``); every thunk XLA:CPU executes is recorded under its instruction's
name, which the compiled program maps to its kind (a fusion, a ``dot``, a LAPACK custom call
such as ``lapack_sgeqrf_ffi``). Printed: the update's wall time per step and the thunks' time
per step by kind, with their counts, and the costliest instructions. Run it with and without
``OPENBLAS_NUM_THREADS=1`` to see what OpenBLAS's threads cost jaxlib's LAPACK calls:

  python3 -m benchmarks.profile_update --depth 8
  OPENBLAS_NUM_THREADS=1 python3 -m benchmarks.profile_update --depth 8
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import fop_optax
from benchmarks import _harness, depth

def main(argv=None):
  p = _harness.parser(__doc__.splitlines()[0], name='profile_update')
  p.add_argument('--depth', type=int, default=8, help='blocks of the residual MLP')
  p.add_argument('--optimizer', default='fop', choices=('fop', 'fop_adam', 'momentum'))
  p.add_argument('--steps', type=int, default=5, help='profiled learning steps')
  args = _harness.apply_quick(p.parse_args(argv), p, depth=1, steps=2)
  t0 = time.perf_counter()
  params = depth.init_params(jax.random.key(0), args.depth)
  x = jnp.ones((depth.BATCH, depth.INPUTS))
  y = jnp.arange(depth.BATCH) % depth.CLASSES
  grads = jax.grad(depth.loss_fn)(params, x, y)
  tx = {'fop': lambda: fop_optax.fop(0.05, momentum=0.9),
        'fop_adam': lambda: fop_optax.fop_adam(1e-3),
        'momentum': lambda: optax.sgd(0.05, momentum=0.9)}[args.optimizer]()
  update = jax.jit(tx.update)
  box = [tx.init(params)]
  for _ in range(3):   # past the first call (which does not learn)
    u, box[0] = update(grads, box[0], params)
  jax.block_until_ready(u)

  def run():
    u, box[0] = update(grads, box[0], params)
    jax.block_until_ready(u)

  text = update.lower(grads, box[0], params).compile().as_text()
  wall, by_kind, by_name = _harness.profile_thunks(run, text, args.steps)
  thunk_ms = sum(ms for ms, _ in by_kind.values())
  thunks = sum(n for _, n in by_kind.values())
  print(f'{args.optimizer} update, depth {args.depth}: {wall:.2f} ms per step (wall); '
        f'{thunks:.0f} thunks ran, {thunk_ms:.2f} ms inside them')
  print(f'{"thunk kind":42s} {"ms/step":>8s} {"calls":>6s}')
  for k, (ms, n) in list(by_kind.items())[:15]:
    print(f'{k:42s} {ms:8.3f} {n:6.0f}')
  print('costliest instructions:')
  for k, ms in by_name.items():
    print(f'  {k:40s} {ms:8.3f}')
  meta = _harness.metadata(args, module='benchmarks.profile_update', t0=t0)
  _harness.write_json(args.out, meta, wall_ms=wall, thunks=thunks, thunk_ms=thunk_ms,
                      by_kind={k: dict(ms=ms, calls=n) for k, (ms, n) in by_kind.items()},
                      costliest=by_name)


if __name__ == '__main__':
  main()
