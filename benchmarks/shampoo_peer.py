"""Shampoo (precondition-opt's distributed_shampoo, benchmarks/_shampoo.py) beside momentum and
Adam on the MLP 784-256-256-10: step time and a short Fashion-MNIST run.

``--timing``: the jit-compiled training step (forward, backward, update, ``apply_updates``) on
one fixed batch of 128, each arm ``--steps`` steps per round, the arms' order rotating every
round; an arm's time in a round is its mean step time over those steps (so Shampoo's
preconditioner recomputation every k steps is amortised: keep ``--steps`` a multiple of k),
divided by momentum's in the same round. Reported: median ratio [min–max] over rounds.

``--train``: 2 epochs of 55,000 Fashion-MNIST training images (the first 55,000 of a seed-0
permutation of the 60,000; the leaderboard holds out the last 5,000 in file order), batch 128,
the same seed, initialisation and batch order for every arm; test accuracy on the 10,000
test images.

Run from the repository root: ``python3 -m benchmarks.shampoo_peer --timing`` and
``python3 -m benchmarks.shampoo_peer --train`` (``--out JSON``, default
``results/shampoo_peer.json``; ``--quick`` for a smoke run). About 6 minutes and 15 minutes
on 2 loaded CPU cores.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.shampoo_peer')

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _harness as H
from benchmarks._shampoo import shampoo

SIZES = (784, 256, 256, 10)


def arms():
  return {
      'momentum': lambda: optax.sgd(0.05, momentum=0.9),
      'adam': lambda: optax.adam(1e-3),
      # the classification preset: SGD grafting + Nesterov, blocks of 128, roots every step
      'shampoo': lambda: shampoo(0.05, 'classify'),
      # the same with the roots recomputed every 10 steps (a cost knob, [D] in _shampoo.py)
      'shampoo_k10': lambda: shampoo(0.05, 'classify', preconditioning_compute_steps=10),
      # the language-modelling preset (RMSprop grafting, roots every 50 steps) at Adam's rate;
      # not in the defaults: its blocks of 1536 leave the 784-wide statistics whole, and one
      # root recomputation of those took ~150 s here
      'shampoo_lm': lambda: shampoo(1e-3, 'lm'),
  }


def init_params(seed):
  keys = jax.random.split(jax.random.key(seed), len(SIZES) - 1)
  return [{'w': jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), 'b': jnp.zeros(b)}
          for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])]


def logits_fn(p, x):
  h = x
  for layer in p[:-1]:
    h = jax.nn.relu(h @ layer['w'] + layer['b'])
  return h @ p[-1]['w'] + p[-1]['b']


def loss_fn(p, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()


def make_step(tx):
  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss
  return step


def timing(names, rounds, steps):
  x = jax.random.normal(jax.random.key(1), (128, 784))
  y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
  state, compile_s = {}, {}
  for n in names:                     # compile, then run past Shampoo's start step (25)
    tx = arms()[n]()
    p = init_params(0)
    s, step = tx.init(p), make_step(tx)
    t = time.perf_counter()
    p, s, l = step(p, s, x, y)
    jax.block_until_ready(l)
    compile_s[n] = time.perf_counter() - t   # compilation and the first step
    for _ in range(59):
      p, s, l = step(p, s, x, y)
    jax.block_until_ready((p, s))
    state[n] = [p, s, step]

  def runner(n):
    def run():
      p, s, step = state[n]
      p, s, l = step(p, s, x, y)
      jax.block_until_ready((p, s, l))
      state[n][:2] = p, s
    return run
  times = H.interleaved({n: runner(n) for n in names}, rounds, inner=steps)
  rows = H.summarize(times, ref='momentum')
  for n in names:
    rows[n]['compile_and_first_step_s'] = compile_s[n]
    rows[n]['per_round_s'] = times[n]
    ms = {k: v * 1e3 for k, v in rows[n]['time'].items()}
    print(f"{n:12s} {H.fmt_spread(ms, '.2f')} ms   "
          f"÷ momentum {H.fmt_spread(rows[n]['ratio'], '.2f')}"
          f"   compile + first step {compile_s[n]:.1f} s", flush=True)
  return rows


def train(names, epochs, seed, max_steps=None):
  from examples.common import load_dataset
  x_tr, y_tr, x_te, y_te = load_dataset('fashion_mnist')
  perm = np.random.default_rng(0).permutation(len(x_tr))[:55_000]
  x_tr, y_tr = x_tr[perm].reshape(-1, 784), y_tr[perm]
  x_te = jnp.asarray(x_te.reshape(-1, 784))
  nb = len(x_tr) // 128
  order = np.concatenate([np.random.default_rng(seed + e).permutation(len(x_tr))[:nb * 128]
                          .reshape(nb, 128) for e in range(epochs)])[:max_steps]
  acc_fn = jax.jit(lambda p: (logits_fn(p, x_te).argmax(-1) == y_te).mean())
  test_loss_fn = jax.jit(lambda p: loss_fn(p, x_te, y_te))
  rows = {}
  for n in names:
    tx = arms()[n]()
    p = init_params(seed)
    s, step = tx.init(p), make_step(tx)
    losses, t0 = [], time.perf_counter()
    for idx in order:
      p, s, l = step(p, s, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
      losses.append(l)
    jax.block_until_ready(p)
    wall = time.perf_counter() - t0
    losses = np.array([float(v) for v in losses])
    rows[n] = dict(steps=len(losses), wall_s=wall, test_acc=float(acc_fn(p)),
                   test_loss=float(test_loss_fn(p)),
                   train_loss_last_epoch=float(losses[-nb:].mean()),
                   train_loss_first_100=float(losses[:100].mean()),
                   finite=bool(np.isfinite(losses).all()))
    print(f'{n:12s} test acc {rows[n]["test_acc"]:.4f}  test loss {rows[n]["test_loss"]:.4f}  '
          f'train loss (last epoch) {rows[n]["train_loss_last_epoch"]:.4f}  '
          f'wall {wall:.0f} s', flush=True)
  return rows


def main(argv=None):
  t0 = time.perf_counter()
  ap = H.parser(__doc__.split('\n\n')[0], name='shampoo_peer', rounds=5)
  ap.add_argument('--timing', action='store_true')
  ap.add_argument('--train', action='store_true')
  ap.add_argument('--arms', default='momentum,adam,shampoo,shampoo_k10')
  ap.add_argument('--steps', type=int, default=50, help='steps per arm per round')
  ap.add_argument('--epochs', type=int, default=2)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--max-steps', type=int, help='stop training after this many steps')
  a = ap.parse_args(argv)
  H.apply_quick(a, ap, rounds=1, steps=2, max_steps=3, arms='momentum,shampoo')
  names = a.arms.split(',')
  payload = {}
  if a.timing:
    payload['timing'] = timing(['momentum'] + [n for n in names if n != 'momentum'], a.rounds,
                               a.steps)
  if a.train:
    payload['train'] = train(names, a.epochs, a.seed, a.max_steps)
  from importlib.metadata import version
  H.write_json(a.out, H.metadata(a, argv=argv, module='benchmarks.shampoo_peer', t0=t0,
                                 precondition_opt=version('precondition-opt')), **payload)


if __name__ == '__main__':
  main()
