"""Wall time of one-pass hyperparameter optimisation next to plain SGD.

Clarke et al. (ICLR 2022) put the cost of one-pass HPO at "2–3× vanilla training". Per period of
``T`` steps it does ``T`` training gradients, one validation gradient at the new weights, the
training gradient once more (kept with its VJP) and ``K − 1`` Hessian-vector products
(each about two gradients' work): ``(T + 2 + 2(K − 1))/T ≈ 2×`` with the defaults ``T = 10``,
``K = 5``.

For each model, one jit-compiled call runs one whole period (``lax.scan`` over ``T`` steps:
forward, backward, optimiser update, ``apply_updates``; parameters and state donated), so the
hyper step's cost is averaged over its period exactly as in training, and Python dispatch is
out of the picture. Repetitions are interleaved (the order rotates every repetition) and each
time is divided by plain SGD's in the *same* repetition, so a noisy, shared machine slows both
sides of a ratio alike. Printed: the median ratio with its min–max over repetitions, of wall
time and of this process's CPU time (``time.process_time``, all threads): on a machine shared with
other jobs the CPU-time ratio is the steadier measure of the work done.

Optimisers: ``sgd`` (``optax.chain(optax.add_decayed_weights(ω), optax.sgd(η, μ))``, the
baseline), ``one_pass_hpo(learn=())`` (the same SGD through this module: its own overhead),
``one_pass_hpo()`` (η, μ, ω learned, K = 5), the per-parameter-η variant, K = 1 / K = 10 to
show how the cost grows with the Neumann terms, K = 5 with forward-over-reverse Hessian-vector
products (``jax.linearize``; the module uses reverse-over-reverse), and ``one_pass_hpo_injected`` (``jax.vjp`` through
the optimiser's update) for an injected SGD (η, μ, ω) and an injected Adam (its learning rate).

Models: ``fmnist_mlp``, the paper's Fashion-MNIST MLP 784-50-10 at batch 50; ``mlp``,
784-1024-1024-10 at batch 128 (as in ``benchmarks/overhead.py``).

Run from the repository root: ``python3 -m benchmarks.one_pass_cost`` (about 6–8 minutes on 2
busy CPU cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.one_pass_cost')

import jax
import jax.numpy as jnp
import optax

import fop_optax
from benchmarks import _harness as H

LR, MOMENTUM, WD, PERIOD = 0.05, 0.9, 1e-4, 10

MODELS = {'fmnist_mlp': ((784, 50, 10), 50), 'mlp': ((784, 1024, 1024, 10), 128)}

def _sgd(learning_rate, momentum, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum))


OPTIMIZERS = {
    'sgd': lambda: optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM)),
    'one_pass learn=()': lambda: fop_optax.one_pass_hpo(LR, MOMENTUM, WD, learn=()),
    'one_pass K=5': lambda: fop_optax.one_pass_hpo(LR, MOMENTUM, WD, period=PERIOD),
    'one_pass K=5 per-param η': lambda: fop_optax.one_pass_hpo(
        LR, MOMENTUM, WD, period=PERIOD, per_parameter=('learning_rate',)),
    'one_pass K=1': lambda: fop_optax.one_pass_hpo(LR, MOMENTUM, WD, period=PERIOD,
                                                   neumann_terms=1),
    'one_pass K=10': lambda: fop_optax.one_pass_hpo(LR, MOMENTUM, WD, period=PERIOD,
                                                    neumann_terms=10),
    # The generic path: jax.vjp through an inject_hyperparams SGD instead of closed forms.
    'injected sgd K=5': lambda: fop_optax.one_pass_hpo_injected(
        optax.inject_hyperparams(_sgd)(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD),
        learn=('learning_rate', 'momentum', 'weight_decay'), period=PERIOD),
    'injected adam K=5 (lr)': lambda: fop_optax.one_pass_hpo_injected(
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), period=PERIOD),
}


def _hvp_linearize(hvp_fn):
  """``curvature.hvp_fn`` always in ``mode='forward'`` (forward-over-reverse, ``jax.linearize`` of
  the gradient): the alternative to the reverse-over-reverse products one_pass_hpo asks for."""
  return lambda fun, params, *, mode='forward': hvp_fn(fun, params, mode='forward')


# Rows whose one_pass_hpo is compiled with another Hessian-vector product (an A/B of the helper).
HVP_VARIANTS = {'one_pass K=5 HVP linearize': _hvp_linearize}
OPTIMIZERS['one_pass K=5 HVP linearize'] = OPTIMIZERS['one_pass K=5']


def init_mlp(key, sizes):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k = jax.random.split(key)
    params[f'w{i}'] = jax.random.normal(k, (a, b)) / math.sqrt(a)
    params[f'b{i}'] = jnp.zeros(b)
  return params


def apply_mlp(params, x):
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f'w{i}'] + params[f'b{i}']
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


def make_period(tx, extra: bool):
  """One jitted call = one period of PERIOD steps (batches stacked along axis 0)."""
  def step(carry, batch):
    params, state = carry
    x, y, xv, yv = batch
    grads = jax.grad(loss_fn)(params, x, y)
    kwargs = dict(value_fn=lambda p: loss_fn(p, x, y),
                  validation_value_fn=lambda p: loss_fn(p, xv, yv)) if extra else {}
    updates, state = tx.update(grads, state, params, **kwargs)
    return (optax.apply_updates(params, updates), state), None

  def period(params, state, batches):
    return jax.lax.scan(step, (params, state), batches)[0]

  return jax.jit(period, donate_argnums=(0, 1))


def bench_model(name, args):
  sizes, batch = MODELS[name]
  key = jax.random.key(0)
  params0 = init_mlp(key, sizes)
  k = jax.random.split(jax.random.fold_in(key, 1), 4)
  batches = (jax.random.uniform(k[0], (PERIOD, batch, sizes[0])),
             jax.random.randint(k[1], (PERIOD, batch), 0, sizes[-1]),
             jax.random.uniform(k[2], (PERIOD, batch, sizes[0])),
             jax.random.randint(k[3], (PERIOD, batch), 0, sizes[-1]))
  runners = {}
  for opt, make in OPTIMIZERS.items():
    tx = make()
    fn = make_period(tx, extra=opt != 'sgd')
    box = [jax.tree.map(jnp.copy, params0), tx.init(params0)]

    def run(fn=fn, box=box):
      box[0], box[1] = fn(box[0], box[1], batches)
      jax.block_until_ready(box)

    curvature = fop_optax.one_pass.curvature   # one_pass_hpo reads curvature.hvp_fn when traced
    default_hvp = curvature.hvp_fn
    if opt in HVP_VARIANTS:  # compiled (during warm-up) with the other product
      curvature.hvp_fn = HVP_VARIANTS[opt](default_hvp)
    try:
      for _ in range(args.warmup):
        run()
    finally:
      curvature.hvp_fn = default_hvp
    runners[opt] = run

  clocks = H.interleaved_clocks(runners, args.rounds, args.inner,
                                {'wall': time.perf_counter, 'cpu': time.process_time})
  times, cpu = clocks['wall'], clocks['cpu']
  ratios, cpu_ratios = H.ratios(times, 'sgd'), H.ratios(cpu, 'sgd')   # per round
  rows = []
  for opt in runners:
    ratio, cpu_ratio = ratios[opt], cpu_ratios[opt]
    rows.append(dict(model=name, optimizer=opt, batch=batch,
                     params=sum(p.size for p in jax.tree.leaves(params0)),
                     ms_per_step=1e3 * statistics.median(times[opt]) / PERIOD,
                     ratio=statistics.median(ratio), ratio_min=min(ratio), ratio_max=max(ratio),
                     cpu_ms_per_step=1e3 * statistics.median(cpu[opt]) / PERIOD,
                     cpu_ratio=statistics.median(cpu_ratio), cpu_ratio_min=min(cpu_ratio),
                     cpu_ratio_max=max(cpu_ratio)))
  return rows


def format_table(rows) -> str:
  head = (f"{'model':<12}{'optimizer':<26}{'ms/step':>9}  {'wall ÷ sgd [min-max]':<22}"
          f"{'CPU ms/step':>12}  CPU time ÷ sgd [min-max]")
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f"{r['model']:<12}{r['optimizer']:<26}{r['ms_per_step']:>9.3f}  "
                 + f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]".ljust(22)
                 + f"{r['cpu_ms_per_step']:>12.3f}  "
                 f"{r['cpu_ratio']:.2f} [{r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f}]")
  return '\n'.join(lines)


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='one_pass_cost', rounds=15)
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--inner', type=int, default=3, help='periods per timing')
  parser.add_argument('--warmup', type=int, default=2)
  args = H.apply_quick(parser.parse_args(argv), parser, models='fmnist_mlp', rounds=2, inner=1,
                       warmup=1)
  rows, t0 = [], time.perf_counter()
  for name in args.models.split(','):
    if name not in MODELS:
      parser.error(f'unknown model {name!r}; choose from {tuple(MODELS)}')
    rows += bench_model(name, args)
    print(f'[{name} done, {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
  print(format_table(rows))
  H.save_rows(args.out, H.metadata(args, argv=argv, module='benchmarks.one_pass_cost', t0=t0), rows)
  return rows


if __name__ == '__main__':
  main()
