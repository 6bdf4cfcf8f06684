"""Before/after timing of FOP's per-leaf maths: this checkout's structures against a git revision's.

For each parameter set (the leaves of overhead.py's models) it jit-compiles
hypergradient + a hyper step + ``P·G`` with both versions of
``fop_optax/structures.py``, checks they agree, and times them interleaved.

Run: ``python benchmarks/structures_ab.py --rev af1fe64~1`` (the revision before the einsum rewrite);
``--rev 6d89c1c --max-scale 1`` times the guard before its Cholesky certificate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from fop_optax import structures as after_lib  # noqa: E402

CASES = {
    'mlp low-rank 784x1024 + 1024x1024': [(784, 1024), (1024, 1024)],
    'transformer low-rank': [(512, 1536), (512, 512), (512, 2048), (2048, 512)],
    'dense full 64x256 + 32x256': [(64, 256), (32, 256)],
    'cnn x0.25 spatial (9 kernels)': [(3, 3, 3, 24), (3, 3, 24, 24), (3, 3, 24, 24), (3, 3, 24, 48),
                                      (3, 3, 48, 48), (3, 3, 48, 48), (3, 3, 48, 48),
                                      (1, 1, 48, 48), (1, 1, 48, 10)],
}


def load_revision(rev):
  src = subprocess.run(['git', 'show', f'{rev}:fop_optax/structures.py'], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
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
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rev', default='af1fe64~1')
  parser.add_argument('--reps', type=int, default=15)
  parser.add_argument('--max-scale', type=float, default=None,
                      help="the guard's bound B (default: none, the unguarded maths)")
  parser.add_argument('--out', default=os.path.join('results', 'structures_ab.json'))
  args = parser.parse_args(argv)
  libs = {'before': load_revision(args.rev), 'after': after_lib}
  key, fns, rows = jax.random.key(0), {}, []
  for case, shapes in CASES.items():
    for side, lib in libs.items():
      fns[case, side] = make(lib, shapes, key, args.max_scale)
    outs = [jax.block_until_ready(f(*a)) for f, a in (fns[case, 'before'], fns[case, 'after'])]
    diff = max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
    rows.append(dict(case=case, max_abs_diff=diff))
  times = {k: [] for k in fns}
  for rep in range(args.reps):
    names = list(fns)
    for k in names[rep % len(names):] + names[:rep % len(names)]:
      f, a = fns[k]
      t0 = time.perf_counter()
      for _ in range(5):
        jax.block_until_ready(f(*a))
      times[k].append((time.perf_counter() - t0) / 5 * 1e3)
  for row in rows:
    b, a = times[row['case'], 'before'], times[row['case'], 'after']
    speedup = [x / y for x, y in zip(b, a)]
    row.update(before_ms=statistics.median(b), after_ms=statistics.median(a),
               speedup=statistics.median(speedup), speedup_min=min(speedup),
               speedup_max=max(speedup))
    print(f"{row['case']:<36} before {row['before_ms']:8.2f} ms  after {row['after_ms']:8.2f} ms  "
          f"x{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  "
          f"max |diff| {row['max_abs_diff']:.1e}")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(rev=args.rev, max_scale=args.max_scale, rows=rows), f, indent=1)
  return rows


if __name__ == '__main__':
  main()
