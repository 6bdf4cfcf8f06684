"""Not part of fop_optax (a measurement for docs/benchmarks.md §3): what would `update_every=k` (hypergradient + hyper step only every k-th step) save?

Wraps fop_optax.scale_by_fop: on the steps it skips, only P·G with the current M is applied and the
gradient is stored (so the next hyper step still sees consecutive gradients G_t, G_{t-1}); the choice is
a lax.cond inside the jitted step, as an optax implementation would do it. 'precondition only' never
takes a hyper step (k = ∞): the floor any update_every can reach.
Timing via benchmarks/overhead.py's bench_case (interleaved reps, ratios to momentum per rep).
Run: ``python benchmarks/update_every.py --reps 30`` (under a minute on 2 CPU cores).
"""
import sys, os, json, argparse
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.join(HERE, '..'))
import jax, jax.numpy as jnp, optax
import fop_optax
from fop_optax import structures as S
from optax._src import numerics
import overhead as ov


def scale_by_fop_every(k, lr=ov.LR, **kw):
  inner = fop_optax.scale_by_fop(lr, **kw)

  def update(g, state, params=None):
    def full(_):
      return inner.update(g, state, params)

    def cheap(_):
      structs = jax.tree.leaves(S.resolve_structures(g))
      ms = jax.tree.leaves(state.preconditioners)
      new = jax.tree.structure(g).unflatten(
          [s.precondition(m, x) for s, m, x in zip(structs, ms, jax.tree.leaves(g))])
      return new, state._replace(count=numerics.safe_increment(state.count),
                                 last_gradient=optax.tree.cast_like(g, state.last_gradient))
    if k is None:
      return cheap(None)
    # hyper step on counts 1, 1+k, 1+2k, ... (count 0 has no previous gradient: full() is a no-op step there)
    take = (state.count % k == 1) | (state.count == 0) if k > 1 else jnp.array(True)
    return jax.lax.cond(take, full, cheap, None)

  return optax.GradientTransformation(inner.init, update)


def chain(k):
  return lambda: optax.chain(scale_by_fop_every(k), optax.sgd(ov.LR, momentum=0.9))


if __name__ == '__main__':
  p = argparse.ArgumentParser()
  p.add_argument('--models', default='mlp')
  p.add_argument('--reps', type=int, default=15)
  p.add_argument('--inner', type=int, default=4)
  p.add_argument('--warmup', type=int, default=3)
  args = p.parse_args()
  rows = []
  for name in args.models.split(','):
    model = {'mlp': ov.mlp(), 'transformer': ov.transformer()}[name]
    batch = {'mlp': 128, 'transformer': 16}[name]
    case = ov.Case(name, model, batch, {'fop every step': ov.fop_chain,
                                        'fop cond k=1': chain(1),
                                        'fop update_every=2': chain(2),
                                        'fop update_every=4': chain(4),
                                        'precondition only': chain(None)})
    rows += ov.bench_case(case, args)
    for r in rows:
      if r['model'] == name:
        print(f"{name:12s}{r['optimizer']:22s} step {r['step_ms']:8.2f} ms  ratio {r['step_ratio']:.3f} "
              f"[{r['step_ratio_min']:.3f}-{r['step_ratio_max']:.3f}]  update {r['update_ms']:.3f} ms "
              f"ratio {r['update_ratio']:.2f} [{r['update_ratio_min']:.2f}-{r['update_ratio_max']:.2f}]",
              flush=True)
  os.makedirs('results', exist_ok=True)
  json.dump(rows, open(os.path.join('results', 'update_every.json'), 'w'), indent=1)
