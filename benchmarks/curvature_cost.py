"""Cost per step of AdamQLR and series SFN in gradient-evaluation equivalents.

One "gradient evaluation" is a jit-compiled ``jax.value_and_grad`` of the
loss on the batch (forward and backward). Every optimiser's whole training
step (its own ``value_and_grad``, the update, ``apply_updates``) is timed
as ``--inner`` steps inside one jit-compiled ``lax.fori_loop`` (so Python
dispatch, which dominates small models, is left out) and divided by the gradient evaluation timed in the *same*
repetition (repetitions interleaved, order rotated), so a busy shared machine
slows both sides of a ratio alike. The table gives the median ratio and its
min–max over repetitions, beside the count the methods' specs predict:

* Adam: 1 (plus the update's element-wise work).
* AdamQLR, GGN: gradient + one model JVP + one forward pass (``f(θ + αd)``
  for the damping): about 2.
* AdamQLR, Hessian: gradient + forward-over-forward ``dᵀHd`` + forward.
* series SFN, ``K`` terms: gradient + ``2(K − 1)`` Hessian-vector products
  (forward-over-reverse, each about 2 gradient evaluations; the spec's
  ``1 + 4(K − 1) + ⅓``) + one forward pass; the power-iteration scale adds
  ``2·power_iterations`` HVPs.

Models (plain JAX): ``mlp50``: 784-50-10 on a batch of 400 (the papers'
Fashion-MNIST MLP); ``mlp7x12``: 10-(12×7)-1 on 353 examples (the diabetes
regression, full batch); ``mlp512``: 784-512-512-10 on a batch of 128.

Run from the repository root: ``python3 -m benchmarks.curvature_cost`` (a few minutes on 2 CPU
cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.curvature_cost')

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax
from benchmarks import _harness as H

MODELS = {
    # name: (layer sizes, batch, loss)
    'mlp50': ([784, 50, 10], 400, 'ce'),
    'mlp7x12': ([10] + [12] * 7 + [1], 353, 'mse'),
    'mlp512': ([784, 512, 512, 10], 128, 'ce'),
}

OPTIMIZERS = {
    'adam': (lambda: optax.adam(1e-3), '1'),
    'adam_qlr (ggn)': (lambda: fop_optax.adam_qlr(), '≈2'),
    'adam_qlr (hessian)': (lambda: fop_optax.adam_qlr(curvature='hessian'), '≈2.5-3.3'),
    'series_sfn K=5 r=2': (lambda: fop_optax.series_sfn(5, 2), '≈17'),
    'series_sfn K=10 r=1': (lambda: fop_optax.series_sfn(10, 1), '≈37'),
    'series_sfn K=20 r=1': (lambda: fop_optax.series_sfn(20, 1), '≈77'),
    'series_sfn K=20 power': (lambda: fop_optax.series_sfn(20, 1, scale='power_iteration'),
                              '≈85'),
}


def make_model(sizes, batch, kind, seed=0):
  key = jax.random.key(seed)
  params = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params.append({'w': jax.random.normal(jax.random.fold_in(key, i), (a, b)) / np.sqrt(a),
                   'b': jnp.zeros(b)})
  x = jax.random.normal(jax.random.fold_in(key, 100), (batch, sizes[0]))
  if kind == 'ce':
    y = jax.random.randint(jax.random.fold_in(key, 101), (batch,), 0, sizes[-1])
    loss = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  else:
    y = jax.random.normal(jax.random.fold_in(key, 101), (batch, sizes[-1]))
    loss = lambda z, y: jnp.mean((z - y) ** 2)

  def apply(p, x):
    for layer in p[:-1]:
      x = jax.nn.relu(x @ layer['w'] + layer['b'])
    return x @ p[-1]['w'] + p[-1]['b']
  return params, x, y, apply, loss


def make_loop(tx, apply, loss, x, y, n):
  """``n`` training steps in one ``lax.fori_loop`` (no per-step dispatch)."""
  tx = optax.with_extra_args_support(tx)
  model_fn = lambda p: apply(p, x)
  loss_fn = lambda z: loss(z, y)
  value_fn = lambda p: loss_fn(model_fn(p))

  def body(_, carry):
    params, state, _ = carry
    value, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value=value, grad=grads,
                               value_fn=value_fn, model_fn=model_fn, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state, value

  @jax.jit
  def loop(params, state):
    return jax.lax.fori_loop(0, n, body, (params, state, jnp.zeros([])))
  return loop


def make_grad_loop(apply, loss, x, y, n):
  """``n`` gradient evaluations in one loop; a tiny step keeps each one dependent."""
  value_fn = lambda p: loss(apply(p, x), y)

  def body(_, carry):
    params, _ = carry
    value, grads = jax.value_and_grad(value_fn)(params)
    return jax.tree.map(lambda p, g: p - 1e-12 * g, params, grads), value

  return jax.jit(lambda params: jax.lax.fori_loop(0, n, body, (params, jnp.zeros([]))))


def timeit(fn):
  jax.block_until_ready(fn())
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench(model, reps, inner, names):
  sizes, batch, kind = MODELS[model]
  params, x, y, apply, loss = make_model(sizes, batch, kind)
  grad_loop = make_grad_loop(apply, loss, x, y, inner)
  loops = {}
  for name in names:
    tx = OPTIMIZERS[name][0]()
    loops[name] = (make_loop(tx, apply, loss, x, y, inner), tx.init(params))
    jax.block_until_ready(loops[name][0](params, loops[name][1]))  # compile
  ratios = {name: [] for name in names}
  grad_ms = []
  for rep in range(reps):
    for name in H.round_order(names, rep):
      t_grad = timeit(lambda: grad_loop(params))
      loop, state = loops[name]
      t_step = timeit(lambda: loop(params, state))
      ratios[name].append(t_step / t_grad)   # the ratio within one round
      grad_ms.append(1e3 * t_grad / inner)
  return ratios, statistics.median(grad_ms)


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='curvature_cost', rounds=7)
  parser.add_argument('--json', dest='out', default=argparse.SUPPRESS, help='the old name of --out')
  parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
  parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument('--inner', type=int, default=20, help='steps per timed loop')
  args = H.apply_quick(parser.parse_args(argv), parser, rounds=2, inner=2)
  t0 = time.perf_counter()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; '
        f'{args.rounds} repetitions of {args.inner} steps in a lax.fori_loop', flush=True)
  out = {}
  for model in args.models:
    ratios, grad_ms = bench(model, args.rounds, args.inner, args.optimizers)
    out[model] = {'grad_ms': grad_ms, 'ratios': ratios,
                  'summary': {name: H.spread(rs) for name, rs in ratios.items()}}
    print(f'\n{model} ({MODELS[model][0]}, batch {MODELS[model][1]}): one gradient '
          f'evaluation = {grad_ms:.3f} ms (median)')
    print('| optimiser | step / gradient evaluation, median [min, max] | spec |')
    print('|---|---|---|')
    for name, rs in ratios.items():
      print(f'| {name} | {statistics.median(rs):.2f} [{min(rs):.2f}, {max(rs):.2f}] | '
            f'{OPTIMIZERS[name][1]} |', flush=True)
  if args.out:
    H.write_json(args.out, H.metadata(args, argv=argv, module='benchmarks.curvature_cost', t0=t0),
                 results=out)
  return out


if __name__ == '__main__':
  main()
