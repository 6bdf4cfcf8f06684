"""PPO with FOP on gymnax CartPole learns: a few jitted updates beat a random policy.

Cheap on purpose (one compile, one seed, ~20k env steps); the long multi-seed comparisons
live in ``examples/ppo.py`` and docs/results_rl.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip('gymnax')  # fallback only: the test extra installs gymnax

from examples import ppo  # noqa: E402

import fop_optax  # noqa: E402

ENV = 'CartPole-v1'


def random_policy_return(num_envs=16, steps=500, seed=0):
  """Mean return of the CartPole episodes a uniformly random policy finishes."""
  import gymnax
  env, params = gymnax.make(ENV)
  keys = jax.random.split(jax.random.key(seed), num_envs)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)

  def step(carry, key):
    state, ep_ret = carry
    k_act, k_step = jax.random.split(key)
    action = jax.random.randint(k_act, (num_envs,), 0, 2)
    _, state, reward, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
        jax.random.split(k_step, num_envs), state, action, params)
    ep_ret = ep_ret + reward
    done = jnp.logical_or(term, trunc)
    return (state, jnp.where(done, 0.0, ep_ret)), (jnp.where(done, ep_ret, 0.0), done)

  _, (finished, done) = jax.lax.scan(
      jax.jit(step), (state, jnp.zeros(num_envs)), jax.random.split(jax.random.key(seed + 1),
                                                                     steps))
  return float(finished.sum() / done.sum())


def test_ppo_with_fop_beats_random_policy():
  random_return = random_policy_return()
  assert 15 < random_return < 40  # CartPole's random policy lasts ~22 steps

  cfg = ppo.ENV_CONFIGS[ENV]
  # A modest rate: learning must not hinge on tuning. FOP's defaults, the guard included.
  tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                   fop_optax.fop(1e-2, ppo.MOMENTUM, hyper_learning_rate=ppo.FOP_HYPER_LR))
  init, run = ppo.make_gymnax_trainer(ENV, tx, cfg)
  # lax.map over seeds: a QR (the orthogonal init) batched by vmap can deadlock XLA:CPU.
  runner = jax.jit(lambda keys: jax.lax.map(init, keys))(jax.random.split(jax.random.key(0), 2))
  runner, metrics = jax.jit(jax.vmap(run, in_axes=(0, None)), static_argnums=1)(runner, 12)
  returns = np.asarray(metrics['return'])  # (seeds, updates)
  assert np.isfinite(returns[:, -3:]).all()
  trained = float(returns[:, -3:].mean())
  assert trained > 3 * random_return, (trained, random_return)

  # The preconditioners did learn: P is no longer the identity it starts as.
  start = fop_optax.diagnostics.find_fop_state(jax.vmap(tx.init)(runner.params))
  end = fop_optax.diagnostics.find_fop_state(runner.opt_state)
  moved = [float(jnp.abs(a - b).max())
           for a, b in zip(jax.tree.leaves(start.preconditioners),
                           jax.tree.leaves(end.preconditioners))]
  assert max(moved) > 1e-3
