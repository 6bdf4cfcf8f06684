"""FOP and LODO trained by two JAX processes over one mesh (used by test_multiprocess.py).

Multi-process mode, one of two processes started by the test::

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python3 tests/multiprocess_worker.py --process-id I --num-processes 2 --port P --out DIR

``jax.distributed`` over ``localhost:P`` with gloo CPU collectives: 2 local devices per process,
4 global devices in one ``(2, 2)`` mesh ``('data', 'model')`` with explicit axes, used inside
``jax.set_mesh``. The parameters (a conv kernel: spatial preconditioner; a 16x32 dense kernel:
full; a 128x64 dense kernel: low-rank; biases) are sharded along ``'model'``, the batch along
``'data'``. Five jitted steps of ``fop_optax.fop`` and of ``fop_optax.lodo``; then the trained
``(params, opt_state)`` of each is saved with Orbax by both processes into ``DIR/ckpt_*``,
restored with the same shardings and compared bit for bit. Each process writes
``DIR/report_I.json`` (process 0's is the full report): the final parameters and losses
(gathered to the host), the partition spec of every state leaf, the collectives in the
compiled HLO of the jitted update (and of the jitted gradient), and the checkpoint checks;
process 0 also writes the update's compiled HLO text to ``DIR/hlo_update_<name>.txt``.

``--single``: the same training in one ordinary process on one device without a mesh, the
reference; writes ``DIR/single.json``.

If the platform cannot start two processes (``jax.distributed`` or gloo unavailable, the
coordinator unreachable), the worker prints ``CANNOT_START: <why>`` and exits with
``CANNOT_START_RC``; any later failure is an ordinary error (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import fop_optax  # the installed package (pip install -e .)

CANNOT_START_RC = 77
STEPS = 5
BATCH = 16
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')

# Kernels sharded along 'model', on their columns and (low-rank kernel) on their rows.
PARAM_SPECS = {
    'conv': {'kernel': P(None, None, None, 'model'), 'bias': P('model')},   # spatial 9x9
    'full': {'kernel': P(None, 'model'), 'bias': P('model')},               # full 16x16
    'low_rank': {'kernel': P('model', None), 'bias': P()},                  # low-rank, 128 rows
}
TXS = {
    'fop': lambda: fop_optax.fop(0.05, momentum=0.9, hyper_learning_rate=1e-2),
    'lodo': lambda: fop_optax.lodo(0.1, meta_learning_rate=1e-2, num_layers=2),
}


def init_params():
  """Deterministic host (numpy) parameters: the same on every process."""
  k = jax.random.split(jax.random.key(0), 3)
  return jax.tree.map(np.asarray, {
      'conv': {'kernel': 0.3 * jax.random.normal(k[0], (3, 3, 2, 16)), 'bias': jnp.zeros((16,))},
      'full': {'kernel': 0.2 * jax.random.normal(k[1], (16, 32)), 'bias': jnp.zeros((32,))},
      'low_rank': {'kernel': 0.1 * jax.random.normal(k[2], (128, 64)),
                   'bias': jnp.zeros((64,))},
  })


def data():
  """One fixed synthetic batch (inputs and two regression targets), the same everywhere."""
  rng = np.random.default_rng(0)
  return (rng.normal(size=(BATCH, 8, 8, 2)).astype(np.float32),
          rng.normal(size=(BATCH, 32)).astype(np.float32),
          rng.normal(size=(BATCH, 64)).astype(np.float32))


def _batch_sharded():
  # Under an explicit mesh, products that contract a sharded axis are laid out batch-sharded.
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return P('data')


def loss_fn(params, x, t1, t2):
  out = _batch_sharded()
  h = jax.lax.conv_general_dilated(x, params['conv']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), out_sharding=out)
  h = jax.nn.relu(h + params['conv']['bias']).mean(axis=(1, 2))              # (B, 16)
  h = jnp.tanh(jnp.matmul(h, params['full']['kernel'], out_sharding=out)
               + params['full']['bias'])                                     # (B, 32)
  z = jnp.tanh(jnp.matmul(x.reshape(x.shape[0], -1), params['low_rank']['kernel'],
                          out_sharding=out) + params['low_rank']['bias'])    # (B, 64)
  return jnp.mean((h - t1) ** 2) + jnp.mean((z - t2) ** 2)


def _collective_count(text, name):
  return len(re.findall(rf'(?<![\w.%-]){re.escape(name)}(?:-start)?\(', text))


def count_collectives(hlo_text):
  """Collective ops in compiled HLO text (async ``-start`` counted once, ``-done`` not).

  ``total`` counts every op in the program text; ``in_entry`` those in the entry computation,
  which run on every call. The others sit in called computations (the branches of a
  ``lax.cond``, loop bodies), so a step runs some of them, or runs them repeatedly;
  ``in_called`` gives their count per called computation.
  """
  counts = {name: _collective_count(hlo_text, name) for name in COLLECTIVES}
  counts['total'] = sum(counts.values())
  counts['in_entry'], counts['in_called'] = 0, {}
  for match in re.finditer(r'^(ENTRY )?(%\S+) .*?^}', hlo_text, re.M | re.S):
    n = sum(_collective_count(match.group(0), name) for name in COLLECTIVES)
    if match.group(1):
      counts['in_entry'] = n
    elif n:
      counts['in_called'][match.group(2)] = n
  return counts


def train(name, params, batch, out=None):
  """STEPS jitted steps (jitted gradient, jitted update, jitted apply)."""
  tx = TXS[name]()
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  update = jax.jit(tx.update)
  apply = jax.jit(optax.apply_updates)
  state = jax.jit(tx.init)(params)
  state0_specs = state_specs(state)
  losses, kept = [], True
  grads = None
  for _ in range(STEPS):
    loss, grads = grad_fn(params, *batch)
    updates, state = update(grads, state, params)
    params = apply(params, updates)
    losses.append(loss)
    kept &= state_specs(state) == state0_specs
  info = dict(state_specs_kept=bool(kept))
  if _distributed():
    hlo = update.lower(grads, state, params).compile().as_text()
    info['collectives_update'] = count_collectives(hlo)
    if jax.process_index() == 0 and out:
      with open(os.path.join(out, f'hlo_update_{name}.txt'), 'w') as f:
        f.write(hlo)
    info['collectives_grad'] = count_collectives(
        grad_fn.lower(params, *batch).compile().as_text())
  return params, state, losses, info


def _distributed():
  return jax.process_count() > 1


def to_host(tree):
  """Global values on the host (numpy), gathered from every process."""
  if _distributed():
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def state_specs(tree):
  return {jax.tree_util.keystr(path): str(getattr(leaf.sharding, 'spec', leaf.sharding))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def find(tree, cls):
  """The first node of type ``cls`` in an optimiser state (FopState, LearnedPreconditionerState)."""
  found = []
  jax.tree_util.tree_map(lambda node: found.append(node) if isinstance(node, cls) else None,
                         tree, is_leaf=lambda node: isinstance(node, cls))
  return found[0]


def layout(name, params, state):
  """The partition specs of the parameters and of the preconditioner's state fields."""
  if name == 'fop':
    s = find(state, fop_optax.FopState)
    fields = dict(last_gradient=s.last_gradient, preconditioners=s.preconditioners,
                  hyper_state=s.hyper_state)
  else:
    s = find(state, fop_optax.LearnedPreconditionerState)
    fields = dict(last_input=s.last_input, preconditioner_params=s.preconditioner_params,
                  hyper_state=s.hyper_state, direction_state=s.direction_state)
  out = {'params': state_specs(params)}
  for field, tree in fields.items():
    out[field] = state_specs(tree)
    out[field + '_replicated'] = {
        jax.tree_util.keystr(p): bool(l.sharding.is_fully_replicated)
        for p, l in jax.tree_util.tree_flatten_with_path(tree)[0]}
  out['all_state'] = state_specs(state)
  return out


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _bits_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def checkpoint(path, tree):
  """Save ``tree`` with Orbax from every process, restore with the same shardings, compare."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
  restored = ckptr.restore(path, abstract)
  ckptr.close()
  same_structure = jax.tree.structure(restored) == jax.tree.structure(tree)
  shardings_equal = all(
      r.sharding.is_equivalent_to(t.sharding, t.ndim)
      for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True))
  saved_host, restored_host = to_host(tree), to_host(restored)
  mismatched = [jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_flatten_with_path(saved_host)[0], jax.tree.leaves(restored_host),
      strict=True) if not _bits_equal(a, b)]
  return dict(leaves=len(jax.tree.leaves(tree)), same_structure=bool(same_structure),
              shardings_equal=bool(shardings_equal), bit_exact=not mismatched,
              mismatched=mismatched)


def run_single(out):
  params0 = jax.tree.map(jnp.asarray, init_params())
  batch = tuple(jnp.asarray(a) for a in data())
  report = {'devices': len(jax.devices())}
  for name in TXS:
    params, _, losses, info = train(name, params0, batch)
    info['params_moved'] = max_diff(to_host(params), to_host(params0))
    report[name] = dict(params=jax.tree.map(lambda a: np.asarray(a).tolist(), to_host(params)),
                        losses=[float(l) for l in losses], **info)
  with open(os.path.join(out, 'single.json'), 'w') as f:
    json.dump(report, f)


def start_distributed(args):
  """jax.distributed over localhost with gloo; exits CANNOT_START_RC where that is impossible."""
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'localhost:{args.port}',
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)
    # One tiny collective: gloo must work across the processes.
    from jax.experimental import multihost_utils
    ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
    if sorted(np.asarray(ids).tolist()) != list(range(args.num_processes)):
      raise RuntimeError(f'process_allgather of process ids gave {ids}')
  except Exception as e:  # the platform cannot run two processes: the test skips
    print(f'CANNOT_START: {type(e).__name__}: {e}', flush=True)
    traceback.print_exc()
    sys.stdout.flush()
    os._exit(CANNOT_START_RC)


def run_distributed(args):
  start_distributed(args)
  pid = jax.process_index()
  mesh = jax.make_mesh((2, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  report = dict(process_index=pid, process_count=jax.process_count(),
                local_devices=jax.local_device_count(), devices=jax.device_count(),
                mesh=str(mesh.devices.tolist()),
                mesh_processes=np.vectorize(lambda d: d.process_index)(mesh.devices).tolist())
  params_host, batch_host = init_params(), data()
  with jax.set_mesh(mesh):
    def place(a, spec):
      return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec),
                                          lambda index: a[index])
    params0 = jax.tree.map(place, params_host, PARAM_SPECS)
    batch = tuple(place(a, P('data')) for a in batch_host)
    report['param_specs'] = state_specs(params0)
    for name in TXS:
      params, state, losses, info = train(name, params0, batch, args.out)
      r = dict(info, params_moved=max_diff(to_host(params), params_host))
      r['layout'] = layout(name, params, state)
      r['params'] = jax.tree.map(lambda a: np.asarray(a).tolist(), to_host(params))
      r['losses'] = [float(l) for l in to_host(losses)]
      r['checkpoint'] = checkpoint(os.path.join(os.path.abspath(args.out), f'ckpt_{name}'),
                                   (params, state))
      report[name] = r
  with open(os.path.join(args.out, f'report_{pid}.json'), 'w') as f:
    json.dump(report, f)
  # Both processes finish together (the coordinator, process 0, must outlive the others' use).
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices('multiprocess_worker done')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--process-id', type=int)
  parser.add_argument('--num-processes', type=int, default=2)
  parser.add_argument('--port', type=int)
  parser.add_argument('--out', required=True)
  parser.add_argument('--single', action='store_true')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.single:
    run_single(args.out)
  else:
    run_distributed(args)


if __name__ == '__main__':
  main()
