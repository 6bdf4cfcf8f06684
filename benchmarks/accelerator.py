"""One command for a lent accelerator: FOP's cost tables on whatever device JAX sees.

Offline and self-contained (synthetic data), for a GPU or TPU session of a few minutes:

  python3 -m benchmarks.accelerator            # ~3-5 minutes on one GPU
  python3 -m benchmarks.accelerator --quick    # a smoke run (seconds; what the tests run)

It prints, with the device named in the first line:

1. **cost against depth** (benchmarks/depth.py's residual MLP of 2, 8 and 32 blocks): step ms
   of momentum, ``fop``, adam and ``fop_adam`` (median over interleaved rounds), the ratio to
   the base optimiser per round, the solver calls in the compiled step (LAPACK on CPU,
   cuSOLVER/hipSOLVER on GPU: any custom call naming ``geqrf``, ``orgqr``, ``syevd``,
   ``potrf``, ...), the compile time, and the added time per block;
2. **step ratios on three models**: the MLP 784-256-256-10 (batch 128), the All-CNN-C ×0.125
   (batch 32), a Transformer block of width 512 (batch 8, 64 tokens);
   ``fop`` ÷ momentum and ``fop_adam`` ÷ adam per round, median [min-max].

The results go to ``results/accelerator.json`` with the device, the versions and the command
(benchmarks/_harness.py); record them with the device named (docs/benchmarks.md §9).
"""

from __future__ import annotations

import time

import jax
import optax

import fop_optax
from benchmarks import _harness, before_after, depth

PAIRS = (('momentum', 'fop'), ('adam', 'fop_adam'))


def model_ratios(name: str, rounds: int, inner: int) -> dict:
  params, loss = before_after.problem(name)
  runners, compile_s = {}, {}
  for opt, tx in depth.optimizers().items():
    @jax.jit
    def step(p, s, tx=tx):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    t0 = time.perf_counter()
    box = list(step(params, tx.init(params)))
    jax.block_until_ready(box)
    compile_s[opt] = time.perf_counter() - t0
    for _ in range(2):
      box[:] = step(*box)

    def run(step=step, box=box):
      box[:] = step(*box)
      jax.block_until_ready(box[0])

    runners[opt] = run
  times = _harness.interleaved(runners, rounds, inner)
  out = dict(model=name, compile_s=compile_s,
             ms={k: _harness.spread([t * 1e3 for t in v]) for k, v in times.items()})
  for base, pair in PAIRS:
    out[f'{pair}/{base}'] = _harness.spread(_harness.ratios(times, base)[pair])
  return out


def main(argv=None):
  p = _harness.parser(__doc__.splitlines()[0], name='accelerator', rounds=10)
  p.add_argument('--depths', default='2,8,32')
  p.add_argument('--inner', type=int, default=5, help='steps per timing')
  p.add_argument('--models', default='mlp256,cnn,transformer512')
  args = _harness.apply_quick(p.parse_args(argv), p, depths='1,2', rounds=2, inner=1,
                              models='mlp256')
  t0 = time.perf_counter()
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({jax.default_backend()}, {len(jax.devices())} devices), '
        f'jax {jax.__version__}, optax {optax.__version__}, fop_optax {fop_optax.__version__}')

  depths = [int(d) for d in args.depths.split(',')]
  rows = []
  print(f'\n{"blocks":>6} {"optimizer":>9} {"step ms":>22} {"÷ base":>18} {"solver":>6} '
        f'{"compile s":>9}')
  for d in depths:
    depth_rows, _ = depth.measure_depth(d, args.rounds, args.inner,
                                        executed=jax.default_backend() == 'cpu')
    rows += depth_rows
    for r in depth_rows:
      ratio = _harness.fmt_spread(r['ratio'], '.2f') if 'ratio' in r else ''
      ms = {k: v * 1e3 if k != 'n' else v for k, v in r['time'].items()}
      print(f'{d:>6} {r["optimizer"]:>9} {_harness.fmt_spread(ms, ".2f"):>22} {ratio:>18} '
            f'{r["lapack_calls"]:>6} {r["compile_s"]:>9.1f}')
  slopes = depth.per_block(rows, depths)
  print(f'added step time per block ({min(depths)} -> {max(depths)} blocks): ' + ', '.join(
      f'{k} {v * 1e3:.3f} ms' for k, v in slopes.items() if '/' not in k))
  print('  ' + ', '.join(f'{k}: {v:.2f}' for k, v in slopes.items() if '/' in k))

  models = []
  print(f'\n{"model":>15} {"fop ÷ momentum":>20} {"fop_adam ÷ adam":>20} {"fop compile s":>13}')
  for name in args.models.split(','):
    r = model_ratios(name, args.rounds, args.inner)
    models.append(r)
    print(f'{name:>15} {_harness.fmt_spread(r["fop/momentum"], ".2f"):>20} '
          f'{_harness.fmt_spread(r["fop_adam/adam"], ".2f"):>20} {r["compile_s"]["fop"]:>13.1f}')
  meta = _harness.metadata(args, module='benchmarks.accelerator', t0=t0)
  _harness.write_json(args.out, meta, depth_rows=rows, per_block=slopes, models=models)


if __name__ == '__main__':
  main()
