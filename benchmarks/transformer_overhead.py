"""FOP's cost on a Transformer block built from Flax NNX's own layers.

One pre-norm block (``nnx.Embed`` → ``nnx.LayerNorm`` → causal
``nnx.MultiHeadAttention`` → ``nnx.LayerNorm`` → ``nnx.Linear`` GELU MLP →
``nnx.Linear`` head over the vocabulary), trained on next-token prediction.
The same jit-compiled step (forward, backward, ``tx.update``,
``apply_updates``; parameters and optimiser state donated) is timed with
``fop_optax.fop(η, 0.9)`` and with ``optax.sgd(η, momentum=0.9)``. Repetitions
are interleaved (the order rotates every repetition) and each FOP time is
divided by the momentum time of the *same* repetition, so a shared machine
slows both sides of a ratio alike; the table gives the median ratio with its
min–max. "update" rows time ``tx.update`` + ``apply_updates`` alone on a fixed
gradient tree. "state/params" is the bytes of the optimiser state over the
bytes of the parameters.

With the default rule (``fop_optax.structures``) the embedding table, the
LayerNorms and all biases get no preconditioner; the attention ``query``/
``key``/``value`` kernels ``(d, heads, d/heads)`` get a low-rank ``P`` over
their ``d`` input features, the ``out`` kernel ``(heads, d/heads, d)`` one over
its ``heads × d/heads`` inputs, and the MLP and head kernels are low rank over
their inputs (all at ``d = 128 > max_full_dim``).

"fop (old rule)" is the same block under the shape-only rule this replaced
(every rank ≥ 3 leaf read as a conv kernel: a dense 128×128 ``P`` per
attention kernel, a low-rank one over the 1000-row embedding table).

Run from the repository root: ``python3 -m benchmarks.transformer_overhead`` (about 1–2 minutes
on 2 CPU cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import statistics
import sys
import time

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.transformer_overhead')

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import fop_optax
from benchmarks import _harness as H
# The donated update step and the state bytes are overhead.py's; the interleaved rounds the harness's.
from benchmarks.overhead import _make_update, _nbytes
from fop_optax import structures as S

LR = 0.05
TARGET = 1.15


class Block(nnx.Module):
  """A pre-norm Transformer block with an untied output head."""

  def __init__(self, vocab, d, heads, hidden, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(tokens))
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))
    return self.head(x)


def old_rule(params):
  """The shape-only rule before issue 10: every rank >= 3 leaf read as a conv kernel.

  Attention kernels ``(d, heads, d/heads)`` got a dense ``d×d`` "spatial" ``P``
  and the embedding table a low-rank ``P`` over the vocabulary.
  """
  return jax.tree.map(lambda x: S.NoPreconditioner() if x.ndim <= 1 else
                      S.Spatial() if x.ndim >= 3 else S.default_structure(x.shape), params)


def _make_step(graphdef, tx):
  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def structure_summary(params) -> dict[str, str]:
  flat = jax.tree_util.tree_flatten_with_path(
      fop_optax.resolve_structures(params), is_leaf=lambda x: isinstance(x, S.Structure))[0]
  return {'/'.join(S.leaf_names(p)): repr(s) for p, s in flat}


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='transformer_overhead', rounds=15)
  parser.add_argument('--vocab', type=int, default=1000)
  parser.add_argument('--d-model', type=int, default=128)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--inner', type=int, default=5, help='steps per timing')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--no-old-rule', action='store_true',
                      help='skip the "fop (old rule)" row (the pre-issue-10 shape-only rule)')
  args = H.apply_quick(parser.parse_args(argv), parser, vocab=100, d_model=32, hidden=64, seq=8,
                       batch=4, rounds=2, inner=1, warmup=1)
  t_start = time.perf_counter()

  model = Block(args.vocab, args.d_model, args.heads, args.hidden, nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.to_pure_dict(params0)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(2), p.shape), params0)
  txs = {'momentum': lambda: optax.sgd(LR, momentum=0.9), 'fop': lambda: fop_optax.fop(LR, 0.9)}
  if not args.no_old_rule:
    txs['fop (old rule)'] = lambda: fop_optax.fop(LR, 0.9, structures=old_rule)

  step_runners, update_runners, memory = {}, {}, {}
  for name, make_tx in txs.items():
    tx = make_tx()
    for kind, runners in (('step', step_runners), ('update', update_runners)):
      fn = _make_step(graphdef, tx) if kind == 'step' else _make_update(tx)
      box = [jax.tree.map(jnp.copy, params0), tx.init(params0)]
      memory[name] = _nbytes(box[1]) / _nbytes(params0)

      def run(fn=fn, box=box, kind=kind):
        out = fn(box[0], box[1], tokens) if kind == 'step' else fn(box[0], box[1], grads)
        box[0], box[1] = out[0], out[1]
        jax.block_until_ready(box)

      for _ in range(args.warmup):  # compiles, then warms caches
        run()
      runners[name] = run

  step_t = H.interleaved(step_runners, args.rounds, args.inner)
  update_t = H.interleaved(update_runners, args.rounds, args.inner * 4)
  step_r, update_r = H.ratios(step_t, 'momentum'), H.ratios(update_t, 'momentum')  # per round

  rows = []
  for name in txs:
    s, u = step_t[name], update_t[name]
    sr, ur = step_r[name], update_r[name]
    rows.append(dict(
        optimizer=name, step_ms=1e3 * statistics.median(s),
        step_ratio=statistics.median(sr), step_ratio_min=min(sr), step_ratio_max=max(sr),
        update_ms=1e3 * statistics.median(u),
        update_ratio=statistics.median(ur), update_ratio_min=min(ur), update_ratio_max=max(ur),
        state_over_params=memory[name]))

  head = (f"{'optimizer':<16}{'step ms':>9}  {'step ratio [min-max]':<22}{'update ms':>10}  "
          f"{'update ratio [min-max]':<24}{'state/params':>12}  target")
  print(head)
  print('-' * len(head))
  for r in rows:
    met = '' if r['optimizer'] != 'fop' else f"≤{TARGET} {'met' if r['step_ratio'] <= TARGET else 'MISSED'}"
    print(f"{r['optimizer']:<16}{r['step_ms']:>9.2f}  "
          + f"{r['step_ratio']:.3f} [{r['step_ratio_min']:.3f}-{r['step_ratio_max']:.3f}]".ljust(22)
          + f"{r['update_ms']:>10.3f}  "
          + f"{r['update_ratio']:.2f} [{r['update_ratio_min']:.2f}-{r['update_ratio_max']:.2f}]".ljust(24)
          + f"{r['state_over_params']:>12.3f}  {met}")

  H.save_rows(args.out, H.metadata(args, argv=argv, module='benchmarks.transformer_overhead',
                                   t0=t_start, params=sum(p.size for p in jax.tree.leaves(params0)),
                                   structures=structure_summary(params0)), rows)
  return rows


if __name__ == '__main__':
  main()
