"""What ``update_every=k`` (hypergradient + hyper step only every k-th step) saves, as step-time ratios.

``scale_by_fop(update_every=k)`` chooses by ``lax.cond`` inside the jitted step: on the other steps it
applies ``P·G`` with the current ``M`` and stores ``G``. 'precondition only' never takes a hyper step
(``k`` larger than the run): the floor any ``update_every`` can reach.
Timing via benchmarks/overhead.py's bench_case (interleaved rounds, ratios to momentum per round).
Run from the repository root: ``python3 -m benchmarks.update_every --reps 30`` (about a minute on 2
CPU cores); ``--quick`` for a smoke run.
"""
import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.update_every')

import optax

import fop_optax
from benchmarks import _harness as H
from benchmarks import overhead as ov

NEVER = 2 ** 30


def chain(k):
  return lambda: optax.chain(fop_optax.scale_by_fop(ov.LR, update_every=k),
                             optax.sgd(ov.LR, momentum=0.9))


def main(argv=None):
  p = H.parser(__doc__.split('\n')[0], name='update_every', rounds=15)
  p.add_argument('--models', default='mlp')
  p.add_argument('--inner', type=int, default=4)
  p.add_argument('--warmup', type=int, default=3)
  args = H.apply_quick(p.parse_args(argv), p, models='mlp256', rounds=2, inner=1, warmup=1)
  rows, t0 = [], time.perf_counter()
  for name in args.models.split(','):
    model = {'mlp': ov.mlp(), 'mlp256': ov.mlp((784, 256, 256, 10)), 'transformer': ov.transformer()}[name]
    batch = {'mlp': 128, 'mlp256': 128, 'transformer': 16}[name]
    case = ov.Case(name, model, batch, {'fop every step': chain(1),
                                        'fop update_every=2': chain(2),
                                        'fop update_every=4': chain(4),
                                        'precondition only': chain(NEVER)})
    rows += ov.bench_case(case, args)
    for r in rows:
      if r['model'] == name and r['base'] is not None:
        print(f"{name:12s}{r['optimizer']:22s} step {r['step_ms']:8.2f} ms  ratio {r['step_ratio']:.3f} "
              f"[{r['step_ratio_min']:.3f}-{r['step_ratio_max']:.3f}]  update {r['update_ms']:.3f} ms "
              f"ratio {r['update_ratio']:.2f} [{r['update_ratio_min']:.2f}-{r['update_ratio_max']:.2f}]",
              flush=True)
  H.save_rows(args.out, H.metadata(args, argv=argv, module='benchmarks.update_every', t0=t0), rows)
  return rows


if __name__ == '__main__':
  main()
