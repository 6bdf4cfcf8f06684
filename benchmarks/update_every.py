"""What ``update_every=k`` (hypergradient + hyper step only every k-th step) saves, as step-time ratios.

``scale_by_fop(update_every=k)`` chooses by ``lax.cond`` inside the jitted step: on the other steps it
applies ``P·G`` with the current ``M`` and stores ``G``. 'precondition only' never takes a hyper step
(``k`` larger than the run): the floor any ``update_every`` can reach.
Timing via benchmarks/overhead.py's bench_case (interleaved reps, ratios to momentum per rep).
Run: ``python benchmarks/update_every.py --reps 30`` (about a minute on 2 CPU cores).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..'))
import optax  # noqa: E402

import fop_optax  # noqa: E402
import overhead as ov  # noqa: E402

NEVER = 2 ** 30


def chain(k):
  return lambda: optax.chain(fop_optax.scale_by_fop(ov.LR, update_every=k),
                             optax.sgd(ov.LR, momentum=0.9))


if __name__ == '__main__':
  p = argparse.ArgumentParser()
  p.add_argument('--models', default='mlp')
  p.add_argument('--reps', type=int, default=15)
  p.add_argument('--inner', type=int, default=4)
  p.add_argument('--warmup', type=int, default=3)
  args = p.parse_args()
  rows = []
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
  os.makedirs('results', exist_ok=True)
  with open(os.path.join('results', 'update_every.json'), 'w') as f:
    json.dump(rows, f, indent=1)
