"""A refactor's step time, before and after, measured side by side in one process.

The package at ``--rev`` (default: the commit before issue 27's refactor) is exported with
``git archive`` into a temporary folder and imported under another name (``fop_optax_before``:
its own imports rewritten), so both versions are compiled and timed in the same process,
interleaved round by round (:mod:`benchmarks._harness`): a shared, noisy machine slows both
alike. For each model the step of ``momentum``/``adam`` and of ``fop``/``fop_adam`` at their
defaults, before and after, is timed; the table gives each version's ratio to its base
optimiser (per round, then median and min-max) and after ÷ before. The updates of both
versions after the timed steps are compared (max abs difference).

  python3 -m benchmarks.before_after --rev 6332358 --models mlp256,cnn --rounds 15

``--models lm`` is the shared language-model task (:mod:`examples.lm`: a 2-layer Einsum-attention
Transformer, 136,704 parameters) on one fixed batch of 8 windows of 64 bytes of its corpus.

``--update-only`` times the optimiser's update alone on a fixed gradient (the ratios are then
of updates: fop's update over momentum's), for a change that touches only the update.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax
from benchmarks import _harness
from benchmarks.overhead import cnn, mlp, transformer
from examples import lm

BEFORE = '6332358'   # the last commit before issue 27's refactor


def load_revision(rev: str, name: str = 'fop_optax_before'):
  """The package ``fop_optax`` as it was at ``rev``, imported as module ``name``."""
  folder = tempfile.mkdtemp(prefix='fop_before_')
  archive = subprocess.run(['git', 'archive', rev, 'fop_optax'], cwd=_harness.ROOT,
                           capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', folder], input=archive, check=True)
  os.rename(os.path.join(folder, 'fop_optax'), os.path.join(folder, name))
  for root, _, files in os.walk(os.path.join(folder, name)):
    for file in files:
      if file.endswith('.py'):
        path = os.path.join(root, file)
        with open(path) as f:
          text = f.read()
        with open(path, 'w') as f:
          f.write(re.sub(r'\bfop_optax\b', name, text))
  # Loaded from its folder by a spec (nothing added to sys.path); its submodules are found
  # through the package's __path__.
  package = os.path.join(folder, name)
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(package, '__init__.py'), submodule_search_locations=[package])
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


MODELS = {   # name -> ((init, apply, make_inputs), batch): benchmarks.overhead's models
    'mlp256': lambda: (mlp((784, 256, 256, 10)), 128),
    'cnn': lambda: (cnn(0.125), 32),
    'transformer512': lambda: (transformer(), 8),
    # examples/lm.py's defaults; inputs are windows of seq + 1 = 65 corpus bytes, not synthetic
    'lm': lambda: ((lm.init_params, lm.apply,
                    lambda key, b: lm.batches(lm.split(lm.load_corpus())[0], b, 64, key)), 8),
}


def problem(model: str):
  """``(params, loss)`` of a model of :data:`MODELS` on a fixed batch.

  Synthetic inputs and 10-class labels, except ``'lm'``: next-token cross-entropy
  (:func:`examples.lm.loss_fn`) on a fixed batch of real corpus text.
  """
  (init, apply, make_inputs), batch = MODELS[model]()
  if model == 'lm':
    tokens = make_inputs(jax.random.key(1), batch)
    return init(jax.random.key(0)), lambda p: lm.loss_fn(p, tokens)
  params = init(jax.random.key(0))
  x = make_inputs(jax.random.key(1), batch)
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
  return params, loss


def main(argv=None):
  parser = _harness.parser(__doc__.splitlines()[0], name='before_after', rounds=15)
  parser.add_argument('--rev', default=BEFORE)
  parser.add_argument('--models', default='mlp256')
  parser.add_argument('--inner', type=int, default=20, help='steps per timing')
  parser.add_argument('--update-only', action='store_true',
                      help="time the optimiser's update alone, on a fixed gradient (learning "
                      'steps after the first), not the whole training step: the forward and '
                      "backward pass's time and noise do not dilute the difference")
  args = parser.parse_args(argv)
  _harness.apply_quick(args, parser, rounds=3, inner=3)
  started = time.time()
  old = load_revision(args.rev)
  rows = []
  for model in args.models.split(','):
    params, loss = problem(model)
    variants = {
        'momentum': optax.sgd(0.05, momentum=0.9),
        'fop before': old.fop(0.05, 0.9), 'fop after': fop_optax.fop(0.05, 0.9),
        'adam': optax.adam(1e-3),
        'fop_adam before': old.fop_adam(1e-3), 'fop_adam after': fop_optax.fop_adam(1e-3),
    }
    runners, finals = {}, {}
    fixed_grad = jax.grad(loss)(params)
    for name, tx in variants.items():
      @jax.jit
      def step(p, s, tx=tx):
        if args.update_only:   # the parameters stay; the state moves on
          u, s = tx.update(fixed_grad, s, p)
          return p, s, u
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u
      state = [params, tx.init(params), None]
      for _ in range(3):   # compile and warm up
        state[:] = step(state[0], state[1])
      jax.block_until_ready(state)

      def run(step=step, state=state):
        state[:] = step(state[0], state[1])
        jax.block_until_ready(state[2])
      runners[name], finals[name] = run, state
    times = _harness.interleaved(runners, args.rounds, args.inner)
    for base, pair in (('momentum', 'fop'), ('adam', 'fop_adam')):
      before = _harness.ratios(times, base)[f'{pair} before']
      after = _harness.ratios(times, base)[f'{pair} after']
      change = _harness.ratios(times, f'{pair} before')[f'{pair} after']
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree.leaves(finals[f'{pair} before'][2]), jax.tree.leaves(finals[f'{pair} after'][2])))
      row = dict(model=model, optimizer=pair, base=base,
                 before=_harness.spread(before), after=_harness.spread(after),
                 after_over_before=_harness.spread(change), max_abs_update_diff=diff,
                 base_ms=_harness.spread([t * 1e3 for t in times[base]]))
      rows.append(row)
      print(f"{model:8s} {pair:9s} ÷ {base:8s}: before {_harness.fmt_spread(row['before'], '.2f')}"
            f"  after {_harness.fmt_spread(row['after'], '.2f')}  after ÷ before "
            f"{_harness.fmt_spread(row['after_over_before'], '.3f')}  "
            f"(base {row['base_ms']['median']:.2f} ms; |Δupdate| {diff:.1e})", flush=True)
  meta = _harness.metadata(args, rev_before=args.rev, seconds=time.time() - started)
  _harness.save_rows(args.out, meta, rows)
  return rows


if __name__ == '__main__':
  main()
