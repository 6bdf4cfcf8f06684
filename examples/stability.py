"""Long-run stability of FOP: what P learns over training, and whether the run survives.

Trains the classification examples' models (``examples/common.py``) with a functional loop of
jitted steps and logs, every ``--log-every`` steps, for every preconditioned leaf: ``λ_max(P)`` and the mean
eigenvalue of ``P`` (:func:`fop_optax.diagnostics.spectra`), the minibatch loss, and, with
``--sharpness``, ``λ_max`` of the loss Hessian ``H`` and of the preconditioned ``P·H`` on a fixed
batch (power iteration with Hessian-vector products), against the heavy-ball stability limit
``η·λ_max(P·H) < 2(1+β)``. Test accuracy after every epoch.

Optimisers are given as ``name[:key=value,...]`` with ``name`` in ``momentum``, ``adam``,
``fop``, ``fop_norm``, ``fop_adam``; keys are passed to the alias (``max_scale``,
``normalize``, ``hyper_learning_rate``), e.g. ``fop:max_scale=none``. Each finished run is written
to ``<out>/runs/<optimizer>_seed<k>.json`` at once and skipped on a rerun, so an interrupted sweep
resumes where it stopped.

Example (the issue's collapse, batch 32)::

  python3 examples/stability.py --dataset fashion_mnist --model mlp --epochs 15 --seeds 2 \\
      --batch-size 32 --optimizers momentum,fop,fop_norm --out results/stability_mlp32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

if __package__:  # imported as examples.stability (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/stability.py has examples/ on sys.path
  import common  # noqa: E402

import fop_optax  # noqa: E402

ADAM_LR = common.ADAM_LR


_INT_OPTIONS = ('rank', 'update_every', 'max_full_dim')


def parse_optimizer(spec: str):
  """``'fop:max_scale=2,normalize=1'`` → ``('fop', {'max_scale': 2.0, 'normalize': True})``."""
  name, _, rest = spec.partition(':')
  kwargs = {}
  for item in filter(None, rest.split(';' if ';' in rest else ',')):
    key, _, value = item.partition('=')
    if value.lower() == 'none':
      kwargs[key] = None
    elif key == 'normalize':
      kwargs[key] = value.lower() in ('1', 'true', 'yes')
    elif key in _INT_OPTIONS:
      kwargs[key] = int(value)
    else:
      kwargs[key] = float(value)
  return name, kwargs


def make_tx(spec: str, learning_rate: float, momentum: float):
  name, kw = parse_optimizer(spec)
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == 'adam':
    return optax.adam(ADAM_LR)
  if name in ('fop', 'fop_norm'):
    kw.setdefault('normalize', name == 'fop_norm')
    return fop_optax.fop(learning_rate, momentum, **kw)
  if name == 'fop_adam':
    return fop_optax.fop_adam(ADAM_LR, **kw)
  raise ValueError(f'unknown optimiser {spec!r}')


def _loss_fn(graphdef):
  def loss(params, x, y):
    model = nnx.merge(graphdef, params)
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  return loss


def _power_iteration(matvec, like, iters: int, key):
  """Largest-magnitude eigenvalue of a linear map on pytrees (Rayleigh quotient at the end)."""
  v = jax.tree.map(lambda x, k: jax.random.normal(k, x.shape, x.dtype), like,
                   jax.tree.unflatten(jax.tree.structure(like),
                                      list(jax.random.split(key, len(jax.tree.leaves(like))))))
  def normalise(t):
    n = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(t)))
    return jax.tree.map(lambda a: a / n, t)
  v = normalise(v)
  def body(_, v):
    return normalise(matvec(v))
  v = jax.lax.fori_loop(0, iters, body, v)
  w = matvec(v)
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w)))


def run_one(spec, data, model_fn, args, seed):
  x_train, y_train, x_test, y_test = data
  model = model_fn(seed)
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
  loss_fn = _loss_fn(graphdef)
  loss_fn_pure = lambda p, x, y: loss_fn(_restore(graphdef, model, p), x, y)
  tx = make_tx(spec, args.lr, args.momentum)
  state = tx.init(params)
  has_fop = any(isinstance(s, fop_optax.FopState) for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, fop_optax.FopState)))
  _, kw = parse_optimizer(spec)
  normalize = kw.get('normalize', spec.startswith('fop_norm'))
  # Read the state with the structures the transformation used (its guard included).
  rule = dict(normalize=normalize, max_scale=kw.get('max_scale', fop_optax.transform.DEFAULT_MAX_SCALE),
              max_full_dim=kw.get('max_full_dim'), rank=kw.get('rank'))

  @jax.jit
  def train_step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn_pure)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def chunk(params, state, xs, ys):
    # A Python loop over jitted steps: XLA:CPU runs convolutions inside a lax.scan
    # body far slower than at top level (the digits CNN took seconds per step).
    losses = []
    for x, y in zip(xs, ys):
      params, state, loss = train_step(params, state, x, y)
      losses.append(loss)
    return params, state, jnp.stack(losses)

  @jax.jit
  def evaluate(params, x, y):
    logits = nnx.merge(graphdef, _as_state(graphdef, model, params))(x)
    return (logits.argmax(-1) == y).mean()

  probe_x, probe_y = jnp.asarray(x_train[:1024]), jnp.asarray(y_train[:1024])

  @jax.jit
  def sharpness(params, state):
    hvp = lambda v: jax.jvp(lambda p: jax.grad(loss_fn_pure)(p, probe_x, probe_y), (params,), (v,))[1]
    key = jax.random.key(0)
    h = _power_iteration(hvp, params, args.sharpness_iters, key)
    if not has_fop:
      return h, h
    fop_state = fop_optax.diagnostics.find_fop_state(state)
    structs = jax.tree.leaves(fop_optax.resolve_structures(params, **rule))
    def phv(v):
      hv = jax.tree.leaves(hvp(v))
      return jax.tree.unflatten(jax.tree.structure(params), [
          s.precondition(m, x) for s, m, x in zip(structs, jax.tree.leaves(
              fop_state.preconditioners), hv)])
    return h, _power_iteration(phv, params, args.sharpness_iters, key)

  def spectra(state):
    if not has_fop:
      return {}
    spec_tree = fop_optax.diagnostics.spectra(state, params, **rule)
    out = {}
    for path, ev in jax.tree_util.tree_flatten_with_path(spec_tree)[0]:
      ev = np.asarray(ev)
      out[jax.tree_util.keystr(path)] = {'max': float(ev[0]), 'mean_leading': float(ev.mean()),
                                          'min': float(ev[-1])}
    return out

  steps_per_epoch = len(x_train) // args.batch_size
  rng = np.random.default_rng(seed)
  log = {'step': [], 'loss': [], 'spectra': [], 'sharpness': [], 'sharpness_p': []}
  epochs = {'epoch': [], 'test_accuracy': [], 'train_loss': []}
  step = 0
  t0 = time.perf_counter()
  for epoch in range(args.epochs):
    perm = rng.permutation(len(x_train))[:steps_per_epoch * args.batch_size]
    perm = perm.reshape(steps_per_epoch, args.batch_size)
    epoch_losses = []
    for start in range(0, steps_per_epoch, args.log_every):
      idx = perm[start:start + args.log_every]
      params, state, losses = chunk(params, state, jnp.asarray(x_train[idx]),
                                    jnp.asarray(y_train[idx]))
      losses = np.asarray(losses)
      epoch_losses.append(losses)
      step += len(idx)
      log['step'].append(step)
      log['loss'].append(float(np.mean(losses)))
      log['spectra'].append(spectra(state))
      if args.sharpness:
        h, ph = sharpness(params, state)
        log['sharpness'].append(float(h))
        log['sharpness_p'].append(float(ph))
    acc = float(np.mean([float(evaluate(params, jnp.asarray(x_test[i:i + 2000]),
                                        jnp.asarray(y_test[i:i + 2000])))
                         for i in range(0, len(x_test), 2000)]))
    epochs['epoch'].append(epoch + 1)
    epochs['test_accuracy'].append(acc)
    epochs['train_loss'].append(float(np.mean(np.concatenate(epoch_losses))))
    top = max((v['max'] for v in log['spectra'][-1].values()), default=float('nan'))
    print(f'{spec} seed {seed} epoch {epoch + 1}: loss {epochs["train_loss"][-1]:.4f} '
          f'test acc {acc:.4f} max λ_max(P) {top:.3f} ({time.perf_counter() - t0:.0f}s)', flush=True)
  angles = {}
  if has_fop:
    # The angle between g and P·g on the probe batch, per leaf (0° = P acts as a scale only).
    grads = jax.grad(loss_fn_pure)(params, probe_x, probe_y)
    tree = fop_optax.diagnostics.rotation_angles(state, grads, **rule)
    angles = {jax.tree_util.keystr(p): float(a)
              for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}
  skipped = [int(s.skipped_steps) for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, fop_optax.SkipNonFiniteState))
      if isinstance(s, fop_optax.SkipNonFiniteState)]
  return {'spec': spec, 'seed': seed, 'log': log, 'epochs': epochs, 'final_angles': angles,
          'skipped_steps': skipped[0] if skipped else 0, 'seconds': time.perf_counter() - t0}


def _as_state(graphdef, model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  return state


def _restore(graphdef, model, params):
  return _as_state(graphdef, model, params)


def plot(results, path: str, title: str, eta: float, momentum: float) -> None:
  """Three panels: test accuracy per epoch (mean over seeds, min–max band); λ_max(P) of each
  preconditioned leaf over steps (seed 0); and η·λ_max(P·H) against heavy-ball's limit 2(1+β)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  specs = list(dict.fromkeys(r['spec'] for r in results))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for spec in specs:
    runs = [r for r in results if r['spec'] == spec]
    acc = np.array([r['epochs']['test_accuracy'] for r in runs])
    ep = runs[0]['epochs']['epoch']
    line, = axes[0].plot(ep, acc.mean(0), label=spec)
    axes[0].fill_between(ep, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    first = runs[0]
    if first['log']['spectra'] and first['log']['spectra'][0]:
      for leaf in first['log']['spectra'][0]:
        axes[1].plot(first['log']['step'], [sp[leaf]['max'] for sp in first['log']['spectra']],
                     color=line.get_color(), alpha=0.8, lw=1)
        axes[1].plot(first['log']['step'], [sp[leaf]['min'] for sp in first['log']['spectra']],
                     color=line.get_color(), alpha=0.8, lw=1, ls='--')
    if first['log']['sharpness_p']:
      lr = ADAM_LR if spec.startswith(('adam', 'fop_adam')) else eta
      if not spec.startswith(('adam', 'fop_adam')):
        axes[2].plot(first['log']['step'], lr * np.asarray(first['log']['sharpness_p']),
                     color=line.get_color(), label=spec)
  axes[0].set(xlabel='epoch', ylabel='test accuracy', title=title)
  axes[0].legend(fontsize=8)
  axes[1].set(xlabel='step', ylabel='eigenvalue of P per leaf (seed 0)', yscale='symlog',
              title='λ_max (solid) and λ_min (dashed) of each applied P')
  axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  axes[2].axhline(2 * (1 + momentum), color='k', ls='--', label='2(1+β): heavy-ball limit')
  axes[2].set(xlabel='step', ylabel='η·λ_max(P·H)', yscale='log',
              title='preconditioned sharpness (1024-example batch)')
  axes[2].legend(fontsize=8)
  common.save_figure(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default='fashion_mnist', choices=common.DATASETS)
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--model', default='mlp', choices=('mlp', 'cnn'))
  parser.add_argument('--subset', type=int, default=None)
  parser.add_argument('--test-subset', type=int, default=None)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--seed-offset', type=int, default=0)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--optimizers', default='momentum,fop,fop_norm',
                      help='comma-free list separated by "+" or "," of name[:key=value;...]')
  parser.add_argument('--log-every', type=int, default=250)
  parser.add_argument('--sharpness', action='store_true')
  parser.add_argument('--sharpness-iters', type=int, default=20)
  parser.add_argument('--out', default='results/stability')
  parser.add_argument('--plot', default=None, help='save the figure here (PNG)')
  args = parser.parse_args(argv)
  data, model_fn = common.data_and_model(args)
  specs = [s for s in args.optimizers.replace('+', ' ').replace(',', ' ').split() if s]
  os.makedirs(os.path.join(args.out, 'runs'), exist_ok=True)
  with open(os.path.join(args.out, 'command.txt'), 'w') as f:
    f.write('python3 examples/stability.py ' + ' '.join(argv if argv is not None else sys.argv[1:]) + '\n')
  results = []
  for spec in specs:
    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
      path = os.path.join(args.out, 'runs', f'{spec.replace(":", "__").replace(";", "_")}_seed{seed}.json')
      if os.path.exists(path):
        with open(path) as f:
          results.append(dict(json.load(f), spec=spec))
        print(f'{spec} seed {seed}: done before, loaded {path}')
        continue
      result = run_one(spec, data, model_fn, args, seed)
      common.save_json(result, path)
      results.append(dict(result, spec=spec))
  rows = []
  checkpoints = sorted({1, 3, 5, 10, args.epochs} & set(range(1, args.epochs + 1)))
  for spec in specs:
    runs = [r for r in results if r['spec'] == spec]
    cells = []
    for e in checkpoints:
      accs = np.array([r['epochs']['test_accuracy'][e - 1] for r in runs])
      cells.append(f'{accs.mean():.3f} [{accs.min():.3f}–{accs.max():.3f}]' if len(accs) > 1
                   else f'{accs.mean():.3f}')
    last = [r['log']['spectra'][-1] for r in runs if r['log']['spectra'] and r['log']['spectra'][-1]]
    lam_max = max((v['max'] for sp in last for v in sp.values()), default=float('nan'))
    lam_min = min((v['min'] for sp in last for v in sp.values()), default=float('nan'))
    angle = max((a for r in runs for a in (r.get('final_angles') or {}).values()), default=float('nan'))
    rows.append([spec, len(runs), *cells, f'{lam_max:.2f}', f'{lam_min:.3f}', f'{angle:.2f}'])
  common.print_table(rows, ['optimiser', 'seeds', *(f'acc @ {e} ep' for e in checkpoints),
                            'λ_max(P) end', 'λ_min(P) end', 'max ∠(g, Pg) end (°)'])
  if args.plot:
    plot(results, args.plot, f'{args.dataset} {args.model}, batch {args.batch_size}, lr {args.lr}',
         args.lr, args.momentum)
  return results


if __name__ == '__main__':
  main()
