"""Before/after timing of FOP's per-leaf maths: this checkout's structures against a git revision's.

For each parameter set (the leaves of overhead.py's models) it jit-compiles
hypergradient + a hyper step + ``P·G`` with both versions of
``fop_optax/structures.py``, checks they agree, and times them interleaved.

Run from the repository root: ``python3 -m benchmarks.structures_ab --rev af1fe64~1`` (the revision
before the einsum rewrite); ``--rev 6d89c1c --max-scale 1`` times the guard before its Cholesky
certificate; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.structures_ab')

import jax
import jax.numpy as jnp

from benchmarks import _harness as H
from fop_optax import structures as after_lib

ROOT = H.ROOT

CASES = {
    'mlp low-rank 784x1024 + 1024x1024': [(784, 1024), (1024, 1024)],
    'transformer low-rank': [(512, 1536), (512, 512), (512, 2048), (2048, 512)],
    'dense full 64x256 + 32x256': [(64, 256), (32, 256)],
    'cnn x0.25 spatial (9 kernels)': [(3, 3, 3, 24), (3, 3, 24, 24), (3, 3, 24, 24), (3, 3, 24, 48),
                                      (3, 3, 48, 48), (3, 3, 48, 48), (3, 3, 48, 48),
                                      (1, 1, 48, 48), (1, 1, 48, 10)],
}


def load_revision(rev):
  # fop_optax/structures.py until db6b928, then the package fop_optax/structures/ (one file).
  for where in ('fop_optax/structures.py', 'fop_optax/structures/__init__.py'):
    shown = subprocess.run(['git', 'show', f'{rev}:{where}'], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode == 0:
      break
  else:
    raise SystemExit(f'{rev}: no fop_optax/structures.py or fop_optax/structures/__init__.py')
  src = shown.stdout
  path = os.path.join(tempfile.mkdtemp(), 'structures_before.py')
  with open(path, 'w') as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location('structures_before', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules['structures_before'] = module   # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def make(lib, shapes, key, max_scale=None):
  """One jitted FOP step on these leaves: hypergradient, hyper step, guard (``clip``), ``P·G``.

  The starting ``M``s come from this checkout's ``init`` for both sides, so that the two
  versions see the same inputs even where their initialisation differs.
  """
  structs = [lib.default_structure(s) for s in shapes]
  if max_scale is not None:
    structs = [st.with_bound(max_scale) for st in structs]
  ms = [after_lib.default_structure(s).init(s, jnp.float32, key) for s in shapes]
  ms = [m.at[1].set(0.01) if st.name == 'low_rank' else m for st, m in zip(structs, ms)]
  gs = [jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)]
  gps = [jax.random.normal(jax.random.fold_in(key, 100 + i), s) for i, s in enumerate(shapes)]

  @jax.jit
  def f(ms, gs, gps):
    hs = [st.hypergradient(m, g, gp, 0.05) for st, m, g, gp in zip(structs, ms, gs, gps)]
    ms = [m - 1e-4 * h for m, h in zip(ms, hs)]
    if max_scale is not None:
      ms = [st.clip(m, max_scale) for st, m in zip(structs, ms)]
    return [st.precondition(m, g) for st, m, g in zip(structs, ms, gs)], ms

  return f, (ms, gs, gps)


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='structures_ab', rounds=15)
  parser.add_argument('--rev', default='af1fe64~1')
  parser.add_argument('--max-scale', type=float, default=None,
                      help="the guard's bound B (default: none, the unguarded maths)")
  args = H.apply_quick(parser.parse_args(argv), parser, rounds=2)
  t0 = time.perf_counter()
  libs = {'before': load_revision(args.rev), 'after': after_lib}
  key, fns, rows = jax.random.key(0), {}, []
  for case, shapes in CASES.items():
    for side, lib in libs.items():
      fns[case, side] = make(lib, shapes, key, args.max_scale)
    outs = [jax.block_until_ready(f(*a)) for f, a in (fns[case, 'before'], fns[case, 'after'])]
    diff = max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
    rows.append(dict(case=case, max_abs_diff=diff))
  runners = {k: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for k, (f, a) in fns.items()}
  times = {k: [1e3 * t for t in ts]   # ms per call, one per round
           for k, ts in H.interleaved(runners, args.rounds, inner=5).items()}
  for row in rows:
    b, a = times[row['case'], 'before'], times[row['case'], 'after']
    speedup = H.ratios(times, (row['case'], 'after'))[row['case'], 'before']   # per round
    row.update(before_ms=statistics.median(b), after_ms=statistics.median(a),
               speedup=statistics.median(speedup), speedup_min=min(speedup),
               speedup_max=max(speedup))
    print(f"{row['case']:<36} before {row['before_ms']:8.2f} ms  after {row['after_ms']:8.2f} ms  "
          f"x{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  "
          f"max |diff| {row['max_abs_diff']:.1e}")
  H.write_json(args.out, H.metadata(args, argv=argv, module='benchmarks.structures_ab', t0=t0),
               rev=args.rev, max_scale=args.max_scale, rows=rows)
  return rows


if __name__ == '__main__':
  main()
