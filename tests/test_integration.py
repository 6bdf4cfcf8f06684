"""fop_optax inside the wrappers and frameworks users already have."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import fop_optax

PARAMS = {'conv': jnp.full((3, 3, 2, 2), 0.1, jnp.float32),
          'dense': jnp.full((5, 3), 0.2, jnp.float32),
          'bias': jnp.zeros(3, jnp.float32)}


def loss(params):
  return sum(jnp.sum((x - 1.0) ** 2) + 0.1 * jnp.sum(jnp.sin(4 * x))
             for x in jax.tree.leaves(params))


def train(tx, params, steps=200, **extra):
  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      kwargs = {'value': value} if extra.get('value') else {}
      updates, state = tx.update(grads, state, params, **kwargs)
      return (optax.apply_updates(params, updates), state), value
    (params, state), values = jax.lax.scan(body, (params, tx.init(params)), length=steps)
    return params, state, values
  return run(params)


def test_masked_fop_on_some_leaves_only():
  mask = {'conv': True, 'dense': False, 'bias': False}
  tx = optax.chain(optax.masked(fop_optax.scale_by_fop(0.05), mask), optax.sgd(0.05, 0.9))
  params, state, values = train(tx, PARAMS)
  assert float(values[-1]) < 0.1 * float(values[0])
  fop_state = state[0].inner_state
  assert isinstance(fop_state.preconditioners['dense'], optax.MaskedNode)
  assert fop_state.preconditioners['conv'].shape == (9, 9)
  # Masked-out leaves get exactly what plain momentum gives them.
  ref, _, _ = train(optax.chain(optax.masked(optax.identity(), mask), optax.sgd(0.05, 0.9)), PARAMS)
  np.testing.assert_allclose(params['dense'], ref['dense'], rtol=1e-6)


def test_partition_fop_and_adam():
  labels = {'conv': 'fop', 'dense': 'fop', 'bias': 'adam'}
  tx = optax.partition({'fop': fop_optax.fop(0.05), 'adam': optax.adam(0.05)}, labels)
  _, _, values = train(tx, PARAMS)
  assert float(values[-1]) < 0.1 * float(values[0])


def test_reduce_on_plateau_chained_after():
  tx = optax.chain(fop_optax.fop(0.05),
                   optax.contrib.reduce_on_plateau(patience=5, factor=0.5, cooldown=0))
  _, state, values = train(tx, PARAMS, steps=400, value=True)
  assert float(values[-1]) < 0.1 * float(values[0])
  # Near the optimum the loss plateaus, so the scale was reduced at some point.
  assert float(state[1].scale) < 1.0


def test_vmap_over_independent_states():
  """An ensemble: one optimiser state per member, vmapped."""
  n = 3
  tx = fop_optax.fop(0.05, hyper_learning_rate=1e-2)
  stacked = jax.tree.map(lambda x: jnp.stack([x * (i + 1) for i in range(n)]), PARAMS)
  states = jax.vmap(tx.init)(stacked)

  @jax.jit
  def step(params, states):
    grads = jax.vmap(jax.grad(loss))(params)
    updates, states = jax.vmap(tx.update)(grads, states, params)
    return optax.apply_updates(params, updates), states

  for _ in range(5):
    stacked, states = step(stacked, states)
  # Each member matches an independent, unbatched run.
  for i in range(n):
    single = jax.tree.map(lambda x: x * (i + 1), PARAMS)
    s = tx.init(single)
    for _ in range(5):
      u, s = tx.update(jax.grad(loss)(single), s, single)
      single = optax.apply_updates(single, u)
    # Batched and unbatched eigensolvers (the guard's) round differently: float32 agreement.
    test_utils.assert_trees_all_close(jax.tree.map(lambda x: x[i], stacked), single,
                                      rtol=2e-4, atol=1e-5)


def test_no_batched_lapack_call_when_vmapped():
  """FOP's vmapped graph has no *batched* LAPACK call: one can deadlock XLA:CPU's thread pool.

  Seen with jax 0.10.2 on 2 cores (a PPO run over seeds hung for 90 minutes): both pool
  workers sat in ``lapack_sgeqrf_ffi`` → ``ParallelBatchMap``, waiting for tasks queued
  behind themselves. Under ``vmap`` the guard's QR, eigensolvers and Cholesky
  (``fop_optax._linalg``) loop over the batch with unbatched calls (``num_batch_dims = 0``),
  which run inline; low-rank ``U`` starts from Gram–Schmidt (no QR at all in ``init``).
  """
  tx = fop_optax.fop(0.05, structures='low_rank', rank=2)
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), PARAMS)
  states = jax.vmap(tx.init)(stacked)
  grads = jax.vmap(jax.grad(loss))(stacked)
  texts = {}
  for name, fn, args in (('init', jax.vmap(tx.init), (stacked,)),
                         ('update', jax.vmap(tx.update), (grads, states, stacked))):
    texts[name] = jax.jit(fn).lower(*args).as_text()
  assert 'lapack' not in texts['init']
  calls = re.findall(r'custom_call @(lapack_\w+)\(.*?num_batch_dims = "(\d+)"', texts['update'])
  assert {c for c, _ in calls} >= {'lapack_sgeqrf_ffi', 'lapack_ssyevd_ffi'}, calls   # the check is real
  assert all(batch == '0' for _, batch in calls), calls
  # and the low-rank U it starts from is orthonormal, so P = I
  u = fop_optax.diagnostics.find_fop_state(states).preconditioners
  for m in jax.tree.leaves(u):
    if m.ndim == 4:   # (seeds, 2, a, r)
      gram = jnp.einsum('sar,sac->src', m[:, 0], m[:, 0])
      np.testing.assert_allclose(gram, np.broadcast_to(np.eye(m.shape[-1]), gram.shape), atol=1e-5)


def test_scan_matches_python_loop():
  tx = fop_optax.fop(0.05, hyper_learning_rate=1e-2)
  scanned, state, _ = train(tx, PARAMS, steps=20)
  params, s = PARAMS, tx.init(PARAMS)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(20):
    u, s = step(params, s)
    params = optax.apply_updates(params, u)
  # Fused (scan) and per-step compilations round the guard's eigensolvers differently.
  test_utils.assert_trees_all_close(scanned, params, rtol=2e-4, atol=1e-5)


def test_nnx_params_with_sharding_metadata():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, 'model'))
      self.conv = nnx.Conv(1, 4, (3, 3), kernel_init=nnx.with_partitioning(
          nnx.initializers.lecun_normal(), (None, None, None, 'model')), rngs=rngs)
      self.head = nnx.Linear(4, 2, kernel_init=init, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))

  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 1))
  y = jax.random.normal(jax.random.key(1), (16, 2))

  @nnx.jit
  def step(model, optimizer):
    value, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return value

  def train():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, fop_optax.fop(0.05), wrt=nnx.Param)
    losses = [float(step(model, optimizer)) for _ in range(60)]
    return losses, optimizer

  mesh = jax.make_mesh((1,), ('model',), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    losses, optimizer = train()
  assert losses[-1] < 0.8 * losses[0]
  # Same numbers as without any mesh (sharding annotations are layout only).
  with nnx.use_eager_sharding(False):
    plain_losses, _ = train()
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  spatial = [m for m in jax.tree.leaves(fop_optax.diagnostics.find_fop_state(
      optimizer.opt_state).preconditioners) if m.shape == (9, 9)]
  assert len(spatial) == 1
