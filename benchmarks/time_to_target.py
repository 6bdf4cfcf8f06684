"""Time and steps to a target on Fashion-MNIST: FOP against the optimisers users would pick instead.

Every optimiser trains the same model (``examples/common.py``'s ``MLP`` 784-256-256-10 or
small All-CNN ``CNN``) from the same initialisation, on the same batches in the same order
(seeded per run), for the same budget of steps. Every ``--eval-every`` steps the script
evaluates accuracy on a fixed subset of the test set; it records the first step (and the
training wall time up to it, compilation and evaluation excluded) at which

* test accuracy ≥ ``--acc-target`` (per model), and
* the running mean of the training loss (EMA 0.9 over batches) ≤ ``--loss-target``.

Medians over seeds; a run that never reaches a target counts as "not reached", and the
median is only given when most seeds reached it.

Optimisers (learning rates are each method's usual default, not tuned per method):
momentum (SGD 0.05, momentum 0.9), Adam (1e-3), FOP+momentum (``fop_optax.fop``),
FOP+Adam (``fop_optax.fop_adam``), S-HD (``fop_optax.sgd_hd``, per-leaf step size), and peers
from PyPI: ``optax.contrib.muon`` (lr 0.02, Adam 1e-3 for biases; conv kernels orthogonalised
over (kh·kw·in)×out), psgd-jax ``kron`` (lr 1e-3). A Shampoo/SOAP optimiser that installs
and runs on this JAX was not found (see docs/benchmarks.md).

Run from the repository root: ``python3 -m benchmarks.time_to_target`` (``--quick``: a smoke run). Defaults (sized for 2 shared CPU cores, ~10-20 min):
the first 6,400 training images, 2 epochs (100 steps of 128), 2 seeds, both models, accuracy
checked every 10 steps on 2,000 test images; ``--train-subset 0 --epochs 5 --seeds 5`` for more.
"""

from __future__ import annotations

import statistics
import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.time_to_target')

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax
from benchmarks import _harness as H
from examples.common import load_dataset, make_model
from flax import nnx

PEER_ERRORS: dict[str, str] = {}


def _psgd_kron(lr):
  try:
    import optax._src  # noqa: F401
    from optax.transforms import _clipping
    # psgd-jax 0.2.9 imports optax._src.clipping, which optax 0.2.8 moved to
    # optax.transforms; it uses nothing from it, so an alias lets it import.
    sys.modules.setdefault('optax._src.clipping', _clipping)
    from psgd_jax.kron import kron
  except Exception as e:  # noqa: BLE001
    PEER_ERRORS['psgd_kron'] = f'{type(e).__name__}: {e}'
    return None
  return kron(lr)


def _muon_dims(params):
  def dims(p):
    if p.ndim == 2:
      return optax.contrib.MuonDimensionNumbers(0, 1)
    if p.ndim == 4:   # conv (kh, kw, in, out): a (kh·kw·in) × out matrix
      return optax.contrib.MuonDimensionNumbers((0, 1, 2), 3)
    return None       # biases: Adam
  return jax.tree.map(dims, params)


OPTIMIZERS = {
    'momentum': lambda: optax.sgd(0.05, momentum=0.9),
    'adam': lambda: optax.adam(1e-3),
    'fop': lambda: fop_optax.fop(0.05, momentum=0.9),
    'fop_adam': lambda: fop_optax.fop_adam(1e-3),
    'shd': lambda: fop_optax.sgd_hd(0.05, momentum=0.9),
    'muon': lambda: optax.contrib.muon(0.02, adam_learning_rate=1e-3,
                                       muon_weight_dimension_numbers=_muon_dims),
    'psgd_kron': lambda: _psgd_kron(1e-3),
}
LABELS = {'momentum': 'momentum', 'adam': 'Adam', 'fop': 'FOP+momentum', 'fop_adam': 'FOP+Adam',
          'shd': 'S-HD', 'muon': 'Muon (optax.contrib)', 'psgd_kron': 'PSGD kron (psgd-jax)'}


def run(kind, name, data, args, seed):
  x_train, y_train, x_test, y_test = data
  tx = OPTIMIZERS[name]()
  if tx is None:
    return None
  graphdef, state = nnx.split(make_model(kind, x_train.shape[1:])(seed), nnx.Param)
  params = nnx.to_pure_dict(state)

  def as_model(params):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st)

  def loss_fn(params, x, y):
    model = as_model(params)
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, x, y):
    model = as_model(params)
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  n, b = len(x_train), args.batch_size
  order = np.concatenate([rng.permutation(n) for _ in range(args.epochs + 1)])
  steps = args.epochs * (n // b)
  xt, yt = jnp.asarray(x_test[:args.test_subset]), jnp.asarray(y_test[:args.test_subset])
  # Compile outside the clock (on a throw-away copy of the state).
  jax.block_until_ready(step(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state),
                             jnp.asarray(x_train[:b]), jnp.asarray(y_train[:b])))
  accuracy(params, xt, yt).block_until_ready()

  ema, clock = None, 0.0
  hit = {'acc': None, 'loss': None}
  curve = []
  for i in range(steps):
    idx = order[i * b:(i + 1) * b]
    x, y = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, x, y)
    loss = float(loss)   # syncs
    clock += time.perf_counter() - t0
    ema = loss if ema is None else 0.9 * ema + 0.1 * loss
    if not np.isfinite(loss):
      break
    if hit['loss'] is None and i >= 20 and ema <= args.loss_target:
      hit['loss'] = (i + 1, clock)
    if (i + 1) % args.eval_every == 0 or i + 1 == steps:
      acc = float(accuracy(params, xt, yt))
      curve.append((i + 1, round(clock, 3), round(ema, 4), round(acc, 4)))
      if hit['acc'] is None and acc >= args.acc_target[kind]:
        hit['acc'] = (i + 1, clock)
  final_acc = float(accuracy(params, jnp.asarray(x_test), jnp.asarray(y_test)))
  return dict(model=kind, optimizer=name, seed=seed, steps=steps, wall_s=clock,
              ms_per_step=1e3 * clock / max(len(curve) and curve[-1][0], 1),
              final_test_acc=final_acc, final_train_loss_ema=ema,
              acc_step=hit['acc'] and hit['acc'][0], acc_wall_s=hit['acc'] and hit['acc'][1],
              loss_step=hit['loss'] and hit['loss'][0], loss_wall_s=hit['loss'] and hit['loss'][1],
              curve=curve)


def summarize(runs):
  """Per (model, optimiser): medians over seeds; None where most seeds missed the target."""
  out = []
  for key in dict.fromkeys((r['model'], r['optimizer']) for r in runs):
    rs = [r for r in runs if (r['model'], r['optimizer']) == key]

    def med(field):
      vals = [r[field] for r in rs if r[field] is not None]
      return statistics.median(vals) if len(vals) * 2 > len(rs) else None

    out.append(dict(model=key[0], optimizer=key[1], seeds=len(rs),
                    acc_reached=sum(r['acc_step'] is not None for r in rs),
                    loss_reached=sum(r['loss_step'] is not None for r in rs),
                    acc_step=med('acc_step'), acc_wall_s=med('acc_wall_s'),
                    loss_step=med('loss_step'), loss_wall_s=med('loss_wall_s'),
                    ms_per_step=med('ms_per_step'), final_test_acc=med('final_test_acc'),
                    final_train_loss=med('final_train_loss_ema')))
  return out


def format_table(summary, args) -> str:
  def f(x, fmt):
    return '—' if x is None else format(x, fmt)
  lines = []
  for kind in dict.fromkeys(s['model'] for s in summary):
    # Ranked by steps to the accuracy target (what an optimiser buys; wall time on a shared
    # CPU mostly measures the load), then wall time, then final accuracy for the ones that missed.
    rows = sorted((s for s in summary if s['model'] == kind),
                  key=lambda s: (s['acc_step'] is None, s['acc_step'] or 0, s['acc_wall_s'] or 0,
                                 -(s['final_test_acc'] or 0)))
    lines.append(f"\n{kind}: test acc ≥ {args.acc_target[kind]} (on {args.test_subset} test "
                 f"images), train-loss EMA ≤ {args.loss_target}; medians over {rows[0]['seeds']} seeds; "
                 "ranked by steps to the accuracy target")
    lines.append('| rank | optimiser | steps to acc | s to acc | steps to loss | s to loss '
                 '| ms/step | final test acc | final loss |')
    lines.append('|---|---|---|---|---|---|---|---|---|')
    for rank, s in enumerate(rows, 1):
      lines.append(
          f"| {rank} | {LABELS[s['optimizer']]} | {f(s['acc_step'], '.0f')} ({s['acc_reached']}/{s['seeds']}) "
          f"| {f(s['acc_wall_s'], '.1f')} | {f(s['loss_step'], '.0f')} ({s['loss_reached']}/{s['seeds']}) "
          f"| {f(s['loss_wall_s'], '.1f')} | {f(s['ms_per_step'], '.1f')} "
          f"| {f(s['final_test_acc'], '.4f')} | {f(s['final_train_loss'], '.3f')} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='time_to_target')
  parser.add_argument('--models', default='mlp,cnn')
  parser.add_argument('--optimizers', default=','.join(OPTIMIZERS))
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--epochs', type=int, default=2, help='budget, the same for all')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--eval-every', type=int, default=10)
  parser.add_argument('--test-subset', type=int, default=2000)
  parser.add_argument('--acc-target-mlp', type=float, default=0.78)
  parser.add_argument('--acc-target-cnn', type=float, default=0.6)
  parser.add_argument('--loss-target', type=float, default=0.9)
  parser.add_argument('--train-subset', type=int, default=6400,
                      help='first N training images (0: all 60,000); the default fits 2 CPU cores')
  parser.add_argument('--data-dir', default=None)
  args = H.apply_quick(parser.parse_args(argv), parser, models='mlp', optimizers='momentum,fop',
                       seeds=1, epochs=1, train_subset=512, test_subset=200, eval_every=2)
  args.acc_target = {'mlp': args.acc_target_mlp, 'cnn': args.acc_target_cnn}

  data = load_dataset('fashion_mnist', args.data_dir)
  if args.train_subset:
    data = (data[0][:args.train_subset], data[1][:args.train_subset], data[2], data[3])
  runs, t0 = [], time.perf_counter()
  for kind in args.models.split(','):
    for seed in range(args.seeds):
      for name in args.optimizers.split(','):  # interleaved: machine load hits all alike
        r = run(kind, name, data, args, seed)
        if r is not None:
          runs.append(r)
          print(f"[{kind} {name} seed {seed}: {r['wall_s']:.1f}s, acc@{r['acc_step']}, "
                f"loss@{r['loss_step']}, final {r['final_test_acc']:.4f}; "
                f"{time.perf_counter() - t0:.0f}s total]", file=sys.stderr, flush=True)
  summary = summarize(runs)
  # Written before the table is printed: a long run's data is never lost.
  meta = H.metadata(args, argv=argv, module='benchmarks.time_to_target', t0=t0)
  H.write_json(args.out, meta, announce=False, summary=summary, runs=runs, peer_errors=PEER_ERRORS)
  print(format_table(summary, args))
  for name, err in PEER_ERRORS.items():
    print(f'{name}: not run ({err})')
  print(H.saved_line(args.out, meta))
  return summary


if __name__ == '__main__':
  main()
