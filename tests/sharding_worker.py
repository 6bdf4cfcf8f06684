"""Runs FOP on 8 simulated CPU devices and prints a JSON report (used by test_sharding.py).

Run as a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
so that the main test process keeps its single device. Checks, for a mesh
with explicit and with auto axis types:

* ``init`` and ``update`` run under ``jax.jit`` with parameters sharded by
  ``NamedSharding``, and every state leaf keeps its sharding across updates;
* the shardings are the documented ones: ``last_gradient`` like the
  parameters, preconditioners and their hyper-optimiser state replicated;
* a data-parallel run (batch sharded over 8 devices) matches a single-device
  run to float tolerance;
* FOP runs wherever ``optax.sgd`` runs: explicit and auto axes, inside and
  outside ``jax.set_mesh``, every kernel axis sharded in turn (``check_anywhere``).
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import fop_optax  # the installed package (pip install -e .)

LR = 0.05


def init_params(key):
  k = jax.random.split(key, 3)
  return {
      'conv': {'kernel': 0.3 * jax.random.normal(k[0], (3, 3, 4, 16)), 'bias': jnp.zeros((16,))},
      'd1': {'kernel': 0.2 * jax.random.normal(k[1], (16, 128)), 'bias': jnp.zeros((128,))},
      'd2': {'kernel': 0.1 * jax.random.normal(k[2], (128, 10)), 'bias': jnp.zeros((10,))},
  }  # spatial, full (16 <= 32) and low-rank (128 > 32) preconditioners


def _batch_sharded():
  # Under an explicit mesh JAX needs to be told how products that contract a
  # sharded axis come out: batch-sharded, as in data parallelism.
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return P('data')


def loss_fn(params, x, y):
  out = _batch_sharded()
  h = jax.lax.conv_general_dilated(x, params['conv']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), out_sharding=out)
  h = jax.nn.relu(h + params['conv']['bias']).mean(axis=(1, 2))
  h = jax.nn.relu(jnp.matmul(h, params['d1']['kernel'], out_sharding=out) + params['d1']['bias'])
  logits = jnp.matmul(h, params['d2']['kernel'], out_sharding=out) + params['d2']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_tx():
  return optax.chain(fop_optax.scale_by_fop(LR, hyper_learning_rate=1e-2),
                     optax.sgd(LR, momentum=0.9))


def data(steps, batch=32):
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, batch, 8, 8, 4)).astype(np.float32)
  ys = rng.integers(0, 10, size=(steps, batch)).astype(np.int32)
  return xs, ys


def train(params, xs, ys, put_batch=lambda a: a):
  tx = make_tx()

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = jax.jit(tx.init)(params)
  losses = []
  for x, y in zip(xs, ys):
    params, state, loss = step(params, state, put_batch(x), put_batch(y))
    losses.append(float(loss))
  return params, state, losses


def specs(tree):
  return jax.tree.map(lambda a: str(a.sharding.spec), tree)


def fop_state(state):
  return state[0]   # chain: (FopState, sgd state)


def check_param_sharding(axis_type):
  """Parameters sharded over a 4×2 mesh; state shardings stable across updates."""
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(axis_type, axis_type))
  param_specs = {  # out-axis (column) and in-axis (row) sharding both occur
      'conv': {'kernel': P(None, None, None, 'model'), 'bias': P('model')},
      'd1': {'kernel': P(None, 'model'), 'bias': P('model')},
      'd2': {'kernel': P('model', None), 'bias': P()},
  }
  xs, ys = data(3)
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)),
                          init_params(jax.random.key(0)), param_specs)
    tx = make_tx()
    # With auto axes the compiler picks the shardings of a jitted init's
    # outputs (zeros carry none), for optax's own states too: init eagerly.
    state0 = jax.jit(tx.init)(params) if axis_type == AxisType.Explicit else tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    grad = jax.jit(jax.grad(loss_fn))
    state, shardings = state0, [jax.tree.map(lambda a: a.sharding, state0)]
    compiles = []
    for x, y in zip(xs, ys):
      x = jax.device_put(x, NamedSharding(mesh, P('data')))
      y = jax.device_put(y, NamedSharding(mesh, P('data')))
      updates, state = update(grad(params, x, y), state, params)
      params = optax.apply_updates(params, updates)
      shardings.append(jax.tree.map(lambda a: a.sharding, state))
      compiles.append(update._cache_size())
  fs = fop_state(state)
  return dict(
      # Equivalent layouts: P('model', None) and P('model',) are the same sharding.
      changed=sorted({f'{jax.tree_util.keystr(path)}: {a.spec} -> {b.spec}'
                      for later in shardings[1:]
                      for (path, a), b, leaf in zip(
                          jax.tree_util.tree_flatten_with_path(shardings[0])[0],
                          jax.tree.leaves(later), jax.tree.leaves(state))
                      if not a.is_equivalent_to(b, leaf.ndim)}),
      # Compiled versions of the update after each step. The second call may
      # compile once more where eager apply_updates respells the params' specs
      # (P() -> P(None, None)); after that it must never recompile.
      compiles=compiles,
      last_gradient=specs(fs.last_gradient),
      params=specs(params),
      preconditioners=specs(fs.preconditioners),
      hyper_state=sorted(set(jax.tree.leaves(specs(fs.hyper_state)))),
      finite=bool(all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(params))),
  )


def single_device_run(steps=10):
  """The reference for check_data_parallel: the same run on one device, without a mesh."""
  xs, ys = data(steps)
  params0 = init_params(jax.random.key(1))
  return (params0, xs, ys), train(jax.device_put(params0, jax.devices()[0]), xs, ys)


def check_data_parallel(axis_type, reference):
  """Batch sharded over 8 devices, params replicated, vs one device without a mesh."""
  (params0, xs, ys), (single, single_state, single_losses) = reference
  mesh = jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    replicated = jax.device_put(params0, NamedSharding(mesh, P()))
    multi, state, multi_losses = train(
        replicated, xs, ys, lambda a: jax.device_put(a, NamedSharding(mesh, P('data'))))

  def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

  return dict(max_param_diff=max_diff(single, multi),
              max_preconditioner_diff=max_diff(fop_state(single_state).preconditioners,
                                               fop_state(state).preconditioners),
              params_moved=max_diff(single, params0),
              single_losses=single_losses, multi_losses=multi_losses,
              devices=len(jax.devices()))


# Every axis of each kind of leaf sharded in turn: a spatial conv kernel (4, 4, 8, 16), a full
# dense kernel (16, 32) and a low-rank one (128, 64), over one mesh axis or both.
ANYWHERE_SHAPES = {'conv': (4, 4, 8, 16), 'full': (16, 32), 'low_rank': (128, 64)}
ANYWHERE_SPECS = [
    {'conv': P('data', None, None, None), 'full': P('data', None), 'low_rank': P('data', None)},
    {'conv': P(None, 'data', 'model', None), 'full': P(None, 'data'),
     'low_rank': P('model', 'data')},
    {'conv': P(None, None, None, 'model'), 'full': P('data', 'model'),
     'low_rank': P(('data', 'model'), None)},
]
ANYWHERE_TXS = {
    'sgd': lambda: optax.sgd(LR, momentum=0.9),
    'fop': lambda: fop_optax.fop(LR, momentum=0.9, hyper_learning_rate=1e-2),
    'fop_adam': lambda: fop_optax.fop_adam(1e-3, hyper_learning_rate=1e-2),
    'lodo': lambda: fop_optax.lodo(1e-2, meta_learning_rate=1e-3, num_layers=2),
}
# fop_adam and LODO on the layout that shards every leaf's rows (the hardest for P·G).
ANYWHERE_LAYOUTS = {'sgd': (0, 1, 2), 'fop': (0, 1, 2), 'fop_adam': (2,), 'lodo': (2,)}


def anywhere_loss(p):
  return sum(jnp.sum(jnp.sin(v) * jnp.cos(0.5 * v + 0.1)) for v in jax.tree.leaves(p))


def anywhere_run(params, make_tx, steps=3):
  tx = make_tx()

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(anywhere_loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)   # eagerly, as optax.sgd is used without set_mesh
  for _ in range(steps):
    p, s = step(p, s)
  return p


def check_anywhere():
  """Each transformation, each axis type, inside and outside ``set_mesh``, each layout.

  Reports per case 'ok' plus the largest difference from the same run on one
  device and whether the parameters kept their shardings, or the error.
  """
  keys = jax.random.split(jax.random.key(3), len(ANYWHERE_SHAPES))
  params0 = {n: 0.3 * jax.random.normal(k, s)
             for k, (n, s) in zip(keys, ANYWHERE_SHAPES.items())}
  references = {name: anywhere_run(params0, make) for name, make in ANYWHERE_TXS.items()}
  out = {}
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(axis_type, axis_type))
    for inside in (True, False):
      for layout, specs in enumerate(ANYWHERE_SPECS):
        for name, make in ANYWHERE_TXS.items():
          if layout not in ANYWHERE_LAYOUTS[name]:
            continue
          case = f'{axis_type.name}/{"inside" if inside else "outside"}/{layout}/{name}'
          try:
            with jax.set_mesh(mesh) if inside else contextlib.nullcontext():
              params = {n: jax.device_put(v, NamedSharding(mesh, specs[n]))
                        for n, v in params0.items()}
              p = anywhere_run(params, make)
            out[case] = dict(
                ok=True,
                kept=all(p[n].sharding.is_equivalent_to(params[n].sharding, p[n].ndim)
                         for n in p),
                max_diff=max(float(np.max(np.abs(np.asarray(p[n]) -
                                                 np.asarray(references[name][n]))))
                             for n in p))
          except Exception as e:  # reported, asserted on by the test
            out[case] = dict(ok=False, error=f'{type(e).__name__}: {str(e)[:300]}')
  return out


def main():
  report = {'devices': len(jax.devices())}
  report['anywhere'] = check_anywhere()
  reference = single_device_run()   # one single-device run serves both axis types
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    report[axis_type.name] = dict(params_sharded=check_param_sharding(axis_type),
                                  data_parallel=check_data_parallel(axis_type, reference))
  print('REPORT ' + json.dumps(report))


if __name__ == '__main__':
  main()
