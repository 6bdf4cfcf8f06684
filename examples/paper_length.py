"""The FOP paper's protocol at full length on CPU, over seeds in one compiled step, resumable.

Moskovitz et al. (2019, arXiv:1910.08461): batch 128, learning rate 0.05, momentum 0.9, the base
learning rate divided by 10 at 80/150 of training, FOP's ``M`` learned by Adam with rate 1e-4.
Here on Fashion-MNIST (the examples' MLP 784-256-256-10, or a narrow All-CNN-style CNN), for
momentum, FOP, FOP-norm, S-HD, PP-HD, Adam and FOP+Adam (:func:`common.make_optimizer`).

* The decay is an optax schedule passed as the learning rate, so FOP's own ``η`` (in its
  hypergradient) sees the same schedule. Adam and FOP+Adam use :data:`common.ADAM_LR` with the
  same ÷10. S-HD/PP-HD learn their step size and take only a number, so their update is
  multiplied by the same ÷10 factor (``optax.scale_by_schedule`` after them; their
  hypergradient does not see it).
* All seeds of one optimiser share one compiled step: params and optimiser state carry a
  leading seed axis and the step is ``jax.vmap``-ed (``--seed-axis unroll``, the CNN's default:
  one call per seed unrolled in the same compiled step, since XLA:CPU runs vmapped
  convolutions slower than separate ones). Seed ``s`` initialises the model with
  ``nnx.Rngs(s)`` and orders the data of epoch ``e`` by ``np.random.default_rng([s, e])``, so
  the order is recomputable from ``(s, e)`` on a resume.
* After every epoch (``n_train // 128`` steps; the last partial batch is dropped) and at the end:
  test accuracy and loss on the whole test set, the epoch's mean train loss, the learning rate of
  its last step, wall seconds, and for FOP variants ``λ_max`` and the mean eigenvalue of each
  preconditioned leaf's ``P`` (:func:`fop_optax.diagnostics.spectra`), per seed.
* ``<out>/<optimizer>.json`` holds the history, the config, ``sys.argv``, the jax version and
  the machine; ``"done": true`` once finished, and a rerun skips it.
* Orbax checkpoints every ``--ckpt-every`` steps (default 10 epochs) under
  ``<out>/ckpt/<optimizer>/``: params, optimiser state, step and the history so far. A rerun
  with the same config resumes from the latest one and ends bit-identical to an uninterrupted
  run (``tests/test_paper_length.py``); ``--stop-after K`` stops (and checkpoints) after step
  ``K``. A checkpoint from another config is refused.

The full runs (default ``--steps 58000``, ≈124 epochs; seeds 0 and 1)::

  python3 examples/paper_length.py --model mlp --seeds 2 \\
      --optimizers momentum,fop,fop_norm,shd,pphd,adam,fop_adam --out results/paper_length_mlp \\
      --plot results/paper_length_mlp/curves.png
  python3 examples/paper_length.py --model cnn --seeds 2 \\
      --optimizers momentum,fop,fop_norm,shd,pphd,adam,fop_adam --out results/paper_length_cnn \\
      --plot results/paper_length_cnn/curves.png

  # the CNN at full length on 2 CPU cores: 14x14 inputs (--input-pool 2), widths 8, 16
  python3 examples/paper_length.py --model cnn --cnn-widths 8,16 --input-pool 2 --seeds 2 \\
      --optimizers momentum,fop,fop_norm,adam,fop_adam,shd,pphd --out results/paper_length_cnn14

Interrupt them at any time and rerun the same command to continue. ``--plot PATH`` alone with
an existing ``--out`` redraws the figure from the JSON files (``--steps 0`` trains nothing).

Time (measured on 2 CPU cores shared with other work, load 3-7, jax 0.10.2; full-run figures
are EXTRAPOLATIONS from 150 timed steps after 20 warm-up steps, plus one 2-epoch run on the full
data). MLP, batch 128, both seeds in one vmapped step, ms per step:

  =========  ========  ===  ========  ====  =====  ====  ========
  optimiser  momentum  FOP  FOP-norm  S-HD  PP-HD  Adam  FOP+Adam
  ms/step    3.6       13   13        5.9   8.9    6.7   15
  58k steps  6 min     15   15        8     11     9     16 min
  =========  ========  ===  ========  ====  =====  ====  ========

The full-run row adds the measured ~2.3 ms/step of data gathering, dispatch and the per-epoch
evaluation on 10k (a 2-epoch run on all 60k: 2.7 s/epoch for momentum, 7.2 s for FOP): about
80 minutes for all seven. The CNN (widths 16, 32; ``--seed-axis unroll``, its default) took
~100 ms per step per seed at load 3.5 (~270 ms for both seeds at load 7): roughly 3-4 h per
optimiser, a day for all seven, plus ~5 s per epoch of evaluation.
``--learned PNG`` (with ``--steps 0`` and the run's ``--out``) prints what the FOP variants'
last checkpoints hold: per seed and leaf the eigenvalue range of ``P``, its distance from ``I``
and, for 3×3 convolutions, the mean entry per tap relation (the paper's Figure 5: whitening?),
and saves ``P − I`` of the spatial leaves.
``--smoke`` is a tiny config (momentum and FOP, 512 examples, 24 steps): ~30 s, mostly
compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

# One OpenBLAS thread (set before numpy/jax load it; an explicit setting wins). jaxlib's CPU
# eigh/Cholesky call scipy's OpenBLAS, whose worker threads stall when the cores are busy: FOP's
# guard step on the MLP took ~165 ms instead of ~5 ms on 2 shared cores (load 3).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

if __package__:  # imported as examples.paper_length (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/paper_length.py has examples/ on sys.path
  import common  # noqa: E402

import fop_optax  # noqa: E402

FOP_VARIANTS = ('fop', 'fop_norm', 'fop_adam', *common.FOP_ARMS)
ALL_OPTIMIZERS = ('momentum', 'fop', 'fop_norm', 'shd', 'pphd', 'adam', 'fop_adam')
# issue 28's faithful arms (the paper's hyper-optimiser, each bound): run only when named
KNOWN_OPTIMIZERS = (*ALL_OPTIMIZERS, *common.FOP_ARMS)
HD_VARIANTS = ('shd', 'pphd')


# --------------------------------------------------------------------------- set-up

def decay_step(steps: int, decay_at: float) -> int:
  """The first (0-based) step that uses the decayed rate: ``round(decay_at · steps)``."""
  return int(round(decay_at * steps))


def lr_schedule(base: float, steps: int, decay_at: float, factor: float = 0.1) -> optax.Schedule:
  """``base`` for steps ``< decay_step``, ``base · factor`` from there on."""
  return optax.piecewise_constant_schedule(base, {decay_step(steps, decay_at): factor})


def build_optimizer(name: str, config: dict) -> optax.GradientTransformation:
  """``name`` from :func:`common.make_optimizer` with the paper's step decay."""
  steps, at, factor = config['steps'], config['decay_at'], config['decay_factor']
  if name in ('shd', 'pphd'):
    # α_0 must be a number: scale the learned step by the same factor.
    return optax.chain(common.make_optimizer(name, config['lr'], config['momentum']),
                       optax.scale_by_schedule(lr_schedule(1.0, steps, at, factor)))
  return common.make_optimizer(
      name, lr_schedule(config['lr'], steps, at, factor), config['momentum'],
      fop_hyper_lr=config['hyper_lr'],
      adam_learning_rate=lr_schedule(config['adam_lr'], steps, at, factor))


def base_lr(name: str, config: dict) -> float:
  return config['adam_lr'] if name in ('adam', 'fop_adam') else config['lr']


def _graph(model_fn: Callable[[Any], nnx.Module]):
  """``(graphdef, template)``: the model's graph and a Param state to fill with pure dicts."""
  graphdef, template = nnx.split(model_fn(0), nnx.Param)
  return graphdef, template


def _apply(graphdef, template, params, x):
  state = jax.tree.map(lambda v: v, template)  # a fresh copy to fill
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(x)


def params_initializer(model_fn):
  """``init(seeds)``: per-seed params as pure dicts with a leading seed axis (vmapped)."""
  # nnx.Rngs(k) with a typed key is nnx.Rngs(seed) for k = jax.random.key(seed).
  init = lambda s: nnx.to_pure_dict(nnx.state(model_fn(jax.random.key(s)), nnx.Param))
  init = jax.jit(jax.vmap(init))
  return lambda seeds: init(jnp.asarray(seeds, jnp.int32))


def over_seeds(fn: Callable, how: str, in_axes: Sequence[int | None]) -> Callable:
  """``fn`` mapped over a leading seed axis of the arguments whose ``in_axes`` is 0.

  ``'vmap'``: ``jax.vmap``. ``'unroll'``: one call per seed, unrolled in the traced program
  (still one compiled function), outputs stacked: XLA:CPU runs a vmapped convolution (its
  batched kernel becomes a grouped convolution) slower than the convolutions one by one.
  """
  if how == 'vmap':
    return jax.vmap(fn, in_axes=tuple(in_axes))
  if how != 'unroll':
    raise ValueError(f'unknown seed axis {how!r}; expected vmap or unroll')

  def unrolled(*args):
    n = jax.tree.leaves(args[in_axes.index(0)])[0].shape[0]
    outs = [fn(*(a if ax is None else jax.tree.map(lambda x: x[i], a)
                 for a, ax in zip(args, in_axes))) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return unrolled


class Runner:
  """One optimiser's compiled functions over seeds: train step, evaluation, spectra."""

  def __init__(self, name: str, config: dict, model_fn):
    self.name = name
    self.tx = build_optimizer(name, config)
    graphdef, template = _graph(model_fn)
    apply = lambda p, x: _apply(graphdef, template, p, x)
    tx = self.tx

    def loss_fn(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    def step(p, s, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    def eval_batch(p, x, y, mask):
      logits = apply(p, x)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return (losses * mask).sum(), ((logits.argmax(-1) == y) * mask).sum()

    self.init_params = params_initializer(model_fn)
    how = config['seed_axis']
    self.init_state = jax.jit(over_seeds(tx.init, how, (0,)))
    self.step = jax.jit(over_seeds(step, how, (0, 0, 0, 0)), donate_argnums=(0, 1))
    self.eval_batch = jax.jit(over_seeds(eval_batch, how, (0, None, None, None)))
    self.spectra = None
    if name in FOP_VARIANTS:
      rule = common.fop_arm_rule(name)

      def spectra(s, p):
        tree = fop_optax.diagnostics.spectra(s, p, **rule)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): (ev[0], ev.mean(), ev[-1]) for k, ev in flat}
      self.spectra = jax.jit(over_seeds(spectra, how, (0, 0)))
    self.rates = None
    if name in HD_VARIANTS:
      def rates(s):  # the learned step sizes α: median, min, max over all of them
        learned_rates = optax.tree.get(s, 'learning_rates')   # HypergradientState's field
        alpha = jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(learned_rates)])
        return jnp.median(alpha), alpha.min(), alpha.max()
      self.rates = jax.jit(over_seeds(rates, how, (0,)))

  def evaluate(self, params, x, y, batch_size: int = 1000):
    """Per-seed mean loss and accuracy over ``(x, y)`` (last batch padded: one shape)."""
    loss, correct = 0.0, 0.0
    for xb, yb, mask in common.padded_batches(x, y, batch_size):
      l, c = self.eval_batch(params, xb, yb, mask)
      loss, correct = loss + np.asarray(l, np.float64), correct + np.asarray(c, np.float64)
    return loss / len(x), correct / len(x)


# The compiled functions depend on the config but not on the seeds (a new seed count only adds a
# trace): in-process reruns (tests, notebooks) reuse them instead of compiling again.
_RUNNERS: dict[str, Runner] = {}


def get_runner(name: str, config: dict, model_fn) -> Runner:
  """A cached :class:`Runner` for ``name`` and ``config`` (its seeds aside)."""
  key = json.dumps([name, {k: v for k, v in config.items() if k != 'seeds'}], sort_keys=True)
  if key not in _RUNNERS:
    _RUNNERS[key] = Runner(name, config, model_fn)
  return _RUNNERS[key]


# --------------------------------------------------------------------------- records

def _machine() -> dict:
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'python': platform.python_version(), 'cpu_count': os.cpu_count(),
          'devices': [str(d) for d in jax.devices()]}


def _new_history(seeds: Sequence[int], fop: bool, hd: bool = False) -> dict:
  per_seed = {'seed': None, 'test_accuracy': [], 'test_loss': [], 'train_loss': []}
  if fop:
    per_seed.update(lambda_max={}, lambda_mean={}, lambda_min={})
  if hd:   # S-HD / PP-HD: the learned step size α (median, min, max over its entries)
    per_seed.update(alpha_median=[], alpha_min=[], alpha_max=[])
  return {'step': [], 'epoch': [], 'lr': [], 'wall_seconds': [],
          'seeds': [dict(json.loads(json.dumps(per_seed)), seed=s) for s in seeds]}


def _add_missing_series(history: dict, fresh: dict) -> None:
  """Gives a resumed history the per-seed series that its run did not log yet.

  A checkpoint written before a series was logged (S-HD's α before session 6) resumes with
  that series padded by ``None`` for the evaluations it missed, so every series stays aligned
  with ``history['step']``.
  """
  done = len(history['step'])
  for h, new in zip(history['seeds'], fresh['seeds']):
    for key, empty in new.items():
      if key not in h:
        h[key] = [None] * done if isinstance(empty, list) else empty


def _record(path: str, name: str, config: dict, history: dict, step: int, done: bool,
            argv: Sequence[str]) -> dict:
  record = {'optimizer': name, 'label': common.LABELS[name], 'done': done, 'step': step,
            'decay_step': decay_step(config['steps'], config['decay_at']),
            'config': config, 'argv': list(argv), 'jax_version': jax.__version__,
            'machine': _machine(), 'history': history}
  _write_json(record, path)
  return record


def _write_json(obj, path: str) -> None:
  # Not common.save_json: it drops 'model' and 'optimizer' keys. Written to a temporary file
  # first, so an interrupted write leaves the previous record.
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


# --------------------------------------------------------------------------- checkpoints

def _manager(directory: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _save(manager, step: int, params, opt_state, meta: dict) -> None:
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'params': params, 'opt_state': opt_state}),
      meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def _restore(manager, step: int, params, opt_state):
  import orbax.checkpoint as ocp
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {'params': params,
                                                         'opt_state': opt_state})
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  # Uncommitted copies (bit for bit): committed arrays would compile the step again.
  state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), out['state'])
  return state['params'], state['opt_state'], out['meta']


# --------------------------------------------------------------------------- training

def run_optimizer(name: str, config: dict, data, model_fn, out: str, *, ckpt_every: int,
                  stop_after: int | None = None, argv: Sequence[str] = (),
                  progress: bool = True) -> dict:
  """Trains (or resumes) all seeds of ``name``; returns ``{'record', 'params', 'opt_state'}``."""
  x_train, y_train, x_test, y_test = data
  seeds = config['seeds']
  bs, total = config['batch_size'], config['steps']
  steps_per_epoch = len(x_train) // bs
  if steps_per_epoch == 0:
    raise ValueError(f'batch size {bs} exceeds the {len(x_train)} training examples')
  json_path = os.path.join(out, f'{name}.json')
  runner = get_runner(name, config, model_fn)
  schedule = lr_schedule(base_lr(name, config), total, config['decay_at'],
                         config['decay_factor'])
  params = runner.init_params(seeds)
  opt_state = runner.init_state(params)
  history = _new_history(seeds, runner.spectra is not None, runner.rates is not None)
  step, epoch_losses, wall = 0, [], 0.0
  manager = _manager(os.path.join(out, 'ckpt', name))
  latest = manager.latest_step()
  if latest is not None:
    params, opt_state, meta = _restore(manager, latest, params, opt_state)
    if meta['config'] != config:
      raise SystemExit(
          f'{manager.directory}: its checkpoint was written with another config '
          f'({meta["config"]}, now {config}); use another --out or delete it')
    step, history, epoch_losses, wall = (meta['step'], meta['history'], meta['epoch_losses'],
                                         meta['wall_seconds'])
    epoch_losses = [np.asarray(l, np.float32) for l in epoch_losses]
    _add_missing_series(history, _new_history(seeds, runner.spectra is not None,
                                              runner.rates is not None))
    print(f'{name}: resumed at step {step} from {manager.directory}', flush=True)

  def save():
    meta = {'config': config, 'step': step, 'history': history, 'wall_seconds': wall,
            'epoch_losses': [np.asarray(l).tolist() for l in epoch_losses]}
    _save(manager, step, params, opt_state, meta)
    _record(json_path, name, config, history, step, step >= total, argv)

  perm_epoch, perms = None, None
  t0 = time.perf_counter() - wall
  while step < total and (stop_after is None or step < stop_after):
    epoch, i = divmod(step, steps_per_epoch)
    if perm_epoch != epoch:
      perms = np.stack([np.random.default_rng([s, epoch]).permutation(len(x_train))
                        for s in seeds])
      perm_epoch = epoch
    idx = perms[:, i * bs:(i + 1) * bs]
    params, opt_state, loss = runner.step(params, opt_state, x_train[idx], y_train[idx])
    epoch_losses.append(loss)
    step += 1
    if step % steps_per_epoch == 0 or step == total:
      losses = np.stack([np.asarray(l, np.float32) for l in epoch_losses])  # (steps, seeds)
      test_loss, test_acc = runner.evaluate(params, x_test, y_test)
      spectra = runner.spectra(opt_state, params) if runner.spectra else {}
      rates = [np.asarray(r) for r in runner.rates(opt_state)] if runner.rates else None
      wall = time.perf_counter() - t0
      history['step'].append(step)
      history['epoch'].append(step / steps_per_epoch)
      history['lr'].append(float(schedule(step - 1)))
      history['wall_seconds'].append(wall)
      for k, h in enumerate(history['seeds']):
        h['train_loss'].append(float(losses[:, k].astype(np.float64).mean()))
        h['test_loss'].append(float(test_loss[k]))
        h['test_accuracy'].append(float(test_acc[k]))
        for leaf, (lam_max, lam_mean, lam_min) in spectra.items():
          h['lambda_max'].setdefault(leaf, []).append(float(lam_max[k]))
          h['lambda_mean'].setdefault(leaf, []).append(float(lam_mean[k]))
          h['lambda_min'].setdefault(leaf, []).append(float(lam_min[k]))
        if rates is not None:
          for key, r in zip(('alpha_median', 'alpha_min', 'alpha_max'), rates):
            h[key].append(float(r[k]))
      epoch_losses = []
      if progress:
        if rates is not None:
          top = f' median α {float(np.median(rates[0])):.3g}'
        elif spectra:
          top = f' max λ_max(P) {max(float(np.max(v[0])) for v in spectra.values()):.3f}'
        else:
          top = ''
        print(f'{name} step {step}/{total} (epoch {step / steps_per_epoch:.1f}): train loss '
              f'{np.mean(losses):.4f} test acc {np.mean(test_acc):.4f} '
              f'[{np.min(test_acc):.4f}–{np.max(test_acc):.4f}] lr {history["lr"][-1]:.3g}'
              f'{top} ({wall:.0f}s)', flush=True)
    if step % ckpt_every == 0 or step == total or step == stop_after:
      wall = time.perf_counter() - t0
      save()
  if step == 0:  # nothing trained (--steps 0): no checkpoint, no record
    manager.close()
    return {'record': None, 'params': params, 'opt_state': opt_state}
  manager.close()
  record = _record(json_path, name, config, history, step, step >= total, argv)
  return {'record': record, 'params': params, 'opt_state': opt_state}


# --------------------------------------------------------------------------- learned P

def learned(out: str, names: Sequence[str] | None = None, data_dir: str | None = None,
            plot_path: str | None = None) -> str:
  """What the FOP variants under ``out`` learned (the paper's Figure 5 at full length).

  Restores each variant's latest checkpoint and, per seed and preconditioned leaf, reads ``P``
  (:func:`fop_optax.diagnostics.preconditioner_matrices`): its eigenvalue range, how far it is
  from ``I``, and for the 3×3 convolutions' 9×9 spatial ``P`` the mean entry per tap relation
  (``what_fop_learns.pattern``; whitening = positive diagonal and negative 4-neighbour
  entries). Returns a markdown table; ``plot_path`` saves ``P − I`` of seed 0's spatial leaves.
  """
  if __package__:  # imported as examples.<name>; as a script, examples/ is on sys.path
    from examples import what_fop_learns
  else:
    import what_fop_learns
  rows, panels, shapes = [], [], {}
  for rec in _records(out, [n for n in (names or FOP_VARIANTS) if n in FOP_VARIANTS]):
    name, config = rec['optimizer'], rec['config']
    key = (config['dataset'], config.get('input_pool', 1))
    if key not in shapes:   # (input shape, classes), from one load per dataset and pooling
      _, y, x, _ = common.pool_images(common.load_dataset(key[0], data_dir), key[1])
      shapes[key] = (x.shape[1:], int(y.max()) + 1)
    model_fn = common.make_model(config['model'], *shapes[key], cnn_widths=config['cnn_widths'])
    runner = get_runner(name, config, model_fn)
    params = runner.init_params(config['seeds'])
    opt_state = runner.init_state(params)
    manager = _manager(os.path.join(out, 'ckpt', name))
    step = manager.latest_step()
    if step is None:
      manager.close()
      continue
    params, opt_state, _ = _restore(manager, step, params, opt_state)
    manager.close()
    rule = common.fop_arm_rule(name)
    for k, seed in enumerate(config['seeds']):
      at = lambda t: jax.tree.map(lambda v: v[k], t)
      mats = what_fop_learns.named(fop_optax.diagnostics.preconditioner_matrices(
          at(opt_state), at(params), **rule))
      for leaf, p in mats.items():
        if p.ndim != 2 or p.shape[0] != p.shape[1] or len(p) == 1:  # (1×1 convs: a scalar)
          continue
        ev = np.linalg.eigvalsh(p.astype(np.float64))
        dev = float(np.abs(p - np.eye(len(p))).max())
        cells = [rec['label'], str(seed), str(step), leaf, f'{len(p)}×{len(p)}',
                 f'{ev[0]:.4f}', f'{ev[-1]:.4f}', f'{dev:.2e}']
        if len(p) == 9:
          pat = what_fop_learns.pattern(p)
          cells += [f"{pat['diagonal']:.4f}", f"{pat['neighbour']:+.1e}", f"{pat['others']:+.1e}",
                    'yes' if pat['whitening'] else 'no']
          if k == 0:
            panels.append((f"{rec['label']} {leaf}", p - np.eye(9)))
        else:
          cells += ['–'] * 4
        rows.append('| ' + ' | '.join(cells) + ' |')
  head = ['| optimiser | seed | step | leaf | P | λ_min | λ_max | max abs(P − I) | mean diag | '
          'mean 4-neighbour | mean other off-diag | whitening |', '|' + '---|' * 12]
  if plot_path and panels:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
    for ax, (title, d) in zip(axes[0], panels):
      lim = float(np.abs(d).max()) or 1.0
      im = ax.imshow(d, cmap='RdBu_r', vmin=-lim, vmax=lim)
      ax.set_title(title, fontsize=8)
      ax.set_xticks([]), ax.set_yticks([])
      fig.colorbar(im, ax=ax, fraction=0.046, format='%.0e')
    fig.suptitle('P − I of the 3×3 convolutions (9×9 spatial P), seed 0, last checkpoint',
                 fontsize=9)
    common.save_figure(fig, plot_path)
  return '\n'.join(head + rows)


# --------------------------------------------------------------------------- plot

def _records(out: str, names: Sequence[str] | None = None):
  """The JSON records under ``out`` of ``names`` (default: every optimiser with one), in order."""
  for name in names or KNOWN_OPTIMIZERS:
    path = os.path.join(out, f'{name}.json')
    if os.path.exists(path):
      with open(path) as f:
        yield json.load(f)


def plot(out: str, path: str, names: Sequence[str] | None = None) -> None:
  """Test accuracy vs step (median over seeds, min–max band); λ_max(P) and the mean eigenvalue of
  P per leaf of the FOP variants."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  title, decay = '', None
  for rec in _records(out, names):
    hist, cfg = rec['history'], rec['config']
    decay = rec['decay_step']
    shape = (f' {cfg["cnn_widths"]}' if cfg.get('cnn_widths') else '') + (
        f', images pooled {cfg["input_pool"]}×' if cfg.get('input_pool', 1) > 1 else '')
    title = f'{cfg["dataset"]} {cfg["model"]}{shape}, batch {cfg["batch_size"]}, lr {cfg["lr"]}'
    steps = np.asarray(hist['step'])
    acc = np.array([h['test_accuracy'] for h in hist['seeds']], dtype=float)
    line, = axes[0].plot(steps, np.median(acc, 0), label=rec['label'] + ('' if rec['done']
                                                                         else ' (running)'))
    axes[0].fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    if 'lambda_max' in hist['seeds'][0]:
      for j, leaf in enumerate(hist['seeds'][0]['lambda_max']):
        for key, ls in (('lambda_max', '-'), ('lambda_mean', '--')):
          lam = np.array([h[key][leaf] for h in hist['seeds']], dtype=float)
          axes[1].plot(steps, np.median(lam, 0), color=line.get_color(), lw=1, alpha=0.8, ls=ls,
                       label=rec['label'] if j == 0 and ls == '-' else None)
  for ax in axes:
    if decay is not None:
      ax.axvline(decay, color='k', ls=':', lw=1)
  axes[0].set(xlabel='step', ylabel='test accuracy', title=title)
  axes[0].legend(fontsize=8)
  axes[1].ticklabel_format(axis='y', useOffset=False)
  axes[1].set(xlabel='step', ylabel='eigenvalue of P per leaf (median over seeds)',
              title='FOP variants: λ_max (solid) and mean eigenvalue (dashed) of each P')
  if axes[1].get_legend_handles_labels()[0]:
    axes[1].legend(fontsize=8)
  common.save_figure(fig, path)


def summary(out: str, names: Sequence[str] | None = None, target: float = 0.89) -> str:
  """A markdown table of the JSON files under ``out``: mean ± std over seeds.

  Columns: final test accuracy and loss, the best test accuracy of any epoch, the accuracy at
  the epoch before the learning-rate decay, the first step whose test accuracy reaches
  ``target`` (median over seeds; '–' if a seed never does), the final train loss, and for FOP
  variants the largest ``λ_max(P)`` and smallest mean eigenvalue over the leaves at the end,
  for S-HD/PP-HD the median learned step size ``α`` at the end (mean over seeds).
  """
  ms = lambda a: f'{np.mean(a):.4f} ± {np.std(a):.4f}'
  lines = ['| optimiser | seeds | steps | final test acc | final test loss | best test acc | '
           f'acc before decay | steps to {target} | final train loss | λ_max(P) end | '
           'mean eig(P) end | median α end | wall min |', '|' + '---|' * 13]
  for rec in _records(out, names):
    hist = rec['history']
    steps = np.asarray(hist['step'])
    acc = np.array([h['test_accuracy'] for h in hist['seeds']], dtype=float)
    loss = np.array([h['test_loss'] for h in hist['seeds']], dtype=float)
    train = np.array([h['train_loss'] for h in hist['seeds']], dtype=float)
    before = np.searchsorted(steps, rec['decay_step'], side='right') - 1
    hits = [steps[np.argmax(a >= target)] if (a >= target).any() else None for a in acc]
    hit = '–' if None in hits else f'{int(np.median(hits))}'
    lam = mean_eig = alpha = '–'
    if 'alpha_median' in hist['seeds'][0]:
      alpha = f"{np.mean([h['alpha_median'][-1] for h in hist['seeds']]):.3g}"
    if 'lambda_max' in hist['seeds'][0]:
      lam = f"{max(max(h['lambda_max'][k][-1] for k in h['lambda_max']) for h in hist['seeds']):.4f}"
      mean_eig = f"{min(min(h['lambda_mean'][k][-1] for k in h['lambda_mean']) for h in hist['seeds']):.4f}"
    lines.append(
        f"| {rec['label']}{'' if rec['done'] else ' (running)'} | {acc.shape[0]} | {int(steps[-1])} | "
        f'{ms(acc[:, -1])} | {ms(loss[:, -1])} | {ms(acc.max(1))} | '
        f"{ms(acc[:, before]) if before >= 0 else '–'} | {hit} | {ms(train[:, -1])} | {lam} | "
        f"{mean_eig} | {alpha} | {hist['wall_seconds'][-1] / 60:.1f} |")
  return '\n'.join(lines)


def paired(out: str, base: str = 'momentum', names: Sequence[str] | None = None) -> str:
  """A markdown table of each optimiser's final test accuracy against ``base``'s, paired by seed.

  Seeds are paired (the same seed initialises the model and orders the data for every
  optimiser), so the difference is taken per seed first. Mean ± *sample* std (``ddof=1``) over
  the seeds both finished, and the 95% confidence interval of the mean paired difference from
  Student's t with ``n − 1`` degrees of freedom; for FOP variants the largest ``λ_max`` and the
  smallest ``λ_min`` of any leaf's ``P`` at the end (over seeds). An interval that excludes 0 is
  marked ``*``. Runs not yet finished are left out.
  """
  from scipy import stats   # scikit-learn's dependency, in the examples extra
  records = {rec['optimizer']: rec for rec in _records(out, names) if rec['done']}
  if base not in records:
    return f'(no finished {base} run under {out})'
  final = lambda rec: {h['seed']: h['test_accuracy'][-1] for h in rec['history']['seeds']}
  ref = final(records[base])
  lines = [f'| optimiser | seeds | final test acc (mean ± sample std) | − {base}: mean | '
           '95% CI | λ_max(P) end | λ_min(P) end |', '|' + '---|' * 7]
  for name, rec in records.items():
    acc = final(rec)
    seeds = sorted(set(acc) & set(ref))
    a = np.array([acc[k] for k in seeds])
    sd = lambda x: np.std(x, ddof=1) if len(x) > 1 else float('nan')
    cells = [rec['label'], str(len(seeds)), f'{a.mean():.4f} ± {sd(a):.4f}']
    if name == base or len(seeds) < 2:
      cells += ['–', '–']
    else:
      d = a - np.array([ref[k] for k in seeds])
      half = stats.t.ppf(0.975, len(d) - 1) * sd(d) / np.sqrt(len(d))
      lo, hi = d.mean() - half, d.mean() + half
      star = '*' if lo > 0 or hi < 0 else ''
      cells += [f'{d.mean():+.4f}', f'[{lo:+.4f}, {hi:+.4f}]{star}']
    seeds_h = rec['history']['seeds']
    if 'lambda_max' in seeds_h[0]:
      cells.append(f"{max(max(v[-1] for v in h['lambda_max'].values()) for h in seeds_h):.4f}")
      mins = [v[-1] for h in seeds_h for v in h.get('lambda_min', {}).values() if v and v[-1] is not None]
      cells.append(f'{min(mins):.4f}' if mins else '–')
    else:
      cells += ['–', '–']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- main

def _seeds(text: str) -> list[int]:
  """``'2'`` → ``[0, 1]``; ``'0,3'`` → ``[0, 3]``."""
  if ',' in text:
    return [int(s) for s in text.split(',') if s]
  return list(range(int(text)))


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default='fashion_mnist', choices=common.DATASETS)
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--model', default='mlp', choices=('mlp', 'cnn'))
  parser.add_argument('--cnn-widths', default='16,32', help='CNN widths (narrow by default)')
  parser.add_argument('--input-pool', type=int, default=1,
                      help='average-pool the images over KxK blocks first (2: 14x14 Fashion-MNIST, '
                           'a quarter of the CNN cost a step)')
  parser.add_argument('--subset', type=int, default=None, help='training examples to use')
  parser.add_argument('--test-subset', type=int, default=None, help='test examples to use')
  parser.add_argument('--steps', type=int, default=58000)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--decay-at', type=float, default=80 / 150,
                      help='fraction of --steps after which the learning rate is divided by 10')
  parser.add_argument('--hyper-lr', type=float, default=common.FOP_HYPER_LR)
  parser.add_argument('--optimizers', default=','.join(ALL_OPTIMIZERS))
  parser.add_argument('--seeds', default='2', help='a count (0..n-1) or a comma list')
  parser.add_argument('--seed-axis', default=None, choices=('vmap', 'unroll'),
                      help='how one compiled step runs the seeds (default: vmap for the MLP, '
                           'unroll for the CNN, whose vmapped convolutions are slower on CPU)')
  parser.add_argument('--ckpt-every', type=int, default=None,
                      help='checkpoint every this many steps (default: 10 epochs)')
  parser.add_argument('--stop-after', type=int, default=None,
                      help='stop (and checkpoint) after this step; rerun to continue')
  parser.add_argument('--out', default='results/paper_length')
  parser.add_argument('--plot', default=None, help='save the figure here (PNG)')
  parser.add_argument('--summary', action='store_true',
                      help='print a markdown table of the results under --out (mean ± std over seeds)')
  parser.add_argument('--target', type=float, default=0.89, help='test accuracy for --summary')
  parser.add_argument('--paired', default=None, metavar='BASE',
                      help="print each finished run's final test accuracy paired by seed with "
                           "BASE's (e.g. momentum): mean difference and its 95%% t-interval")
  parser.add_argument('--learned', default=None, metavar='PNG',
                      help="print what the FOP variants' last checkpoints learned (P per leaf and "
                           'seed) and save P − I of the 3×3 convolutions here')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny config: momentum+fop, 512/256 examples, 24 steps, 2 seeds')
  parser.add_argument('--quiet', action='store_true')
  args = parser.parse_args(argv)
  if args.smoke:
    args.subset, args.test_subset, args.steps = 512, 256, 24
    args.optimizers, args.seeds = 'momentum,fop', '2'
  names = [n for n in args.optimizers.split(',') if n]
  for n in names:
    if n not in KNOWN_OPTIMIZERS:
      parser.error(f'unknown optimiser {n!r}; expected some of {",".join(KNOWN_OPTIMIZERS)}')
  widths = [int(w) for w in args.cnn_widths.split(',') if w]
  data = common.subset(common.load_dataset(args.dataset, args.data_dir), args.subset,
                       args.test_subset)
  data = common.pool_images(data, args.input_pool)
  model_fn = common.make_model(args.model, data[0].shape[1:], int(data[1].max()) + 1,
                               cnn_widths=widths)
  config = {'dataset': args.dataset, 'model': args.model,
            'cnn_widths': widths if args.model == 'cnn' else None, 'input_pool': args.input_pool,
            'subset': args.subset, 'test_subset': args.test_subset, 'steps': args.steps,
            'batch_size': args.batch_size, 'lr': args.lr, 'momentum': args.momentum,
            'decay_at': args.decay_at, 'decay_factor': 0.1, 'hyper_lr': args.hyper_lr,
            'adam_lr': common.ADAM_LR, 'seeds': _seeds(args.seeds),
            'seed_axis': args.seed_axis or ('unroll' if args.model == 'cnn' else 'vmap')}
  steps_per_epoch = max(len(data[0]) // args.batch_size, 1)
  ckpt_every = args.ckpt_every or 10 * steps_per_epoch
  full_argv = list(sys.argv if argv is None else ['examples/paper_length.py', *argv])
  results = {}
  for name in names:
    path = os.path.join(args.out, f'{name}.json')
    if os.path.exists(path):
      with open(path) as f:
        rec = json.load(f)
      if rec.get('done') and rec['config'] == config:
        print(f'{name}: done before ({path}), skipped', flush=True)
        results[name] = {'record': rec}
        continue
    if args.steps == 0:
      continue
    results[name] = run_optimizer(name, config, data, model_fn, args.out, ckpt_every=ckpt_every,
                                  stop_after=args.stop_after, argv=full_argv,
                                  progress=not args.quiet)
  if args.plot:
    plot(args.out, args.plot, names)
  if args.summary:
    print(summary(args.out, names, args.target))
  if args.paired:
    print(paired(args.out, args.paired, names))
  if args.learned:
    print(learned(args.out, names, args.data_dir, args.learned))
  return results


if __name__ == '__main__':
  main()
