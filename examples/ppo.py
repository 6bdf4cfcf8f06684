"""PPO with any optax optimiser: FOP on policy-gradient training (the paper's Figure 4).

A clean PPO (Schulman et al. 2017): actor and critic MLPs (Flax NNX, tanh, orthogonal init),
GAE, the clipped surrogate objective, a value loss and an entropy bonus, several epochs of
shuffled minibatches per rollout. The optimiser is picked by name (``--optimizers``):

* ``momentum`` -- SGD with heavy-ball momentum 0.9;  ``fop`` -- FOP + momentum 0.9;
* ``adam`` -- Adam;  ``fop_adam`` -- FOP + Adam;  ``shd`` -- S-HD (SGD-HD, one step size per
  leaf, momentum 0.9).

Every optimiser is chained after ``optax.clip_by_global_norm(0.5)`` (standard PPO).

Environments:

* gymnax ``CartPole-v1`` (default) and ``Pendulum-v1``: the rollout and the update are one
  ``jax.jit``-compiled function (``lax.scan`` over env steps, epochs and minibatches), vmapped
  over seeds, so all seeds of one optimiser train together.
* gymnasium ``BipedalWalker-v3`` (``pip install "gymnasium[box2d]"``): the paper's task, with a
  host-side rollout loop over a synchronous vector env (observations normalised, rewards
  scaled by gymnasium's wrappers); the PPO update is the same jitted function.

Metric, as in the paper's figure: per seed, the mean return of the episodes that finished in
each rollout, made best-so-far over updates; plotted as the median over seeds with a
bootstrapped 95% interval. Writes ``<out>/ppo_<env>.json`` and ``<out>/ppo_<env>.png``::

  python3 examples/ppo.py                                  # CartPole, 5 optimisers x 5 seeds
  python3 examples/ppo.py --env Pendulum-v1 --updates 300
  python3 examples/ppo.py --env BipedalWalker-v3 --seeds 3 --updates 30 --optimizers momentum,fop
  python3 examples/ppo.py --from-json results/ppo_CartPole-v1.json --out /tmp  # table + plot again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fop_optax

GYMNAX_ENVS = ('CartPole-v1', 'Pendulum-v1')
GYMNASIUM_ENVS = ('BipedalWalker-v3',)

# FOP's M is trained by Adam at this rate. The paper's 1e-4 is for ~60k steps of CIFAR-10; a
# PPO run here is a few thousand minibatch steps, at 1e-4 P hardly leaves the identity.
FOP_HYPER_LR = 1e-3
HD_HYPER_LR = None  # beta of S-HD: the default rule's own (rule='log'; docs/hd_rules.md)
MOMENTUM = 0.9

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'momentum': lambda lr: optax.sgd(lr, momentum=MOMENTUM),
    'fop': lambda lr: fop_optax.fop(lr, MOMENTUM, hyper_learning_rate=FOP_HYPER_LR),
    'adam': lambda lr: optax.adam(lr),
    'fop_adam': lambda lr: fop_optax.fop_adam(lr, hyper_learning_rate=FOP_HYPER_LR),
    'shd': lambda lr: fop_optax.sgd_hd(lr, HD_HYPER_LR, momentum=MOMENTUM),
}
LABELS = {'momentum': 'momentum', 'fop': 'FOP+momentum', 'adam': 'Adam',
          'fop_adam': 'FOP+Adam', 'shd': 'S-HD'}
# Default learning rates. CartPole: each optimiser's best of the sweep {3e-3, 1e-2, 3e-2, 1e-1}
# (SGD-type) / {3e-4, 1e-3, 3e-3, 1e-2} (Adam-type) by mean return over 100 updates, 3 seeds
# disjoint from the reported ones (docs/results_rl.md); every optimiser liked the top of its
# grid. Pendulum and BipedalWalker were not tuned: 1e-2 for SGD-type, 3e-4 for Adam-type.
DEFAULT_LR = {
    'CartPole-v1': {'momentum': 1e-1, 'fop': 1e-1, 'shd': 1e-1, 'adam': 1e-2, 'fop_adam': 1e-2},
    'Pendulum-v1': {'momentum': 1e-2, 'fop': 1e-2, 'shd': 1e-2, 'adam': 3e-4, 'fop_adam': 3e-4},
    'BipedalWalker-v3': {'momentum': 1e-2, 'fop': 1e-2, 'shd': 1e-2, 'adam': 3e-4,
                         'fop_adam': 3e-4},
}


def default_lr(env_name: str, optimizer: str) -> float:
  return DEFAULT_LR[env_name][optimizer]


@dataclasses.dataclass(frozen=True)
class Config:
  """PPO hyperparameters (PureJaxRL/CleanRL defaults for classic control)."""
  num_envs: int = 8
  num_steps: int = 128          # env steps per env per rollout
  epochs: int = 4
  minibatches: int = 4
  gamma: float = 0.99
  gae_lambda: float = 0.95
  clip_eps: float = 0.2
  vf_coef: float = 0.5
  ent_coef: float = 0.01
  max_grad_norm: float = 0.5
  hidden: int = 64
  reward_scale: float = 1.0     # multiplies rewards seen by the learner (not the reported return)


ENV_CONFIGS = {
    'CartPole-v1': Config(),
    'Pendulum-v1': Config(num_envs=16, num_steps=128, epochs=10, minibatches=8, ent_coef=0.0,
                          gae_lambda=0.9, reward_scale=0.1),
    'BipedalWalker-v3': Config(num_envs=16, num_steps=128, epochs=10, minibatches=8,
                               ent_coef=0.0),
}


# --------------------------------------------------------------------------- model

def _linear(n_in, n_out, scale, rngs):
  return nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.orthogonal(scale),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class ActorCritic(nnx.Module):
  """Separate tanh MLPs for the policy and the value; Gaussian policies learn a log-std."""

  def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int = 64, *,
               rngs: nnx.Rngs):
    self.discrete = discrete
    self.actor = nnx.List([_linear(obs_dim, hidden, np.sqrt(2), rngs),
                           _linear(hidden, hidden, np.sqrt(2), rngs),
                           _linear(hidden, act_dim, 0.01, rngs)])
    self.critic = nnx.List([_linear(obs_dim, hidden, np.sqrt(2), rngs),
                            _linear(hidden, hidden, np.sqrt(2), rngs),
                            _linear(hidden, 1, 1.0, rngs)])
    if not discrete:
      self.log_std = nnx.Param(jnp.zeros(act_dim))

  @staticmethod
  def _mlp(layers, x):
    for layer in layers[:-1]:
      x = jnp.tanh(layer(x))
    return layers[-1](x)

  def __call__(self, obs):
    """Returns ``(logits or Gaussian mean, value)``."""
    return self._mlp(self.actor, obs), self._mlp(self.critic, obs)[..., 0]


class Policy(NamedTuple):
  """Pure functions over a params pytree (``nnx.split``), so seeds can be vmapped."""
  graphdef: Any
  discrete: bool

  def apply(self, params, obs):
    model = nnx.merge(self.graphdef, params)
    out, value = model(obs)
    log_std = None if self.discrete else model.log_std[...]
    return out, log_std, value

  def log_prob_entropy(self, out, log_std, action):
    if self.discrete:
      logp_all = jax.nn.log_softmax(out)
      logp = jnp.take_along_axis(logp_all, action[..., None], -1)[..., 0]
      entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
      return logp, entropy
    z = (action - out) / jnp.exp(log_std)
    logp = (-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    entropy = jnp.broadcast_to((log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)).sum(-1),
                               logp.shape)
    return logp, entropy

  def sample(self, params, obs, key):
    out, log_std, value = self.apply(params, obs)
    if self.discrete:
      action = jax.random.categorical(key, out)
    else:
      action = out + jnp.exp(log_std) * jax.random.normal(key, out.shape)
    logp, _ = self.log_prob_entropy(out, log_std, action)
    return action, logp, value


def make_policy(obs_dim: int, act_dim: int, discrete: bool, hidden: int):
  """``(Policy, init(key) -> params)``."""
  def build(key):
    return ActorCritic(obs_dim, act_dim, discrete, hidden, rngs=nnx.Rngs(params=key))
  graphdef, _ = nnx.split(build(jax.random.key(0)))
  return Policy(graphdef, discrete), lambda key: nnx.split(build(key))[1]


# --------------------------------------------------------------------------- PPO update

class Batch(NamedTuple):
  obs: jax.Array
  action: jax.Array
  logp: jax.Array
  value: jax.Array
  reward: jax.Array      # already scaled, bootstrapped through truncations
  done: jax.Array        # episode ended after this step (terminated or truncated)


def gae(batch: Batch, last_value, gamma, lam):
  """Advantages and returns over a ``(T, N)`` rollout."""
  def step(carry, t):
    next_adv, next_value = carry
    reward, value, done = t
    nonterminal = 1.0 - done
    delta = reward + gamma * next_value * nonterminal - value
    adv = delta + gamma * lam * nonterminal * next_adv
    return (adv, value), adv
  _, adv = jax.lax.scan(step, (jnp.zeros_like(last_value), last_value),
                        (batch.reward, batch.value, batch.done), reverse=True)
  return adv, adv + batch.value


def make_update(policy: Policy, tx: optax.GradientTransformation, cfg: Config):
  """``update(params, opt_state, batch, last_value, key) -> (params, opt_state, losses)``."""

  def loss_fn(params, mb, adv, ret):
    out, log_std, value = policy.apply(params, mb.obs)
    logp, entropy = policy.log_prob_entropy(out, log_std, mb.action)
    ratio = jnp.exp(logp - mb.logp)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = -jnp.minimum(ratio * adv,
                           jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv).mean()
    v_clipped = mb.value + jnp.clip(value - mb.value, -cfg.clip_eps, cfg.clip_eps)
    v_loss = 0.5 * jnp.maximum((value - ret) ** 2, (v_clipped - ret) ** 2).mean()
    ent = entropy.mean()
    return pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent, (pg_loss, v_loss, ent)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def update(params, opt_state, batch: Batch, last_value, key):
    adv, ret = gae(batch, last_value, cfg.gamma, cfg.gae_lambda)
    n = batch.reward.size
    flat = jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), (batch, adv, ret))

    def epoch(carry, key):
      perm = jax.random.permutation(key, n)
      shuffled = jax.tree.map(
          lambda x: x[perm].reshape(cfg.minibatches, n // cfg.minibatches, *x.shape[1:]), flat)

      def minibatch(carry, mb):
        params, opt_state = carry
        grads, aux = grad_fn(params, *mb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), aux

      return jax.lax.scan(minibatch, carry, shuffled)

    (params, opt_state), aux = jax.lax.scan(
        epoch, (params, opt_state), jax.random.split(key, cfg.epochs))
    return params, opt_state, jax.tree.map(jnp.mean, aux)

  return update


def make_tx(name: str, lr: float, cfg: Config) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), OPTIMIZERS[name](lr))


# --------------------------------------------------------------------------- gymnax

class Runner(NamedTuple):
  params: Any
  opt_state: Any
  env_state: Any
  obs: jax.Array
  episode_return: jax.Array   # running undiscounted return per env
  key: jax.Array


def make_gymnax_trainer(env_name: str, tx: optax.GradientTransformation, cfg: Config):
  """``(init(key) -> Runner, run(Runner, n_updates) -> (Runner, metrics))``, pure and jit-able.

  ``metrics['return']`` is, per update, the mean return of the episodes that finished in that
  rollout (NaN if none did); ``metrics['episodes']`` how many finished.
  """
  import gymnax
  env, env_params = gymnax.make(env_name)
  space = env.action_space(env_params)
  discrete = not hasattr(space, 'low')
  obs_dim = int(np.prod(env.observation_space(env_params).shape))
  act_dim = int(space.n) if discrete else int(np.prod(space.shape))
  policy, init_params = make_policy(obs_dim, act_dim, discrete, cfg.hidden)
  update = make_update(policy, tx, cfg)
  reset = jax.vmap(env.reset, in_axes=(0, None))
  step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

  def init(key):
    k_params, k_env, key = jax.random.split(key, 3)
    params = init_params(k_params)
    obs, env_state = reset(jax.random.split(k_env, cfg.num_envs), env_params)
    return Runner(params, tx.init(params), env_state, obs, jnp.zeros(cfg.num_envs), key)

  def env_step(carry, _):
    params, env_state, obs, ep_ret, key = carry
    key, k_act, k_step = jax.random.split(key, 3)
    action, logp, value = policy.sample(params, obs, k_act)
    env_action = action if discrete else jnp.clip(action, space.low, space.high)
    obs2, env_state, reward, term, trunc, info = step(
        jax.random.split(k_step, cfg.num_envs), env_state, env_action, env_params)
    ep_ret = ep_ret + reward
    done = jnp.logical_or(term, trunc)
    out = (obs, action, logp, value, reward, term, trunc, done, info['final_observation'],
           jnp.where(done, ep_ret, 0.0))
    return (params, env_state, obs2, jnp.where(done, 0.0, ep_ret), key), out

  def one_update(runner: Runner, _):
    carry = (runner.params, runner.env_state, runner.obs, runner.episode_return, runner.key)
    (_, env_state, obs, ep_ret, key), traj = jax.lax.scan(
        env_step, carry, None, length=cfg.num_steps)
    (t_obs, action, logp, value, reward, term, trunc, done, final_obs, finished) = traj
    # A time-limit truncation is not a real end: bootstrap with V(final observation).
    _, _, final_value = policy.apply(runner.params, final_obs)
    truncated = jnp.logical_and(trunc, jnp.logical_not(term))
    reward = cfg.reward_scale * reward + cfg.gamma * truncated * final_value
    batch = Batch(t_obs, action, logp, value, reward, done.astype(jnp.float32))
    _, _, last_value = policy.apply(runner.params, obs)
    key, k_update = jax.random.split(key)
    params, opt_state, losses = update(runner.params, runner.opt_state, batch, last_value,
                                       k_update)
    n_done = done.sum()
    metrics = {'return': jnp.where(n_done > 0, finished.sum() / jnp.maximum(n_done, 1),
                                   jnp.nan),
               'episodes': n_done, 'pg_loss': losses[0], 'v_loss': losses[1],
               'entropy': losses[2]}
    return Runner(params, opt_state, env_state, obs, ep_ret, key), metrics

  def run(runner: Runner, n_updates: int):
    return jax.lax.scan(one_update, runner, None, length=n_updates)

  return init, run


def train_gymnax(env_name: str, optimizer: str, lr: float, seeds: int, updates: int,
                 cfg: Optional[Config] = None, seed0: int = 0, chunk: int = 10,
                 progress: bool = True) -> dict:
  """Trains ``seeds`` PPO agents at once (vmapped); returns per-seed curves as numpy arrays."""
  from tqdm.auto import tqdm
  cfg = cfg or ENV_CONFIGS[env_name]
  init, run = make_gymnax_trainer(env_name, make_tx(optimizer, lr, cfg), cfg)
  keys = jax.random.split(jax.random.key(seed0), seeds)
  # lax.map, not vmap: the orthogonal init's QR, batched over seeds, can deadlock
  # XLA:CPU's thread pool (see docs/troubleshooting.md); init runs once, so a loop costs nothing.
  runner = jax.jit(lambda keys: jax.lax.map(init, keys))(keys)
  run_chunk = jax.jit(jax.vmap(run, in_axes=(0, None)), static_argnums=1)
  chunks, start = [], time.perf_counter()
  bar = tqdm(total=updates, desc=f'{env_name} {optimizer} lr={lr:g}', disable=not progress)
  done = 0
  while done < updates:
    n = min(chunk, updates - done)
    runner, metrics = run_chunk(runner, n)
    metrics = jax.tree.map(np.asarray, metrics)  # waits for the chunk
    chunks.append(metrics)
    done += n
    bar.update(n)
    bar.set_postfix(ret=f'{np.nanmedian(metrics["return"][:, -1]):.1f}')
  bar.close()
  out = {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}
  out['seconds'] = time.perf_counter() - start
  out['steps_per_update'] = cfg.num_envs * cfg.num_steps
  return out


# --------------------------------------------------------------------------- gymnasium

class RunningNorm:
  """Running mean and variance (Welford over batches), as in gymnasium's normalising wrappers."""

  def __init__(self, shape=()):
    self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

  def update(self, x):
    mean, var, n = x.mean(0), x.var(0), x.shape[0]
    delta, total = mean - self.mean, self.count + n
    self.mean = self.mean + delta * n / total
    self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
    self.count = total


def train_gymnasium(env_name: str, optimizer: str, lr: float, seeds: int, updates: int,
                    cfg: Optional[Config] = None, seed0: int = 0, progress: bool = True) -> dict:
  """Host-side rollouts in a gymnasium vector env, jitted policy and PPO update; one seed at a
  time. Observations are normalised (running mean/std, clipped to ±10) and rewards divided by
  the running std of the discounted return, like gymnasium's ``NormalizeObservation`` and
  ``NormalizeReward`` (which refuse same-step autoreset, needed to bootstrap truncations);
  the reported returns are the raw ones."""
  import gymnasium as gym
  from gymnasium.wrappers import vector as vwrap
  from tqdm.auto import tqdm
  cfg = cfg or ENV_CONFIGS[env_name]
  tx = make_tx(optimizer, lr, cfg)
  probe = gym.make(env_name)
  obs_dim = int(np.prod(probe.observation_space.shape))
  act_dim = int(np.prod(probe.action_space.shape))
  probe.close()
  # Built once so the seeds share one compilation.
  policy, init_params = make_policy(obs_dim, act_dim, False, cfg.hidden)
  sample = jax.jit(policy.sample)
  value_fn = jax.jit(lambda p, o: policy.apply(p, o)[2])
  update = jax.jit(make_update(policy, tx, cfg))
  curves, start = [], time.perf_counter()
  for s in range(seeds):
    seed = seed0 + s
    envs = gym.make_vec(env_name, num_envs=cfg.num_envs, vectorization_mode='sync',
                        vector_kwargs={'autoreset_mode': gym.vector.AutoresetMode.SAME_STEP})
    envs = vwrap.RecordEpisodeStatistics(envs)
    envs = vwrap.ClipAction(envs)
    obs_norm, ret_norm = RunningNorm(envs.single_observation_space.shape), RunningNorm()
    disc_return = np.zeros(cfg.num_envs)
    normalize = lambda o: np.clip((o - obs_norm.mean) / np.sqrt(obs_norm.var + 1e-8), -10, 10)
    key = jax.random.key(seed)
    key, k_params = jax.random.split(key)
    params = init_params(k_params)
    opt_state = tx.init(params)
    raw_obs, _ = envs.reset(seed=seed)
    obs_norm.update(raw_obs)
    obs = normalize(raw_obs)
    curve = []
    bar = tqdm(range(updates), desc=f'{env_name} {optimizer} seed {seed}', disable=not progress)
    for _ in bar:
      buf = {k: [] for k in ('obs', 'action', 'logp', 'value', 'reward', 'done')}
      finished = []
      for _ in range(cfg.num_steps):
        key, k_act = jax.random.split(key)
        action, logp, value = jax.device_get(sample(params, obs, k_act))
        raw_next, reward, term, trunc, info = envs.step(action)
        done = np.logical_or(term, trunc)
        disc_return = disc_return * cfg.gamma + reward
        ret_norm.update(disc_return[:, None])
        disc_return[done] = 0.0
        reward = np.asarray(reward / np.sqrt(ret_norm.var[0] + 1e-8), np.float32)
        truncated = np.logical_and(trunc, np.logical_not(term))
        if truncated.any():  # bootstrap time-limit ends with V(final observation)
          final_obs = np.stack([o if t else raw_next[i]
                                for i, (o, t) in enumerate(zip(info['final_obs'], truncated))])
          final_value = np.asarray(value_fn(params, normalize(final_obs)))
          reward = reward + cfg.gamma * truncated * final_value
        if 'episode' in info:
          finished.extend(info['episode']['r'][info['_episode']].tolist())
        for k, v in zip(buf, (obs, action, logp, value, reward, done)):
          buf[k].append(np.asarray(v))
        obs_norm.update(raw_next)
        obs = normalize(raw_next)
      batch = Batch(*(jnp.asarray(np.stack(buf[k]), jnp.float32) for k in buf))
      last_value = value_fn(params, obs)
      key, k_update = jax.random.split(key)
      params, opt_state, _ = update(params, opt_state, batch, last_value, k_update)
      curve.append(np.mean(finished) if finished else np.nan)
      if finished:
        bar.set_postfix(ret=f'{curve[-1]:.1f}')
    envs.close()
    curves.append(curve)
  return {'return': np.asarray(curves, np.float64), 'seconds': time.perf_counter() - start,
          'steps_per_update': cfg.num_envs * cfg.num_steps}


# --------------------------------------------------------------------------- statistics

def best_so_far(returns: np.ndarray) -> np.ndarray:
  """Running max over updates (axis 1) of per-update returns; NaN until a first episode ends."""
  filled = np.where(np.isnan(returns), -np.inf, returns)
  out = np.maximum.accumulate(filled, axis=1)
  return np.where(np.isinf(out), np.nan, out)


def bootstrap_median(x: np.ndarray, n_boot: int = 2000, seed: int = 0):
  """Median over axis 0 and its percentile-bootstrap 95% interval (resampling seeds)."""
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float64)
  idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
  with warnings.catch_warnings():  # all-NaN columns (no episode finished yet) stay NaN
    warnings.simplefilter('ignore', RuntimeWarning)
    boots = np.nanmedian(x[idx], axis=1)
    return (np.nanmedian(x, axis=0), np.nanpercentile(boots, 2.5, axis=0),
            np.nanpercentile(boots, 97.5, axis=0))


def smooth_last(returns: np.ndarray, window: int) -> np.ndarray:
  """Per seed, the mean over the last ``window`` updates' returns (the policy's final level)."""
  return np.nanmean(returns[:, -window:], axis=1)


def summarize(runs: dict, window: int = 10) -> dict:
  table = {}
  for name, r in runs.items():
    ret = np.asarray(r['return'], np.float64)
    best = best_so_far(ret)[:, -1]
    last = smooth_last(ret, window)
    bm, blo, bhi = bootstrap_median(best)
    lm, llo, lhi = bootstrap_median(last)
    # Speed: the mean return over all updates (area under the learning curve).
    am, alo, ahi = bootstrap_median(np.nanmean(ret, axis=1))
    table[name] = {'best_median': float(bm), 'best_lo': float(blo), 'best_hi': float(bhi),
                   'final_median': float(lm), 'final_lo': float(llo), 'final_hi': float(lhi),
                   'auc_median': float(am), 'auc_lo': float(alo), 'auc_hi': float(ahi),
                   'lr': r['lr'], 'seconds': r['seconds'], 'seeds': int(ret.shape[0])}
  return table


def print_table(table: dict, window: int) -> str:
  """Medians over seeds with bootstrapped 95% intervals, as a markdown table."""
  lines = [f'| optimiser | lr | final best-so-far return | mean return, last {window} updates '
           f'| mean return, all updates | seeds | seconds |',
           '|---|---|---|---|---|---|---|']
  cell = lambda t, k: f'{t[k + "_median"]:.1f} [{t[k + "_lo"]:.1f}, {t[k + "_hi"]:.1f}]'
  for name, t in table.items():
    lines.append(f'| {LABELS[name]} | {t["lr"]:g} | {cell(t, "best")} | {cell(t, "final")} | '
                 f'{cell(t, "auc")} | {t["seeds"]} | {t["seconds"]:.0f} |')
  text = '\n'.join(lines)
  print(text, flush=True)
  return text


def plot(runs: dict, env_name: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if __package__:  # imported as examples.<name>; as a script, examples/ is on sys.path
    from examples import common
  else:
    import common
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in runs.items():
    ret = np.asarray(r['return'], np.float64)
    x = np.arange(1, ret.shape[1] + 1)
    for ax, curve in zip(axes, (best_so_far(ret), ret)):
      med, lo, hi = bootstrap_median(curve)
      line, = ax.plot(x, med, label=f'{LABELS[name]} (lr {r["lr"]:g})')
      ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
  seeds = np.asarray(next(iter(runs.values()))['return']).shape[0]
  axes[0].set_title(f'{env_name}: best-so-far episode return')
  axes[1].set_title(f'{env_name}: episode return per update')
  for ax in axes:
    ax.set_xlabel('PPO update')
    ax.set_ylabel(f'return (median of {seeds} seeds, 95% bootstrap CI)')
    ax.grid(alpha=0.3)
  axes[0].legend()
  common.save_figure(fig, path, dpi=120)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)):
    return _jsonable(x.tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


# --------------------------------------------------------------------------- main

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--env', default='CartPole-v1', choices=GYMNAX_ENVS + GYMNASIUM_ENVS)
  parser.add_argument('--optimizers', default='momentum,fop,adam,fop_adam,shd',
                      help='comma list of ' + ', '.join(OPTIMIZERS))
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--updates', type=int, default=None,
                      help='PPO updates (default 100 for gymnax envs, 20 for BipedalWalker)')
  parser.add_argument('--lr', type=float, nargs='+', default=None,
                      help='learning rate(s); one value for all optimisers, or one per '
                           'optimiser (default: DEFAULT_LR, per env and optimiser)')
  parser.add_argument('--window', type=int, default=10,
                      help='updates averaged for the "final" return')
  parser.add_argument('--seed', type=int, default=0, help='first seed')
  parser.add_argument('--out', default='results', help='folder for the JSON and PNG')
  parser.add_argument('--tag', default='', help='suffix for the output file names')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--from-json', metavar='PATH',
                      help='no training: redo the table and plot of a saved run')
  args = parser.parse_args(argv)

  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    runs = {n: {'return': np.array(r, np.float64).reshape(len(r), -1),  # None -> NaN
                'lr': saved['summary'][n]['lr'], 'seconds': saved['summary'][n]['seconds']}
            for n, r in saved['returns'].items()}
    print(f'{saved["env"]}, {saved["updates"]} PPO updates, {saved["seeds"]} seeds')
    print_table(summarize(runs, args.window), args.window)
    stem = os.path.join(args.out, os.path.splitext(os.path.basename(args.from_json))[0])
    plot(runs, saved['env'], stem + '.png')
    print(f'wrote {stem}.png')
    return saved

  names = [n.strip() for n in args.optimizers.split(',') if n.strip()]
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown:
    parser.error(f'unknown optimiser(s) {unknown}; choose from {list(OPTIMIZERS)}')
  if args.lr is None:
    lrs = [default_lr(args.env, n) for n in names]
  elif len(args.lr) == 1:
    lrs = args.lr * len(names)
  elif len(args.lr) == len(names):
    lrs = args.lr
  else:
    parser.error('--lr takes one value or one per optimiser')
  gymnax_env = args.env in GYMNAX_ENVS
  updates = args.updates or (100 if gymnax_env else 20)
  cfg = ENV_CONFIGS[args.env]

  runs = {}
  for name, lr in zip(names, lrs):
    if gymnax_env:
      r = train_gymnax(args.env, name, lr, args.seeds, updates, cfg, seed0=args.seed,
                       progress=not args.no_progress)
    else:
      r = train_gymnasium(args.env, name, lr, args.seeds, updates, cfg, seed0=args.seed,
                          progress=not args.no_progress)
    r['lr'] = lr
    runs[name] = r
    print(f'{LABELS[name]}: {r["seconds"]:.1f} s', flush=True)

  table = summarize(runs, args.window)
  print(f'\n{args.env}, {updates} PPO updates x {cfg.num_envs * cfg.num_steps} env steps, '
        f'{args.seeds} seeds')
  print_table(table, args.window)
  stem = os.path.join(args.out, f'ppo_{args.env}{args.tag}')
  result = {'env': args.env, 'updates': updates, 'seeds': args.seeds, 'config':
            dataclasses.asdict(cfg), 'fop_hyper_lr': FOP_HYPER_LR, 'hd_hyper_lr': HD_HYPER_LR,
            'momentum': MOMENTUM, 'window': args.window, 'summary': table,
            'returns': {n: r['return'] for n, r in runs.items()}}
  os.makedirs(args.out, exist_ok=True)
  with open(stem + '.json', 'w') as f:
    json.dump(_jsonable(result), f)
  plot(runs, args.env, stem + '.png')
  print(f'wrote {stem}.json and {stem}.png')
  return result


if __name__ == '__main__':
  main()
