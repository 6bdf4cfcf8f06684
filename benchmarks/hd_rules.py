"""Which hypergradient rule converges from any initial step size? Prints a table.

For sgd_hd (plain and with momentum 0.9) and adam_hd, each rule
('additive', 'multiplicative', 'log') at its default hyper learning rate (or
``--beta``), from α_0 ∈ {1e-4, 1e-3, 1e-2}:

* ``rosenbrock``: f = (1−x)² + 100(y−x²)² from (0, 0), 30,000 steps; converged
  if max |θ − (1, 1)| <= 3e-2 (optax's own test tolerance).
* ``quadratic``: f = ½(1000·x₀² + x₁²) from (1, 1), 30,000 steps; converged if
  max |θ| <= 1e-3.
* ``digits``: examples/common.py's CNN on scikit-learn digits, batch 32,
  ``--epochs`` epochs (default 10 = 440 steps, as examples/classify.py),
  seeds 0-2; converged if every seed ends with test accuracy >= 0.9 (the
  full-batch train loss is printed too).

All runs of one (optimiser, rule, problem) share one compiled program: α_0 is
a traced argument. Usage::

  python3 -m benchmarks.hd_rules                 # everything (about 10 min on 2 cores)
  python3 -m benchmarks.hd_rules --problems rosenbrock quadratic --rules log
  python3 -m benchmarks.hd_rules --quick         # a smoke run: 300 steps, 1 epoch, 1 seed

(from the repository root; the table's rows also go to ``--out``, JSON with metadata).
"""

from __future__ import annotations

import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.hd_rules')

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax
from benchmarks import _harness as H

ALPHAS = (1e-4, 1e-3, 1e-2)
RULES = ('additive', 'multiplicative', 'log')
OPTIMIZERS = {
    'sgd_hd': lambda a, rule, beta: fop_optax.sgd_hd(a, beta, rule=rule),
    'sgd_hd_mom': lambda a, rule, beta: fop_optax.sgd_hd(a, beta, momentum=0.9, rule=rule),
    'adam_hd': lambda a, rule, beta: fop_optax.adam_hd(a, beta, rule=rule),
}


def _final_rate(state):
  inner = state.inner_state[0]
  return jnp.max(jnp.stack([jnp.max(x) for x in jax.tree.leaves(inner.learning_rates)]))


def toy(problem: str, make, steps: int = 30_000):
  if problem == 'rosenbrock':
    f = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
    x0, sol, tol = jnp.zeros(2), jnp.ones(2), 3e-2
  else:
    f = lambda p: 0.5 * (1000 * p[0] ** 2 + p[1] ** 2)
    x0, sol, tol = jnp.ones(2), jnp.zeros(2), 1e-3

  def run(alpha0):
    tx = make(alpha0)

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(f)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
    return p, _final_rate(s), s.skipped_steps

  # Not vmapped: under vmap skip_nonfinite's warning check runs on every step.
  run = jax.jit(run)
  p, rate, skipped = (np.stack(v) for v in zip(*[
      [np.asarray(x) for x in run(jnp.float32(a))] for a in ALPHAS]))
  err = np.max(np.abs(np.asarray(p) - np.asarray(sol)), axis=1)
  ok = np.isfinite(err) & (err <= tol)
  return [dict(alpha0=a, ok=bool(o), err=float(e), final=np.asarray(pi).tolist(),
               rate=float(r), skipped=int(sk))
          for a, o, e, pi, r, sk in zip(ALPHAS, ok, err, p, rate, skipped)]


def digits(make, epochs: int, seeds=(0, 1, 2), batch_size: int = 32):
  from flax import nnx

  from examples import common  # pylint: disable=import-outside-toplevel
  x_tr, y_tr, x_te, y_te = common.load_dataset('digits')
  n_steps = len(x_tr) // batch_size
  x_tr, y_tr, x_te, y_te = map(jnp.asarray, (x_tr, y_tr, x_te, y_te))
  graphdef, _ = nnx.split(common.CNN(1, 10, rngs=nnx.Rngs(0)))

  def loss(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  @jax.jit
  def run(alpha0, p, batches):
    # alpha0 is traced, so all runs share one compiled program.
    tx = make(alpha0)

    def step(carry, b):
      p, s = carry
      g = jax.grad(lambda q: loss(q, x_tr[b], y_tr[b])[0])(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(step, (p, tx.init(p)), batches)
    train_loss = loss(p, x_tr, y_tr)[0]
    acc = jnp.mean(loss(p, x_te, y_te)[1].argmax(-1) == y_te)
    return train_loss, acc, _final_rate(s), s.skipped_steps

  out = []
  for a in ALPHAS:
    res = []
    for seed in seeds:
      # Same data order and initial weights as examples/common.train for this seed.
      rng = np.random.default_rng(seed)
      idx = np.concatenate([rng.permutation(len(x_tr))[:n_steps * batch_size]
                            for _ in range(epochs)]).reshape(-1, batch_size)
      params = nnx.split(common.CNN(1, 10, rngs=nnx.Rngs(seed)))[1]
      res.append([np.asarray(v) for v in run(jnp.float32(a), params, jnp.asarray(idx))])
    losses, accs, rates, skipped = (np.array(v) for v in zip(*res))
    out.append(dict(alpha0=a, ok=bool(np.all(np.isfinite(losses)) and np.all(accs >= 0.9)),
                    acc=accs.tolist(), loss=losses.tolist(), rate=rates.tolist(),
                    skipped=skipped.tolist()))
  return out


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='hd_rules')
  parser.add_argument('--problems', nargs='+', default=['rosenbrock', 'quadratic', 'digits'])
  parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS))
  parser.add_argument('--rules', nargs='+', default=list(RULES))
  parser.add_argument('--beta', type=float, default=None,
                      help='hyper learning rate for all runs (default: each rule\'s default)')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--steps', type=int, default=30_000, help='rosenbrock / quadratic steps')
  parser.add_argument('--seeds', type=int, default=3, help='digits: seeds 0 .. N-1')
  args = H.apply_quick(parser.parse_args(argv), parser, steps=300, epochs=1, seeds=1)
  t0, rows = time.perf_counter(), []
  print(f'jax {jax.__version__}, optax {optax.__version__}, beta={args.beta or "default"}')
  print('| problem | optimiser | rule | α0=1e-4 | α0=1e-3 | α0=1e-2 | all converge | seconds |')
  print('|---|---|---|---|---|---|---|---|')
  for problem in args.problems:
    for opt in args.optimizers:
      for rule in args.rules:
        make = lambda a, opt=opt, rule=rule: OPTIMIZERS[opt](a, rule, args.beta)
        start = time.perf_counter()
        res = (digits(make, args.epochs, seeds=tuple(range(args.seeds))) if problem == 'digits'
               else toy(problem, make, steps=args.steps))
        secs = time.perf_counter() - start
        if problem == 'digits':
          cells = [f"{'ok' if r['ok'] else 'FAIL'} acc {min(r['acc']):.3f}-{max(r['acc']):.3f}"
                   f" loss {max(r['loss']):.3g} α {np.median(r['rate']):.2g}" for r in res]
        else:
          cells = [f"{'ok' if r['ok'] else 'FAIL'} err {r['err']:.2g} α {r['rate']:.2g}"
                   + (f" skip {r['skipped']}" if r['skipped'] else '') for r in res]
        print(f"| {problem} | {opt} | {rule} | {' | '.join(cells)} | "
              f"{'yes' if all(r['ok'] for r in res) else 'no'} | {secs:.0f} |", flush=True)
        rows.append(dict(problem=problem, optimizer=opt, rule=rule, runs=res, seconds=secs,
                         all_converge=all(r['ok'] for r in res)))
  H.save_rows(args.out, H.metadata(args, argv=argv, module='benchmarks.hd_rules', t0=t0), rows)
  return rows


if __name__ == '__main__':
  main()
