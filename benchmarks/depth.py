"""FOP's cost against depth: step time, solver calls and compile time on 2, 8 and 32 blocks.

The model is a residual MLP: a 784×256 input kernel, ``depth`` identical blocks of two 256×256
dense kernels (``h + W₂ relu(W₁ h)``), a 256×10 head; batch 128, synthetic data. For
momentum, ``fop``, adam and ``fop_adam`` at each depth it reports:

* the step time (loss, gradient, update; median and spread over interleaved rounds, the four
  optimisers of a depth run round-robin so a noisy machine slows them alike) and its ratio
  to the base optimiser's, taken per round;
* **the added time per block**: the slope of the median step time between the smallest and
  the largest depth, and ``fop``'s slope over momentum's (``fop_adam``'s over adam's): what
  each extra layer costs, which the constant parts of a step hide at small depth;
* the LAPACK calls in the compiled step (``custom_call`` targets naming a LAPACK routine:
  ``geqrf``, ``orgqr``, ``syevd``, ``potrf``, ...), counted in the program text, so calls in
  branches a step may skip count too ("LAPACK"), and those a learning step executes, read
  from a profile ("run/step", :func:`executed_solver_calls`);
* the compile time of the first step.

Run from the repository root: ``python3 -m benchmarks.depth`` (``--quick``: depths 1 and 2,
3 rounds, a smoke run of seconds). ``--rev REV`` times ``fop``/``fop_adam`` as they were at
git revision ``REV`` in the same rounds (rows ``fop@REV``): a change's before and after in
one run. "thunks/step" counts every runtime call a step executes (XLA:CPU thunks).
"""

from __future__ import annotations

import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax
from benchmarks import _harness

WIDTH, INPUTS, CLASSES, BATCH = 256, 784, 10, 128
BASES = {'fop': 'momentum', 'fop_adam': 'adam'}


def optimizers(before=None, rev: str = ''):
  """The four optimisers; with ``before`` (the package at ``rev``), its ``fop``/``fop_adam`` too."""
  out = {
      'momentum': optax.sgd(0.05, momentum=0.9),
      'fop': fop_optax.fop(0.05, momentum=0.9),
      'adam': optax.adam(1e-3),
      'fop_adam': fop_optax.fop_adam(1e-3),
  }
  if before is not None:
    out[f'fop@{rev}'] = before.fop(0.05, momentum=0.9)
    out[f'fop_adam@{rev}'] = before.fop_adam(1e-3)
  return out


def base_of(name: str):
  """The base optimiser a ratio divides by (``fop@rev`` -> momentum), or ``None``."""
  return BASES.get(name.split('@')[0])


def init_params(key, depth: int):
  keys = jax.random.split(key, 2 * depth + 2)
  dense = lambda k, n, m: {'kernel': jax.random.normal(k, (n, m)) / np.sqrt(n),
                           'bias': jnp.zeros((m,))}
  return {
      'input': dense(keys[0], INPUTS, WIDTH),
      'blocks': [{'fc1': dense(keys[2 * i + 1], WIDTH, WIDTH),
                  'fc2': dense(keys[2 * i + 2], WIDTH, WIDTH)} for i in range(depth)],
      'head': dense(keys[-1], WIDTH, CLASSES),
  }


def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params['input']['kernel'] + params['input']['bias'])
  for block in params['blocks']:
    z = jax.nn.relu(h @ block['fc1']['kernel'] + block['fc1']['bias'])
    h = h + 0.5 * (z @ block['fc2']['kernel'] + block['fc2']['bias'])
  logits = h @ params['head']['kernel'] + params['head']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step, donate_argnums=(0, 1))


# A dense solver's custom call: LAPACK on CPU, cuSOLVER/hipSOLVER on GPU.
_SOLVER = re.compile(r'geqrf|orgqr|ungqr|syevd|heevd|syevj|syev|potrf|getrf|gesdd|gesvd|trsm|'
                     r'lapack|solver', re.IGNORECASE)
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def solver_calls(hlo_text: str) -> dict[str, int]:
  """``{target: count}`` of the custom calls to a dense solver in a compiled program's text."""
  return dict(collections.Counter(t for t in _TARGET.findall(hlo_text) if _SOLVER.search(t)))


def executed_calls(compiled_text: str, run, steps: int = 4) -> tuple[dict[str, float], float]:
  """``({solver target: calls per step}, thunks per step)`` that ``run()`` (one step) executes.

  Read from a profile (:func:`benchmarks._harness.profile_thunks`, XLA:CPU's thunks, each
  a separate call of the runtime): calls in a branch the step skips do not count.
  """
  _, by_kind, _ = _harness.profile_thunks(run, compiled_text, steps)
  solver = {k: n for k, (_, n) in sorted(by_kind.items()) if _SOLVER.search(k)}
  return solver, sum(n for _, n in by_kind.values())


def executed_solver_calls(compiled_text: str, run, steps: int = 4) -> dict[str, float]:
  """``{target: calls per step}`` that ``run()`` executes (:func:`executed_calls`)."""
  return executed_calls(compiled_text, run, steps)[0]


def measure_depth(depth: int, rounds: int, inner: int, executed: bool = True, txs=None):
  """Rows per optimiser at this depth and the per-round times.

  ``executed``: also read the solver calls and thunks a step runs from a profile (XLA:CPU's
  thunk names; CPU only). ``txs``: the optimisers (default :func:`optimizers`).
  """
  key = jax.random.key(0)
  params0 = init_params(key, depth)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, INPUTS)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, CLASSES, size=BATCH).astype(np.int32))
  runners, rows = {}, {}
  for name, tx in (optimizers() if txs is None else txs).items():
    step = make_step(tx)
    params = jax.tree.map(jnp.array, params0)
    state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, x, y).compile()
    compile_s = time.perf_counter() - t0
    calls = solver_calls(compiled.as_text())
    box = [params, state]
    for _ in range(3):   # warm up past the first (untouched) and the first learning step
      box[0], box[1], _ = step(box[0], box[1], x, y)

    def run(step=step, box=box):
      box[0], box[1], loss = step(box[0], box[1], x, y)
      jax.block_until_ready(loss)

    runners[name] = run
    ran, thunks = executed_calls(compiled.as_text(), run) if executed else ({}, float('nan'))
    rows[name] = dict(depth=depth, optimizer=name, compile_s=compile_s,
                      lapack_calls=sum(calls.values()), lapack_by_routine=calls,
                      lapack_executed=sum(ran.values()), lapack_executed_by_routine=ran,
                      thunks_executed=thunks)
  times = _harness.interleaved(runners, rounds, inner)
  for name in rows:
    base = base_of(name)
    rows[name]['time'] = _harness.spread(times[name])
    if base is not None:
      rows[name]['ratio'] = _harness.spread(_harness.ratios(times, base)[name])
  return list(rows.values()), times


def per_block(rows, depths):
  """Added median step time per block between the smallest and largest depth, and its ratios."""
  lo, hi = min(depths), max(depths)
  med = {(r['optimizer'], r['depth']): r['time']['median'] for r in rows}
  out = {}
  for name in dict.fromkeys(r['optimizer'] for r in rows):
    out[name] = (med[name, hi] - med[name, lo]) / (hi - lo)
  for name in list(out):
    base = base_of(name)
    if base is not None:
      out[f'{name}/{base}'] = out[name] / out[base] if out[base] > 0 else float('nan')
  return out


def main(argv=None):
  p = _harness.parser(__doc__.splitlines()[0], name='depth', rounds=10)
  p.add_argument('--depths', default='2,8,32', help='numbers of blocks (default %(default)s)')
  p.add_argument('--inner', type=int, default=3, help='steps per round and optimiser')
  p.add_argument('--rev', default=None,
                 help='also time fop and fop_adam as they were at this git revision, in the '
                 'same rounds (benchmarks.before_after.load_revision): before and after in one run')
  args = _harness.apply_quick(p.parse_args(argv), p, depths='1,2', rounds=3, inner=1)
  t0 = time.perf_counter()
  depths = [int(d) for d in args.depths.split(',')]
  before = None
  if args.rev:
    from benchmarks.before_after import load_revision
    before = load_revision(args.rev)
  rows = []
  print(f'{"depth":>5} {"optimizer":>16} {"step ms":>22} {"÷ base":>20} {"LAPACK":>6} '
        f'{"run/step":>8} {"thunks/step":>11} {"compile s":>9}')
  for depth in depths:
    depth_rows, _ = measure_depth(depth, args.rounds, args.inner,
                                  txs=optimizers(before, args.rev or ''))
    rows += depth_rows
    for r in depth_rows:
      ratio = _harness.fmt_spread(r['ratio'], '.2f') if 'ratio' in r else ''
      ms = {k: v * 1e3 if k != 'n' else v for k, v in r['time'].items()}
      print(f'{depth:>5} {r["optimizer"]:>16} {_harness.fmt_spread(ms, ".2f"):>22} '
            f'{ratio:>20} {r["lapack_calls"]:>6} {r["lapack_executed"]:>8.0f} '
            f'{r["thunks_executed"]:>11.0f} {r["compile_s"]:>9.1f}', flush=True)
  slopes = per_block(rows, depths)
  print(f'\nadded step time per block, depth {min(depths)} -> {max(depths)} (medians):')
  for name in [n for n in slopes if '/' not in n]:
    print(f'  {name:>16}: {slopes[name] * 1e3:.3f} ms')
  for name in [n for n in slopes if '/' in n]:
    print(f'  {name.replace("/", " ÷ ")}: {slopes[name]:.2f}')
  meta = _harness.metadata(args, module='benchmarks.depth', t0=t0)
  _harness.write_json(args.out, meta, rows=rows, per_block=slopes)


if __name__ == '__main__':
  main()
