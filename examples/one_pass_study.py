"""One-pass hyperparameter optimisation from random initial hyperparameters (Clarke et al., 2022).

The paper's random-start study at CPU scale. For each of ``--inits`` random initial
hyperparameters, drawn as the paper draws them (``log₁₀ η ~ U(−6, −1)``, ``log₁₀ ω ~ U(−7, −2)``,
``μ ~ U(0, 1)``), four optimisers train the same network from the same weights on the same
batches:

* ``fixed``: SGD with those hyperparameters left fixed (``one_pass_hpo(..., learn=())``);
* ``hd``: Baydin's hypergradient descent on one global ``η`` (``fop_optax.sgd_hd``, its default
  ``'log'`` rule, every step, training loss only), ``μ`` and ``ω`` fixed;
* ``one_pass``: ``η``, ``μ`` and ``ω`` learned against the validation loss
  (``fop_optax.one_pass_hpo``, the paper's defaults: period 10, 5 Neumann terms, Adam(0.05));
* ``one_pass_pp``: the same with one ``η`` per parameter (the paper's "high-dimensional" variant).

Tasks:

* ``fashion_mnist``: MLP 784-50-10, batch 50, the 60k training images split 50k/10k into
  train/validation, the 10k test images for test (the paper's set-up; the paper runs 10k steps
  from 100 inits).
* ``diabetes``: scikit-learn's diabetes regression set (442 rows, 10 features), standardised,
  split 60/20/20 into train/validation/test, MLP [10, 50, 1], MSE, full batch (standing in for
  the paper's UCI sets: MLP [d, 50, 1], full batch, 4k steps, 200 inits).

All inits of one optimiser run at once under ``jax.vmap`` (with the state's ``count`` unbatched,
so the hyper step stays a ``lax.cond``). Writes ``results/one_pass_<task>.json`` and
``docs/img/one_pass_<task>.png``; prints the medians and quartiles of the final losses.

Run::

  python examples/one_pass_study.py diabetes --inits 50 --steps 4000
  python examples/one_pass_study.py fashion_mnist --inits 20 --steps 3000
  python examples/one_pass_study.py fashion_mnist --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__:  # imported as examples.one_pass_study (tests, benchmarks)
  from examples import common
else:  # run as a script: python3 examples/one_pass_study.py has examples/ on sys.path
  import common  # noqa: E402
import fop_optax  # noqa: E402

METHODS = ('fixed', 'hd', 'one_pass', 'one_pass_pp')
LABELS = {'fixed': 'random fixed', 'hd': 'Baydin HD (η)', 'one_pass': 'one-pass (η, μ, ω)',
          'one_pass_pp': 'one-pass (per-param η, μ, ω)'}
COLORS = {'fixed': 'tab:gray', 'hd': 'tab:orange', 'one_pass': 'tab:blue',
          'one_pass_pp': 'tab:green'}


# --------------------------------------------------------------------------- data and model

def load_task(task: str, data_dir=None):
  """Returns ``(train, val, test, kind)``; each split a pair ``(x, y)`` of numpy arrays."""
  if task == 'fashion_mnist':
    x, y, x_test, y_test = common.load_dataset('fashion_mnist', data_dir)
    x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
    perm = np.random.default_rng(0).permutation(len(x))
    val, train = perm[:10_000], perm[10_000:]
    return (x[train], y[train]), (x[val], y[val]), (x_test, y_test), 'classify'
  if task == 'diabetes':
    from sklearn.datasets import load_diabetes
    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    n_tr, n_va = int(0.6 * len(x)), int(0.2 * len(x))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    mx, sx, my, sy = x[tr].mean(0), x[tr].std(0), y[tr].mean(), y[tr].std()
    xs = ((x - mx) / sx).astype(np.float32)
    ys = ((y - my) / sy).astype(np.float32)[:, None]
    return (xs[tr], ys[tr]), (xs[va], ys[va]), (xs[te], ys[te]), 'regress'
  raise ValueError(f'unknown task {task!r}')


def init_mlp(key, sizes):
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k = jax.random.split(key)
    params[f'w{i}'] = jax.random.normal(k, (n_in, n_out)) * math.sqrt(2.0 / n_in)
    params[f'b{i}'] = jnp.zeros(n_out)
  return params


def mlp(params, x):
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f'w{i}'] + params[f'b{i}']
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def make_loss(kind):
  if kind == 'classify':
    def loss(params, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()
  else:
    def loss(params, x, y):
      return jnp.mean((mlp(params, x) - y) ** 2)
  return loss


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(mlp(params, x), -1) == y)


# --------------------------------------------------------------------------- optimisers

def make_tx(method, h):
  """The optimiser for initial hyperparameters ``h`` (scalars; tracers under vmap)."""
  lr, mu, wd = h['learning_rate'], h['momentum'], h['weight_decay']
  if method == 'fixed':
    return fop_optax.one_pass_hpo(lr, mu, wd, learn=())
  if method == 'one_pass':
    return fop_optax.one_pass_hpo(lr, mu, wd)
  if method == 'one_pass_pp':
    return fop_optax.one_pass_hpo(lr, mu, wd, per_parameter=('learning_rate',))
  if method == 'hd':
    # No skip_nonfinite wrapper: under vmap its warning cond becomes a select and runs a host
    # callback every step.
    return optax.chain(optax.add_decayed_weights(wd),
                       fop_optax.sgd_hd(lr, momentum=mu, scope='global', skip_nonfinite=False))
  raise ValueError(method)


def current_hyperparams(method, state, h):
  """The hyperparameters in use, per init: scalars (per-parameter η: its log-mean)."""
  if method == 'hd':
    # HypergradientState's field (optax.tree.get raises if the state holds none or several).
    return {'learning_rate': optax.tree.get(state, 'learning_rates'), 'momentum': h['momentum'],
            'weight_decay': h['weight_decay']}
  hp = dict(state.hyperparams)
  lr = hp['learning_rate']
  if isinstance(lr, dict):  # per parameter: geometric mean over all elements
    leaves = jax.tree.leaves(lr)
    total = sum(x.size for x in leaves)
    hp['learning_rate'] = 10.0 ** (sum(jnp.sum(jnp.log10(x)) for x in leaves) / total)
  return hp


def sample_hyperparams(n, seed):
  rng = np.random.default_rng(seed)
  return {'learning_rate': 10.0 ** rng.uniform(-6, -1, n),
          'momentum': rng.uniform(0, 1, n),
          'weight_decay': 10.0 ** rng.uniform(-7, -2, n)}


# --------------------------------------------------------------------------- training

def run_method(method, h, params0, data, kind, args, batches, val_batches, eval_at):
  """Trains all inits at once; returns per-init final metrics, curves and seconds."""
  (x, y), (xv, yv), (xt, yt) = data
  loss = make_loss(kind)
  hj = {k: jnp.asarray(v, jnp.float32) for k, v in h.items()}
  state = jax.vmap(lambda hi, p: make_tx(method, hi).init(p))(hj, params0)
  one_pass = method != 'hd'
  if one_pass:
    state = state._replace(count=state.count[0])
    state_axes = jax.tree.map(lambda _: 0, state)._replace(count=None)
  else:
    state_axes = jax.tree.map(lambda _: 0, state)

  def step_one(params, state, hi, xb, yb, xvb, yvb):
    grads = jax.grad(loss)(params, xb, yb)
    tx = make_tx(method, hi)
    updates, state = tx.update(grads, state, params,
                               value_fn=lambda p: loss(p, xb, yb),
                               validation_value_fn=lambda p: loss(p, xvb, yvb))
    return optax.apply_updates(params, updates), state

  step_all = jax.vmap(step_one, in_axes=(0, state_axes, 0, None, None, None, None),
                      out_axes=(0, state_axes))

  @jax.jit(static_argnums=4)
  def chunk(params, state, idx, vidx, n_steps):
    def body(carry, ids):
      i, vi = ids
      xb, yb = (x, y) if i is None else (x[i], y[i])
      xvb, yvb = (xv, yv) if vi is None else (xv[vi], yv[vi])
      return step_all(*carry, hj, xb, yb, xvb, yvb), None
    return jax.lax.scan(body, (params, state), (idx, vidx), length=n_steps)[0]

  def metrics(params, xs, ys):
    out = {'loss': jax.vmap(lambda p: loss(p, xs, ys))(params)}
    if kind == 'classify':
      out['accuracy'] = jax.vmap(lambda p: accuracy(p, xs, ys))(params)
    return out

  evaluate = jax.jit(lambda p, xs, ys: metrics(p, xs, ys))
  hp_of = jax.jit(jax.vmap(lambda s, hi: current_hyperparams(method, s, hi),
                           in_axes=(state_axes, 0)))
  curves = {'step': [], 'val_loss': [], 'hyperparams': []}
  params, start, seconds = params0, 0, 0.0
  n_eval = min(len(xv), args.eval_size)
  for stop in eval_at:
    n_steps = stop - start
    idx = None if batches is None else jnp.asarray(batches[start:stop])
    vidx = None if val_batches is None else jnp.asarray(val_batches[start:stop])
    t0 = time.perf_counter()
    params, state = chunk(params, state, idx, vidx, n_steps)
    jax.block_until_ready(params)
    seconds += time.perf_counter() - t0
    val = evaluate(params, jnp.asarray(xv[:n_eval]), jnp.asarray(yv[:n_eval]))
    curves['step'].append(stop)
    curves['val_loss'].append(np.asarray(val['loss']))
    curves['hyperparams'].append({k: np.asarray(v) for k, v in hp_of(state, hj).items()})
    start = stop
    med = np.median(np.where(np.isfinite(curves['val_loss'][-1]), curves['val_loss'][-1], np.inf))
    print(f'  {method:12s} step {stop:6d}  median val loss {med:.4f}  ({seconds:.0f}s)', flush=True)
  final = {'val': evaluate(params, jnp.asarray(xv), jnp.asarray(yv)),
           'test': evaluate(params, jnp.asarray(xt), jnp.asarray(yt))}
  final = {f'{split}_{k}': np.asarray(v) for split, d in final.items() for k, v in d.items()}
  return final, curves, seconds


def summarize(values):
  """Median and quartiles with non-finite runs counted as +inf (diverged)."""
  v = np.where(np.isfinite(values), values, np.inf)
  q25, med, q75 = np.percentile(v, [25, 50, 75])
  return med, q25, q75, int(np.sum(~np.isfinite(values)))


def plot(results, steps_axis, task, kind, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 5, figsize=(25, 4.2))
  ax = axes[0]
  for m, r in results.items():
    v = np.sort(np.where(np.isfinite(r['final']['test_loss']), r['final']['test_loss'], np.nan))
    ax.plot(np.arange(1, len(v) + 1) / len(v), v, 'o-', ms=3, color=COLORS[m], label=LABELS[m])
  ax.set_yscale('log')
  ax.set_xlabel('fraction of random inits')
  ax.set_ylabel('final test loss (sorted)')
  ax.set_title(f'{task}: final test loss per init')
  ax.legend(fontsize=8)
  ax = axes[1]
  for m, r in results.items():
    curves = np.stack(r['curves']['val_loss'])  # (evals, inits)
    curves = np.where(np.isfinite(curves), curves, np.nan)
    ax.plot(steps_axis, np.nanmedian(curves, 1), color=COLORS[m], label=LABELS[m])
    ax.fill_between(steps_axis, np.nanpercentile(curves, 25, 1), np.nanpercentile(curves, 75, 1),
                    color=COLORS[m], alpha=0.15)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('validation loss (median, IQR)')
  ax.set_title('validation loss')
  for ax, name, log in zip(axes[2:], ('learning_rate', 'momentum', 'weight_decay'),
                           (True, False, True)):
    for m in ('one_pass', 'one_pass_pp', 'hd'):
      if m not in results or (name != 'learning_rate' and m == 'hd'):
        continue
      traj = np.stack([hp[name] for hp in results[m]['curves']['hyperparams']])  # (evals, inits)
      ax.plot(steps_axis, traj, color=COLORS[m], alpha=0.35, lw=0.8)
      ax.plot([], [], color=COLORS[m], label=LABELS[m])
    ax.set_xlabel('step')
    ax.set_ylabel(name + (' (per-param: geometric mean)' if name == 'learning_rate' else ''))
    if log:
      ax.set_yscale('log')
    ax.set_title(f'learned {name} (one line per init)')
    ax.legend(fontsize=8)
  common.save_figure(fig, path, dpi=110)
  print(f'wrote {path}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('task', choices=('fashion_mnist', 'diabetes'))
  parser.add_argument('--inits', type=int, default=20, help='random initial hyperparameters')
  parser.add_argument('--steps', type=int, default=None,
                      help='training steps (default 3000 for Fashion-MNIST, 4000 for diabetes)')
  parser.add_argument('--batch-size', type=int, default=50, help='Fashion-MNIST batch size')
  parser.add_argument('--evals', type=int, default=20, help='evaluation points along training')
  parser.add_argument('--eval-size', type=int, default=2000,
                      help='validation examples for the curves (the final numbers use all)')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--plot-only', action='store_true',
                      help='redraw the figure from --out (the JSON of an earlier run)')
  parser.add_argument('--quick', action='store_true', help='4 inits, 200 steps, 1k train images')
  parser.add_argument('--out', default=None, help='default results/one_pass_<task>.json')
  parser.add_argument('--img', default=None, help='default docs/img/one_pass_<task>.png')
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 3000 if args.task == 'fashion_mnist' else 4000
  if args.quick:
    args.inits, args.steps, args.evals = 4, 200, 4
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
  args.out = args.out or os.path.join(root, 'results', f'one_pass_{args.task}.json')
  args.img = args.img or os.path.join(root, 'docs', 'img', f'one_pass_{args.task}.png')
  if args.plot_only:
    with open(args.out) as f:
      saved = json.load(f)
    nan = lambda v: np.asarray([np.nan if x is None else x for x in np.ravel(v)]).reshape(
        np.shape(v))
    results = {m: {'final': {k: nan(v) for k, v in r['final'].items()},
                   'curves': {'val_loss': [nan(v) for v in r['val_loss']],
                              'hyperparams': [{k: nan(v) for k, v in hp.items()}
                                              for hp in r['hyperparams']]},
                   'steps': r['steps']} for m, r in saved['results'].items()}
    plot(results, next(iter(results.values()))['steps'], args.task,
         'classify' if args.task == 'fashion_mnist' else 'regress', args.img)
    return
  methods = [m for m in args.methods.split(',') if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f'unknown methods {unknown}; choose from {METHODS}')

  train, val, test, kind = load_task(args.task, args.data_dir)
  if args.quick and args.task == 'fashion_mnist':
    train, val, test = ((a[:1000], b[:1000]) for a, b in (train, val, test))
  data = tuple((jnp.asarray(a), jnp.asarray(b)) for a, b in (train, val, test))
  rng = np.random.default_rng(args.seed + 1)
  if kind == 'classify':
    n_out, bs = 10, args.batch_size
    epochs = -(-args.steps * bs // len(train[0]))
    order = np.concatenate([rng.permutation(len(train[0])) for _ in range(epochs)])
    batches = order[:args.steps * bs].reshape(args.steps, bs).astype(np.int32)
    val_batches = rng.integers(0, len(val[0]), (args.steps, bs)).astype(np.int32)
  else:
    n_out, batches, val_batches = 1, None, None  # full batch
  sizes = (train[0].shape[1], 50, n_out)
  h = sample_hyperparams(args.inits, args.seed)
  keys = jax.random.split(jax.random.key(args.seed), args.inits)
  params0 = jax.vmap(lambda k: init_mlp(k, sizes))(keys)
  every = max(1, args.steps // args.evals)
  eval_at = sorted(set(range(every, args.steps + 1, every)) | {args.steps})
  print(f'{args.task}: MLP {sizes}, {args.inits} inits, {args.steps} steps, '
        f'{"batch " + str(args.batch_size) if batches is not None else "full batch"}, '
        f'train/val/test {len(train[0])}/{len(val[0])}/{len(test[0])}', flush=True)

  results = {}
  for m in methods:
    final, curves, seconds = run_method(m, h, params0, data, kind, args, batches, val_batches,
                                        eval_at)
    results[m] = {'final': final, 'curves': curves, 'seconds': seconds}

  metric_names = ['test_loss', 'val_loss'] + (['test_accuracy'] if kind == 'classify' else [])
  rows = []
  for m, r in results.items():
    row = [LABELS[m]]
    for name in metric_names:
      med, q25, q75, bad = summarize(r['final'][name] if 'accuracy' not in name
                                     else -r['final'][name])
      if 'accuracy' in name:
        med, q25, q75 = -med, -q75, -q25
      row.append(f'{med:.4f} [{q25:.4f}, {q75:.4f}]')
    row.append(str(summarize(r['final']['test_loss'])[3]))
    row.append(f'{r["seconds"]:.0f}')
    rows.append(row)
  print()
  common.print_table(rows, ['method'] + [f'{n} median [IQR]' for n in metric_names] +
                     ['diverged', 'seconds (all inits)'])
  # Paired comparison: per init, is one-pass better than the same init fixed?
  for m in ('hd', 'one_pass', 'one_pass_pp'):
    if m in results and 'fixed' in results:
      a = np.where(np.isfinite(results[m]['final']['test_loss']), results[m]['final']['test_loss'],
                   np.inf)
      b = np.where(np.isfinite(results['fixed']['final']['test_loss']),
                   results['fixed']['final']['test_loss'], np.inf)
      print(f'{LABELS[m]}: lower final test loss than the same init fixed in '
            f'{int(np.sum(a < b))}/{len(a)} inits')
  common.save_json({'args': vars(args), 'initial_hyperparams': h,
                    'results': {m: {'final': r['final'], 'seconds': r['seconds'],
                                    'steps': r['curves']['step'],
                                    'val_loss': r['curves']['val_loss'],
                                    'hyperparams': r['curves']['hyperparams']}
                                for m, r in results.items()}}, args.out)
  print(f'wrote {args.out}')
  plot(results, eval_at, args.task, kind, args.img)


if __name__ == '__main__':
  main()
