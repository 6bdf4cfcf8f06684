"""AdamQLR and series saddle-free Newton against Adam, SGD and SGD-HD (their papers' set-ups, small).

Three problems, each run for several seeds; every optimiser gets the same
starts/initialisations and batches:

* ``rosenbrock``: ``(1 − x)² + 100(y − x²)²`` written as least squares
  (residuals ``[1 − x, 10(y − x²)]``, so the GGN is Gauss-Newton's), 200
  steps, seed 0 from AdamQLR's start ``(1, −1)``, other seeds from uniform
  starts in ``[−2, 2] × [−1, 3]``. Measured: ``f`` after the run.
* ``regression``: scikit-learn's diabetes data (stand-in for UCI Energy,
  which cannot be fetched here), features and target standardised, a fixed
  80/20 split, the series-SFN paper's MLP of 7 hidden ReLU layers of 12,
  full batch, MSE. Measured: train and test MSE.
* ``fashion``: Fashion-MNIST, MLP with 50 hidden ReLU units (both papers'),
  minibatches of ``--batch-size``, softmax cross-entropy. Measured: the train
  loss on the whole training set and the test accuracy.

Optimisers (names for ``--optimizers``): ``adam@LR``, ``sgd@LR`` (momentum
0.9), ``sgd_hd@LR`` (``fop_optax.sgd_hd``), ``adam_qlr`` (the paper's untuned
defaults, GGN), ``adam_qlr_hessian``, ``sgd_qlr`` (QLR on the raw gradient),
``fop_qlr`` (QLR on FOP-preconditioned Adam), ``sfn`` (series SFN with the
paper's untuned "OursAdaptive": K = 20, r = 1, λ₀ = 1), ``sfn_tuned`` (the
paper's tuned values for the problem: UCI Energy's K = 16, r = 6, λ₀ = 2.3e-3
for the regression, Fashion-MNIST's K = 10, r = 1, λ₀ = 1.8e-3 otherwise) and
``sfn_power`` (untuned, with the power-iteration scale instead of the
reference's lower bound).

``--check-scale`` (Rosenbrock and regression) also measures, at step 0 and
every 50 steps of the series-SFN runs, at the point where the step chooses
its scale, ``λ_max(H²)`` of the full-batch Hessian (300 power iterations) against the
scale ``V`` in use: the series converges only where ``λ_max(H²) < 2V``.

Prints a table of medians (and min–max) over seeds, with milliseconds per
step, writes JSON (``results/``) and a PNG (``docs/img/``) of the median curves
against steps and wall time::

  python3 examples/curvature_methods.py rosenbrock
  python3 examples/curvature_methods.py regression --check-scale
  python3 examples/curvature_methods.py fashion --epochs 3 --seeds 3
  python3 examples/curvature_methods.py fashion --quick   # seconds, for tests
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax  # noqa: E402

PROBLEMS = ('rosenbrock', 'regression', 'fashion')
DEFAULTS = {
    'rosenbrock': ['adam@0.001', 'adam@0.01', 'adam@0.1', 'sgd@0.0001', 'sgd_hd@0.0001',
                   'adam_qlr', 'adam_qlr_hessian', 'sgd_qlr', 'sfn', 'sfn_power'],
    'regression': ['adam@0.001', 'adam@0.01', 'sgd@0.01', 'sgd_hd@0.01', 'adam_qlr',
                   'sgd_qlr', 'fop_qlr', 'sfn', 'sfn_tuned', 'sfn_power'],
    'fashion': ['adam@0.001', 'sgd@0.01', 'sgd_hd@0.01', 'adam_qlr', 'fop_qlr', 'sfn',
                'sfn_tuned'],
}
STEPS = {'rosenbrock': 200, 'regression': 1000}


def make_optimizer(name: str, problem: str) -> optax.GradientTransformation:
  base, _, lr = name.partition('@')
  lr = float(lr) if lr else None
  if base == 'adam':
    return optax.adam(lr)
  if base == 'sgd':
    return optax.sgd(lr, momentum=0.9)
  if base == 'sgd_hd':
    return fop_optax.sgd_hd(lr)
  if base == 'adam_qlr':
    return fop_optax.adam_qlr()
  if base == 'adam_qlr_hessian':
    return fop_optax.adam_qlr(curvature='hessian')
  if base == 'sgd_qlr':
    return fop_optax.skip_nonfinite(fop_optax.scale_by_qlr(optax.identity()))
  if base == 'fop_qlr':
    direction = optax.chain(fop_optax.scale_by_fop(1e-3), optax.scale_by_adam())
    return fop_optax.skip_nonfinite(fop_optax.scale_by_qlr(direction))
  if base == 'sfn':
    return fop_optax.series_sfn()
  if base == 'sfn_power':
    return fop_optax.series_sfn(scale='power_iteration')
  if base == 'sfn_tuned':
    if problem == 'regression':
      return fop_optax.series_sfn(16, 6, initial_damping=2.3e-3)
    return fop_optax.series_sfn(10, 1, initial_damping=1.8e-3)
  raise ValueError(f'unknown optimiser {name!r}')


# ----------------------------------------------------------------------------- problems

def mlp_init(key, sizes):
  params = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2.0 / a)
    params.append({'w': w, 'b': jnp.zeros(b)})
  return params


def mlp_apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def rosenbrock_residuals(p, x):
  del x
  return jnp.stack([1 - p[0], 10 * (p[1] - p[0] ** 2)])


def sum_of_squares(z, y):
  del y
  return jnp.sum(z ** 2)


def mse(z, y):
  return jnp.mean((z - y) ** 2)


def cross_entropy(z, y):
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def load_problem(problem: str, quick: bool):
  """``(apply, loss, init(seed), train (x, y), test (x, y))``."""
  if problem == 'rosenbrock':
    dummy = (np.zeros((1, 1), np.float32), np.zeros((1,), np.float32))

    def init(seed):
      if seed == 0:
        return jnp.array([1.0, -1.0])
      r = np.random.default_rng(seed)
      return jnp.array([r.uniform(-2, 2), r.uniform(-1, 3)], jnp.float32)
    return rosenbrock_residuals, sum_of_squares, init, dummy, dummy
  if problem == 'regression':
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    ym, ys = y_tr.mean(), y_tr.std()
    prep = lambda a, b: (((a - mu) / sd).astype(np.float32), ((b - ym) / ys)[:, None].astype(
        np.float32))
    sizes = [10] + [12] * 7 + [1]
    return (mlp_apply, mse, lambda seed: mlp_init(jax.random.key(seed), sizes),
            prep(x_tr, y_tr), prep(x_te, y_te))
  if __package__:  # imported as examples.<name>; as a script, examples/ is on sys.path
    from examples import common
  else:
    import common
  load_dataset, subset = common.load_dataset, common.subset
  data = load_dataset('fashion_mnist')
  if quick:
    data = subset(data, 2000, 1000)
  x_tr, y_tr, x_te, y_te = data
  flat = lambda a: a.reshape(len(a), -1)
  return (mlp_apply, cross_entropy, lambda seed: mlp_init(jax.random.key(seed), [784, 50, 10]),
          (flat(x_tr), y_tr), (flat(x_te), y_te))


def make_step(tx, apply, loss):
  tx = optax.with_extra_args_support(tx)

  @jax.jit
  def step(params, state, x, y):
    model_fn = lambda p: apply(p, x)
    loss_fn = lambda z: loss(z, y)
    value_fn = lambda p: loss_fn(model_fn(p))
    value, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value=value, grad=grads,
                               value_fn=value_fn, model_fn=model_fn, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state, value
  return step


def make_eval(apply, loss, classify, batch=2000):
  @jax.jit
  def _eval(params, x, y):
    z = apply(params, x)
    acc = jnp.mean(jnp.argmax(z, -1) == y) if classify else jnp.nan
    return loss(z, y), acc

  def evaluate(params, data):
    x, y = data
    out = [(len(x[i:i + batch]), *_eval(params, x[i:i + batch], y[i:i + batch]))
           for i in range(0, len(x), batch)]
    n = sum(o[0] for o in out)
    return (sum(o[0] * float(o[1]) for o in out) / n, sum(o[0] * float(o[2]) for o in out) / n)
  return evaluate


def find_state(state, kind):
  for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, kind)):
    if isinstance(s, kind):
      return s
  return None


_TOP = {}


def top_eigenvalue_h2(apply, loss, params, x, y, iterations=300):
  """``λ_max(H²)`` of the full-batch loss by power iteration on ``H²`` (HVPs, from a fixed
  random start); a lower bound that matched ``eigh`` of the dense Hessian to 1e-4 where checked."""
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(params)
  key = (apply, loss, iterations)
  if key not in _TOP:
    def top(f, x, y):
      value_fn = lambda g: loss(apply(unravel(g), x), y)
      hvp = lambda v: jax.jvp(jax.grad(value_fn), (f,), (v,))[1]

      def body(_, carry):
        v, _ = carry
        w = hvp(hvp(v))
        return w / jnp.linalg.norm(w), v @ w
      v0 = jax.random.normal(jax.random.key(0), f.shape, f.dtype)
      return jax.lax.fori_loop(0, iterations, body, (v0 / jnp.linalg.norm(v0), 0.0))[1]
    _TOP[key] = jax.jit(top)
  return float(_TOP[key](flat, x, y))


def run(problem, name, seed, args, data):
  apply, loss, init, train, test = data
  tx = make_optimizer(name, problem)
  params = init(seed)
  state = tx.init(params)
  step = make_step(tx, apply, loss)
  evaluate = make_eval(apply, loss, problem == 'fashion')
  rng = np.random.default_rng(seed)
  x_tr, y_tr = train
  if problem == 'fashion':
    per_epoch = len(x_tr) // args.batch_size
    total = per_epoch * args.epochs
    order = np.concatenate([rng.permutation(len(x_tr))[:per_epoch * args.batch_size]
                            for _ in range(args.epochs)]).reshape(total, args.batch_size)
    batches = lambda i: (x_tr[order[i]], y_tr[order[i]])
    log_every = per_epoch // 4 or 1
  else:
    total = args.steps or STEPS[problem]
    batches = lambda i: (x_tr, y_tr)
    log_every = max(total // 50, 1)
  curve, scale_checks = [], []
  elapsed = 0.0
  for i in range(total):
    xb, yb = batches(i)
    check = (args.check_scale and problem != 'fashion' and name.startswith('sfn')
             and (i % 50 == 0 or i == total - 1))
    if check:  # the top of H² where this step's V is chosen
      top = top_eigenvalue_h2(apply, loss, params, x_tr, y_tr)
    start = time.perf_counter()
    params, state, value = step(params, state, xb, yb)
    value = float(value)  # waits for the step
    if i > 0:  # step 0 compiles
      elapsed += time.perf_counter() - start
    if check:
      scale_checks.append((i, top, float(find_state(state, fop_optax.SeriesSfnState).scale)))
    if not np.isfinite(value):
      curve.append((i, float('nan'), elapsed))
      break
    if i % log_every == 0 or i == total - 1:
      measured = value if problem != 'fashion' else evaluate(params, train)[0]
      curve.append((i, measured, elapsed))
  train_loss, _ = evaluate(params, train)
  test_loss, test_acc = evaluate(params, test)
  result = {'name': name, 'seed': seed, 'train_loss': train_loss, 'test_loss': test_loss,
            'test_accuracy': test_acc, 'ms_per_step': 1e3 * elapsed / max(total - 1, 1),
            'curve': curve, 'steps': total, 'scale_checks': scale_checks}
  qlr = find_state(state, fop_optax.QlrState)
  if qlr is not None:
    result['final_damping'] = float(qlr.damping)
  return result


def summarize(results, problem):
  import collections
  by_name = collections.defaultdict(list)
  for r in results:
    by_name[r['name']].append(r)
  rows = []
  for name, runs in by_name.items():
    def stat(key, fmt='{:.4g}'):
      v = np.array([r[key] for r in runs], float)
      if np.all(np.isnan(v)):
        return 'n/a'
      return f'{fmt.format(np.nanmedian(v))} [{fmt.format(np.nanmin(v))}, {fmt.format(np.nanmax(v))}]'
    row = [name, stat('train_loss')]
    if problem == 'regression':
      row.append(stat('test_loss'))
    if problem == 'fashion':
      row.append(stat('test_accuracy', '{:.4f}'))
    row.append(f"{np.median([r['ms_per_step'] for r in runs]):.2f}")
    rows.append(row)
  headers = ['optimiser', 'final f' if problem == 'rosenbrock' else 'train loss']
  headers += {'regression': ['test MSE'], 'fashion': ['test accuracy']}.get(problem, [])
  headers += ['ms/step']
  return rows, headers


def plot(results, problem, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if __package__:  # imported as examples.<name>; as a script, examples/ is on sys.path
    from examples import common
  else:
    import common
  names = list(dict.fromkeys(r['name'] for r in results))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for k, name in enumerate(names):
    runs = [r for r in results if r['name'] == name]
    n = min(len(r['curve']) for r in runs)
    steps = np.array([c[0] for c in runs[0]['curve'][:n]])
    values = np.median(np.array([[c[1] for c in r['curve'][:n]] for r in runs]), axis=0)
    secs = np.median(np.array([[c[2] for c in r['curve'][:n]] for r in runs]), axis=0)
    style = dict(color=f'C{k % 10}', ls='-' if k < 10 else '--', label=name)
    axes[0].plot(steps, values, **style)
    axes[1].plot(np.maximum(secs, 1e-4), values, **style)
  for ax, xl in zip(axes, ('step', 'wall time (s, after compilation)')):
    ax.set_yscale('log')
    ax.set_xlabel(xl)
    ax.set_ylabel('train loss (median over seeds)')
    ax.grid(alpha=0.3)
  axes[1].set_xscale('log')
  axes[0].legend(fontsize=7)
  fig.suptitle(f'{problem}: curvature methods vs first-order baselines')
  common.save_figure(fig, path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('problem', choices=PROBLEMS)
  parser.add_argument('--optimizers', nargs='+', default=None)
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=None, help='rosenbrock/regression steps')
  parser.add_argument('--epochs', type=int, default=3, help='fashion epochs')
  parser.add_argument('--batch-size', type=int, default=400, help='fashion minibatch')
  parser.add_argument('--check-scale', action='store_true')
  parser.add_argument('--quick', action='store_true', help='tiny run (tests)')
  parser.add_argument('--out', default='docs/img')
  parser.add_argument('--json', default=None, help='default results/curvature_PROBLEM.json')
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds = min(args.seeds, 2)
    args.steps = args.steps or 20
    args.epochs = 1
  names = args.optimizers or DEFAULTS[args.problem]
  for name in names:
    make_optimizer(name, args.problem)  # fail fast on a bad name
  data = load_problem(args.problem, args.quick)
  results = []
  for name in names:
    for seed in range(args.seeds):
      t0 = time.perf_counter()
      r = run(args.problem, name, seed, args, data)
      results.append(r)
      print(f'{name:18s} seed {seed}: train {r["train_loss"]:.4g} test {r["test_loss"]:.4g} '
            f'acc {r["test_accuracy"]:.4f} {r["ms_per_step"]:.2f} ms/step '
            f'({time.perf_counter() - t0:.1f} s)', flush=True)
  rows, headers = summarize(results, args.problem)
  if __package__:  # imported as examples.<name>; as a script, examples/ is on sys.path
    from examples import common
  else:
    import common
  print_table, save_json = common.print_table, common.save_json
  print(f'\n{args.problem}: median [min, max] over {args.seeds} seeds')
  print_table(rows, headers)
  checks = [c for r in results for c in r['scale_checks']]
  if checks:
    for name in dict.fromkeys(r['name'] for r in results if r['scale_checks']):
      cs = [c for r in results if r['name'] == name for c in r['scale_checks']]
      bad = sum(1 for _, top, v in cs if top >= 2 * v)
      ratio = np.median([top / v for _, top, v in cs])
      print(f'scale check {name}: λ_max(H²) ≥ 2V at {bad}/{len(cs)} checked steps; '
            f'median λ_max(H²)/V = {ratio:.3g}, max {max(t / v for _, t, v in cs):.3g}')
  suffix = '_quick' if args.quick else ''
  plot(results, args.problem, os.path.join(args.out, f'curvature_{args.problem}{suffix}.png'))
  save_json({'args': vars(args), 'results': results},
            args.json or os.path.join('results', f'curvature_{args.problem}{suffix}.json'))
  return results


if __name__ == '__main__':
  main()
