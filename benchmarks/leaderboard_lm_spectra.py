"""How far FOP's preconditioners P move from I on the leaderboard's LM task (docs/leaderboard.md).

Retrains seed 0 of ``benchmarks.leaderboard``'s ``lm`` task (``examples/lm.py``'s Transformer,
the same initialisation and the same training windows: keys ``split(key(seed + 1), steps)``,
batch 8, context 64) with the entries ``fop`` (the package default, λ_max(P) ≤ 1) and
``fop_paper`` (unbounded, ``optax.adam(1e-4)`` hyper-optimiser), then prints the smallest and
largest eigenvalue of every leaf's P (``fop_optax.diagnostics.spectra``, read with the rule the
entry trains with). About 4 minutes on 2 CPU cores::

  python3 -m benchmarks.leaderboard_lm_spectra --steps 3000
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.leaderboard import ENTRIES
from examples import lm
from fop_optax import diagnostics

RULES = {'fop': {}, 'fop_paper': dict(max_scale=None)}   # as each entry builds its structures


def spectra_after(name: str, steps: int, seed: int = 0, lr: float = 0.05) -> tuple[float, dict]:
  """``(last training-batch loss, {leaf path: (min, max) eigenvalue of P})`` after ``steps``."""
  train, _ = lm.split(lm.load_corpus())
  train = jnp.asarray(train)
  params = lm.init_params(seed)
  tx = ENTRIES[name].make(lr, 'lm')
  state = tx.init(params)

  @jax.jit
  def step(p, s, key):
    tokens = lm.batches(train, 8, 64, key)
    loss, grads = jax.value_and_grad(lm.loss_fn)(p, tokens)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  loss = jnp.nan
  for i in range(steps):
    params, state, loss = step(params, state, keys[i])
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      diagnostics.spectra(state, params, **RULES[name]), is_leaf=lambda x: x is None)[0]
  for path, ev in leaves:
    if ev is not None:
      ev = np.concatenate([np.ravel(np.asarray(e)) for e in jax.tree.leaves(ev)])
      out[jax.tree_util.keystr(path)] = (float(ev.min()), float(ev.max()))
  return float(loss), out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=3000)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  for name in RULES:
    loss, spectra = spectra_after(name, args.steps, args.seed)
    print(f'{name}: last training-batch loss {loss:.4f}')
    for path, (lo, hi) in spectra.items():
      print(f'  {path:42s} eig(P) min {lo:.4f} max {hi:.4f}')


if __name__ == '__main__':
  main()
