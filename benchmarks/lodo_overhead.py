"""LODO's cost next to momentum: step time, update time and state memory.

The same jit-compiled training step (forward, backward, optimiser update, ``apply_updates``;
parameters and state donated) is timed with ``optax.sgd(0.05, momentum=0.9)`` and with LODO
(``optax.chain(fop_optax.scale_by_lodo(α), optax.scale_by_learning_rate(α))``, L = 16, b = 4),
interleaved repetition by repetition, each ratio taken within one repetition (``benchmarks/
overhead.py``'s ``bench_case`` on ``benchmarks/_harness.py``'s interleaved rounds). FOP's default chain is timed alongside for scale.

Models (plain JAX, Flax layouts):

* ``cnn94k``: the ≈94k-parameter CNN of ``examples/lodo_fashion_mnist.py`` (3×3 convs
  1→32→32→64→64, global average pooling, dense 64→384→10) on 28×28×1 images, batch 128 — the
  size of the LODO paper's network experiment;
* ``mlp``: 784-64-10 (≈51k parameters), batch 128.

LODO over the whole flattened vector (as the paper) and per leaf (``per_leaf=True``) are both
timed. "state/params" is the bytes of the optimiser state over the bytes of the parameters.

Run from the repository root: ``python3 -m benchmarks.lodo_overhead`` (a few minutes on 2 CPU
cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.lodo_overhead')

import jax
import optax

import fop_optax
from benchmarks import _harness as H
from benchmarks.overhead import Case, _conv, _dense, bench_case, fop_chain, mlp

LODO_LR = 0.5   # α·EMA = 0.05·trace at β = 0.9: momentum's first steps


def small_cnn():
  """The ≈94k-parameter CNN of examples/lodo_fashion_mnist.py in plain JAX (93,802 parameters)."""
  layers = ((1, 32, 1), (32, 32, 2), (32, 64, 2), (64, 64, 1))

  def init(key):
    keys = jax.random.split(key, 6)
    params = {f'conv{i}': _conv(keys[i], 3, a, b) for i, (a, b, _) in enumerate(layers)}
    params['hidden'] = _dense(keys[4], 64, 384)
    params['head'] = _dense(keys[5], 384, 10)
    return params

  def apply(params, x):
    for i, (_, _, s) in enumerate(layers):
      w = params[f'conv{i}']
      x = jax.nn.relu(jax.lax.conv_general_dilated(
          x, w['kernel'], (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + w['bias'])
    x = jax.nn.relu(x.mean(axis=(1, 2)) @ params['hidden']['kernel'] + params['hidden']['bias'])
    return x @ params['head']['kernel'] + params['head']['bias']

  return init, apply, lambda key, b: jax.random.uniform(key, (b, 28, 28, 1))


def lodo_chain(**kwargs):
  return optax.chain(fop_optax.scale_by_lodo(LODO_LR, **kwargs),
                     optax.scale_by_learning_rate(LODO_LR))


def cases(args):
  fops = {'lodo': lodo_chain, 'lodo (per leaf)': lambda: lodo_chain(per_leaf=True),
          'fop (default)': fop_chain}
  return [Case('cnn94k', small_cnn(), args.batch, fops),
          Case('mlp', mlp((784, 64, 10)), args.batch, fops)]


def format_table(rows) -> str:
  head = (f"{'model':<8}{'params':>8}  {'optimizer':<17}{'step ms':>9}  {'step ratio [min-max]':<22}"
          f"{'update ms':>10}  {'update ratio [min-max]':<24}{'state/params':>12}")
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(
        f"{r['model']:<8}{r['params']:>8}  {r['optimizer']:<17}{r['step_ms']:>9.2f}  "
        + f"{r['step_ratio']:.2f} [{r['step_ratio_min']:.2f}-{r['step_ratio_max']:.2f}]".ljust(22)
        + f"{r['update_ms']:>10.3f}  "
        + f"{r['update_ratio']:.1f} [{r['update_ratio_min']:.1f}-{r['update_ratio_max']:.1f}]".ljust(24)
        + f"{r['state_over_params']:>12.1f}")
  return '\n'.join(lines)


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='lodo_overhead', rounds=7)
  parser.add_argument('--models', default='cnn94k,mlp')
  parser.add_argument('--inner', type=int, default=2, help='steps per timing')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--batch', type=int, default=128)
  args = H.apply_quick(parser.parse_args(argv), parser, models='mlp', rounds=2, inner=1,
                       warmup=1, batch=16)
  wanted = args.models.split(',')
  rows, t0 = [], time.perf_counter()
  for case in cases(args):
    if case.name in wanted:
      rows += bench_case(case, args)
      print(f'[{case.name} done, {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
  print(format_table(rows))
  meta = H.metadata(args, argv=argv, module='benchmarks.lodo_overhead', t0=t0)
  print(f"backend {meta['backend']}, {meta['cpus']} CPUs, load average at the end "
        f"{meta['load_average'][0]:.1f}")
  H.save_rows(args.out, meta, rows)
  return rows


if __name__ == '__main__':
  main()
