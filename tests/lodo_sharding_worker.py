"""LODO on 4 simulated CPU devices (run by tests/test_lodo.py in a subprocess); prints a JSON report.

For a mesh with explicit and with auto axes: parameters sharded over 'model', three jitted
steps; reports the parameters', updates' and weights' partition specs, whether every state
leaf kept its sharding, and the largest difference from the same run on one device.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import fop_optax  # the installed package (pip install -e .)

PARAMS = {'k': jnp.arange(32.0).reshape(4, 8) / 10, 'b': jnp.ones(8)}
SPECS = {'k': P(None, 'model'), 'b': P('model')}


def loss(p):
  return jnp.sum(jnp.sin(p['k'])) + jnp.sum(p['b'] ** 2) + jnp.sum(p['k']) * jnp.sum(p['b'])


def run(params, steps=3):
  tx = fop_optax.lodo(0.1, meta_learning_rate=1e-2, num_layers=3)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s, u

  s = jax.jit(tx.init)(params)
  shardings = lambda s: [str(getattr(x.sharding, 'spec', x.sharding)) for x in jax.tree.leaves(s)]
  specs0 = shardings(s)
  p, changed = params, False
  for _ in range(steps):
    p, s, u = step(p, s)
    changed |= shardings(s) != specs0
  return p, s, u, changed


def main():
  reference = run(PARAMS)[0]
  report = {'devices': len(jax.devices())}
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4,), ('model',), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
      params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in PARAMS.items()}
      p, s, u, changed = run(params)
    weights = jax.tree.leaves(s.inner_state[0].preconditioner_params)
    report[axis_type.name] = dict(
        params=str(p['k'].sharding.spec), updates=str(u['k'].sharding.spec),
        weights=sorted({str(w.sharding.spec) for w in weights}),
        weights_replicated=all(w.sharding.is_fully_replicated for w in weights),
        state_sharding_changed=changed,
        max_diff=max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(reference))))
  print('REPORT ' + json.dumps(report))


if __name__ == '__main__':
  main()
