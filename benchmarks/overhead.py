"""FOP's cost next to its base optimiser: step time, update time and state memory.

For each model the same jit-compiled training step (forward, backward,
optimiser update, ``apply_updates``; parameters and state donated) is timed
with ``optax.sgd(η, momentum=0.9)`` alone and with
``optax.chain(fop_optax.scale_by_fop(η), optax.sgd(η, momentum=0.9))``.
Repetitions are interleaved (the order rotates every repetition) and each
FOP timing is divided by the momentum timing of the *same* repetition, so a
noisy, shared machine slows both sides of a ratio alike. The table gives the
median ratio with its min–max over repetitions.

Models (plain JAX, Flax parameter layouts):

* ``cnn``: the 9-layer all-convolutional net of Springenberg et al. (the FOP
  paper's CIFAR-10 model) on 32×32×3 images, batch 128; conv kernels
  ``(3, 3, in, out)`` get spatial FOP (one 9×9 matrix per layer).
* ``mlp``: 784-1024-1024-10, batch 128; kernels with ``in > 64`` get low-rank
  FOP (rank 8) by default; ``full`` forces dense ``in×in`` matrices.
* ``transformer``: one pre-norm block, width 512, 8 heads, MLP 2048, on
  sequences of 64 tokens; all dense kernels are low-rank.

* ``dense64`` … ``dense4096``: one dense layer ``(a, 256)``, batch 128, and
  ``mlp256``: 784-256-256-10, batch 128 (the sweep of issue 12). Here the
  aliases run at their defaults, as a user calls them: ``fop_optax.fop(η)`` ÷
  ``optax.sgd(η, momentum=0.9)`` and ``fop_optax.fop_adam(1e-3)`` ÷
  ``optax.adam(1e-3)`` (guard and non-finite skip included).

"update" columns time the optimiser update alone (``tx.update`` +
``apply_updates`` on a fixed gradient tree, no model). "state/params" is the
bytes of the optimiser state divided by the bytes of the parameters.
"passes" counts the reads and writes of the largest leaf by the compiled
update's top-level ops (:func:`hlo_passes`; the exact per-leaf count for the
one-leaf ``dense`` cases; momentum: 5); "bytes/params" is XLA's ``bytes
accessed`` of the update divided by the parameters' bytes and "flops/param" its
flops per parameter (both from ``cost_analysis()``, where a ``lax.cond`` counts
both branches). "floor" is the step ratio FOP's arithmetic
allows on a compute-bound machine: ``1 + F_fop / F_step``, ``F_step`` the
momentum train step's flops (``cost_analysis``) and ``F_fop`` the flops
:func:`fop_floor_flops` derives (docs/benchmarks.md, "The floor").

Run from the repository root: ``python3 -m benchmarks.overhead`` (about 3–5 minutes on 2 CPU
cores); ``--quick`` for a smoke run (seconds).
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.overhead')

# Single-threaded OpenBLAS (before jax/scipy load it; an explicit setting wins): jaxlib's CPU QR
# runs on SciPy's OpenBLAS, whose threads stall the guard's QR when the cores are busy
# (docs/troubleshooting.md). Recorded in the results' meta.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import dataclasses
import math
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import fop_optax
from benchmarks import _harness as H

LR = 0.05


# ----------------------------------------------------------------------------- models

def _dense(key, n_in, n_out):
  return {'kernel': jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in),
          'bias': jnp.zeros((n_out,))}


def _conv(key, k, n_in, n_out):
  return {'kernel': jax.random.normal(key, (k, k, n_in, n_out)) / math.sqrt(k * k * n_in),
          'bias': jnp.zeros((n_out,))}


# (kernel size, output channels, stride, padding) of All-CNN-C; widths scale with `width`.
_ALL_CNN_C = ((3, 96, 1, 'SAME'), (3, 96, 1, 'SAME'), (3, 96, 2, 'SAME'),
              (3, 192, 1, 'SAME'), (3, 192, 1, 'SAME'), (3, 192, 2, 'SAME'),
              (3, 192, 1, 'VALID'), (1, 192, 1, 'VALID'), (1, 10, 1, 'VALID'))


def cnn(width: float = 1.0):
  layers = [(k, c if c == 10 else max(1, round(c * width)), s, p) for k, c, s, p in _ALL_CNN_C]

  def init(key):
    keys, n_in, params = jax.random.split(key, len(layers)), 3, {}
    for i, ((k, c, _, _), kk) in enumerate(zip(layers, keys)):
      params[f'conv{i}'] = _conv(kk, k, n_in, c)
      n_in = c
    return params

  def apply(params, x):
    for i, (_, _, s, p) in enumerate(layers):
      w = params[f'conv{i}']
      x = jax.lax.conv_general_dilated(x, w['kernel'], (s, s), p,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + w['bias']
      if i < len(layers) - 1:
        x = jax.nn.relu(x)
    return x.mean(axis=(1, 2))

  return init, apply, lambda key, b: jax.random.uniform(key, (b, 32, 32, 3))


def mlp(sizes=(784, 1024, 1024, 10)):
  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return {f'dense{i}': _dense(k, a, b) for i, (k, a, b) in enumerate(zip(keys, sizes, sizes[1:]))}

  def apply(params, x):
    x = x.reshape(x.shape[0], -1)
    for i in range(len(sizes) - 1):
      w = params[f'dense{i}']
      x = x @ w['kernel'] + w['bias']
      if i < len(sizes) - 2:
        x = jax.nn.relu(x)
    return x

  return init, apply, lambda key, b: jax.random.uniform(key, (b, sizes[0]))


def dense(n_in, n_out=256):
  """One dense layer ``(n_in, n_out)`` with a softmax over ``n_out`` classes: the width sweep."""
  def init(key):
    return {'dense0': _dense(key, n_in, n_out)}

  def apply(params, x):
    return x @ params['dense0']['kernel'] + params['dense0']['bias']

  return init, apply, lambda key, b: jax.random.uniform(key, (b, n_in))


def transformer(d=512, heads=8, hidden=2048, seq=64):
  def init(key):
    k = jax.random.split(key, 6)
    return {'ln1': {'scale': jnp.ones((d,))}, 'ln2': {'scale': jnp.ones((d,))},
            'qkv': _dense(k[0], d, 3 * d), 'out': _dense(k[1], d, d),
            'mlp_in': _dense(k[2], d, hidden), 'mlp_out': _dense(k[3], hidden, d),
            'head': _dense(k[4], d, 10)}

  def norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale

  def apply(params, x):
    b, t, _ = x.shape
    h = norm(x, params['ln1']['scale'])
    qkv = h @ params['qkv']['kernel'] + params['qkv']['bias']
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * heads, d // heads), 3, axis=2)
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
    x = x + att @ params['out']['kernel'] + params['out']['bias']
    h = norm(x, params['ln2']['scale'])
    h = jax.nn.gelu(h @ params['mlp_in']['kernel'] + params['mlp_in']['bias'])
    x = x + h @ params['mlp_out']['kernel'] + params['mlp_out']['bias']
    return x.mean(axis=1) @ params['head']['kernel'] + params['head']['bias']

  return init, apply, lambda key, b: jax.random.normal(key, (b, seq, d))


def _full_for_matrices(params):
  # Dense in×in matrices for every kernel (biases unpreconditioned).
  return jax.tree.map(lambda p: 'full' if p.ndim == 2 else 'none', params)


def momentum():
  return optax.sgd(LR, momentum=0.9)


def _fixed_low_rank_pg(rank: int = 8) -> optax.GradientTransformation:
  """``P·G`` with a fixed random low-rank ``M = I + UVᵀ`` per matrix of the default rule, nothing else.

  A reference for what ``P·G`` itself costs: no stored gradient, no hypergradient, no
  ``lax.cond``; ``M`` is in the state so that XLA cannot fold it into a constant.
  """
  structure = fop_optax.structures.LowRank(rank=rank)

  def init_fn(params):
    structs = fop_optax.resolve_structures(params)
    return jax.tree.map(
        lambda s, p: (0.01 * jax.random.normal(jax.random.key(p.size), (2, p.shape[0], rank))
                      if isinstance(s, fop_optax.structures.LowRank) else jnp.zeros((0,))),
        structs, params)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda m, g: g if m.size == 0 else structure.precondition(m, g),
                        state, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def fop_chain(**kwargs):
  return optax.chain(fop_optax.scale_by_fop(LR, **kwargs), optax.sgd(LR, momentum=0.9))


ADAM_LR = 1e-3


@dataclasses.dataclass
class Case:
  name: str
  model: tuple
  batch: int
  fops: dict[str, Callable[[], optax.GradientTransformation]]
  # Extra base optimisers and, per FOP variant, the base it is divided by (default momentum).
  bases: dict[str, Callable[[], optax.GradientTransformation]] = dataclasses.field(default_factory=dict)
  base_of: dict[str, str] = dataclasses.field(default_factory=dict)


def _defaults(model, name, batch):
  """The aliases as a user calls them (defaults: guard, non-finite skip), each beside its base."""
  return Case(name, model, batch,
              {'fop': lambda: fop_optax.fop(LR), 'fop_adam': lambda: fop_optax.fop_adam(ADAM_LR)},
              bases={'adam': lambda: optax.adam(ADAM_LR)}, base_of={'fop_adam': 'adam'})


DENSE_WIDTHS = (64, 256, 1024, 4096)


def cases(args) -> list[Case]:
  return [
      Case('cnn', cnn(args.cnn_width), args.cnn_batch, {'fop (spatial)': fop_chain}),
      Case('mlp', mlp(), 128, {'fop (low-rank)': fop_chain,
                               'fop (full)': lambda: fop_chain(structures=_full_for_matrices)}),
      Case('transformer', transformer(seq=args.seq), args.tf_batch, {'fop (low-rank)': fop_chain}),
      # Issue 12's sweep: the aliases at their defaults, batch 128.
      *[_defaults(dense(a), f'dense{a}', 128) for a in DENSE_WIDTHS],
      _defaults(mlp((784, 256, 256, 10)), 'mlp256', 128),
      # Cheaper settings for the MLP (not in the default run): rank and update_every.
      Case('mlp256_settings', mlp((784, 256, 256, 10)), 128, {
          f'fop r={r} k={k}': (lambda r=r, k=k: fop_optax.fop(LR, rank=r, update_every=k))
          for r, k in ((8, 1), (4, 1), (8, 4), (4, 4), (4, 8), (2, 8))}),
      # The cheapest setting taken apart: what the non-finite skip, the guard and the
      # hypergradient each add (update_every=10**6: only P·G, the stored gradient and the cond).
      Case('mlp256_cheapest', mlp((784, 256, 256, 10)), 128, {
          name: (lambda kw=kw: fop_optax.fop(LR, rank=2, **kw)) for name, kw in (
              ('fop r=2 k=8', dict(update_every=8)),
              ('fop r=2 k=8 no skip', dict(update_every=8, skip_nonfinite=False)),
              ('fop r=2 k=8 no skip no guard',
               dict(update_every=8, skip_nonfinite=False, max_scale=None)),
              ('fop r=2 P·G only', dict(update_every=10**6, skip_nonfinite=False)))}),
      # The default alias taken apart (rank 8, every step): what the non-finite skip, the
      # guard and the hypergradient each add, and a bare P·G of a fixed low-rank M without
      # FOP's state (no stored gradient, no lax.cond) as the reference for P·G itself.
      Case('mlp256_parts', mlp((784, 256, 256, 10)), 128, {
          **{name: (lambda kw=kw: fop_optax.fop(LR, **kw)) for name, kw in (
              ('fop', {}),
              ('fop no skip', dict(skip_nonfinite=False)),
              ('fop no skip no guard', dict(skip_nonfinite=False, max_scale=None)),
              ('fop P·G only no guard',
               dict(update_every=10**6, skip_nonfinite=False, max_scale=None)))},
          'bare P·G (fixed M) + momentum': lambda: optax.chain(_fixed_low_rank_pg(), momentum()),
          'momentum + skip': lambda: fop_optax.nonfinite.for_alias(momentum())}),
      # The lower bound at any rank: a bare P·G of a fixed rank-r M before momentum (no state
      # but M), beside FOP's cheapest settings without the non-finite skip.
      Case('mlp256_ranks', mlp((784, 256, 256, 10)), 128, {
          **{f'bare P·G r={r} + momentum': (lambda r=r: optax.chain(_fixed_low_rank_pg(r),
                                                                    momentum()))
             for r in (1, 2, 8)},
          **{f'fop r={r} k={k} no skip': (lambda r=r, k=k: fop_optax.fop(
              LR, rank=r, update_every=k, skip_nonfinite=False)) for r, k in ((1, 16), (2, 8))}}),
      # Where the default rule should switch from full to low rank (max_full_dim).
      *[Case(f'dense{a}_switch', dense(a), 128, {
          'fop full': lambda a=a: fop_optax.fop(LR, max_full_dim=a),
          'fop low_rank r=8': lambda a=a: fop_optax.fop(LR, max_full_dim=a - 1),
          'fop low_rank r=4': lambda a=a: fop_optax.fop(LR, max_full_dim=a - 1, rank=4)})
        for a in (16, 32, 64, 128)],
  ]


# ----------------------------------------------------------------------------- timing

def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def _make_step(apply, tx):
  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _make_update(tx):
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(update, donate_argnums=(0, 1))


def _cost_of(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled function: flops and bytes accessed."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'flops': float(cost.get('flops', 0.0)), 'bytes': float(cost.get('bytes accessed', 0.0))}


_NO_TRAFFIC = ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'conditional',
               'while', 'call', 'after-all', 'partition-id', 'replica-id')


def hlo_passes(hlo_text: str, size: int) -> float:
  """Reads plus writes of ``size``-element arrays by the compiled program's top-level ops.

  Each instruction of the entry computation, and of the computations that its
  ``conditional``/``while`` ops run, counts one per operand and one for its result
  that has exactly ``size`` elements (a fusion counts as one instruction: its
  internals stay in registers). Of a conditional's branches the costliest counts
  (FOP's learning branch); a while body counts once. Ops that only pass buffers on
  (parameters, tuples, bitcasts, the control-flow ops themselves) count nothing.
  """
  comps, order, shapes, current = {}, [], {}, None
  for line in hlo_text.splitlines():
    head = re.match(r'^(ENTRY )?%([\w.\-]+) .*\{\s*$', line)
    if head:
      current = head.group(2)
      comps[current] = []
      order.append((current, bool(head.group(1))))
      continue
    inst = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)', line)
    if inst is None:
      # A tuple-shaped result (conditional, while, multi-output fusion): its shape holds
      # spaces and '/*index=5*/' comments, so find the op as the word before the operands.
      inst = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)) ([\w\-]+)\((%.*)', line)
      if inst and current is not None:
        sizes = [math.prod(int(d) for d in dims.split(',') if d)
                 for dims in re.findall(r'\w+\[([\d,]*)\]', inst.group(2))]
        comps[current].append((inst.group(3), sizes, inst.group(4)))
      continue
    if current is not None:
      n = math.prod(int(d) for d in inst.group(3).split(',') if d)
      shapes[inst.group(1)] = n
      comps[current].append((inst.group(4), n, inst.group(5)))
  called = {}
  for name, insts in comps.items():
    for op, _, rest in insts:
      if op == 'conditional':
        called.setdefault(name, []).append(
            ('branches', re.findall(r'%([\w.\-]+)', rest.split('branch_computations=')[1].split('}')[0])
             if 'branch_computations=' in rest else
             re.findall(r'(?:true|false)_computation=%([\w.\-]+)', rest)))
      elif op == 'while':
        called.setdefault(name, []).append(('body', re.findall(r'body=%([\w.\-]+)', rest)))

  def cost(name):
    total = 0
    for op, n, rest in comps[name]:
      if op in _NO_TRAFFIC:
        continue
      operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
      writes = n.count(size) if isinstance(n, list) else int(n == size)
      total += writes + sum(shapes.get(o) == size for o in operands)
    for kind, subs in called.get(name, []):
      subs = [c for c in subs if c in comps]
      if subs:
        total += max(cost(c) for c in subs) if kind == 'branches' else sum(cost(c) for c in subs)
    return total

  entry = next(name for name, is_entry in order if is_entry)
  return float(cost(entry))


def fop_floor_flops(params, **rule) -> float:
  """The flops FOP's maths needs per step at the default rule (docs/benchmarks.md, "The floor").

  Per leaf viewed as (a, b): ``full``/``spatial`` 4·a²·b (``P·G`` and ``G_t G_pᵀ``);
  ``low_rank`` 22·a·b·r (preconditioning 8·a·b·r, hypergradient 16·a·b·r, less the
  2·a·b·r of ``G_{t−1}ᵀV`` that the previous step formed); nothing for the others.
  """
  total = 0.0
  structs = jax.tree.leaves(fop_optax.resolve_structures(params, **rule))
  for st, p in zip(structs, jax.tree.leaves(params)):
    if isinstance(st, fop_optax.structures.LowRank):
      a = math.prod(p.shape[:st.row_axes])
      total += 22 * p.size * min(st.rank, a)
    elif isinstance(st, fop_optax.structures.Full):
      a = math.prod(p.shape[:st._row_axes(p.shape)])
      total += 4 * a * p.size
  return total


def bench_case(case: Case, args) -> list[dict[str, Any]]:
  init, apply, make_x = case.model
  key = jax.random.key(0)
  params0 = init(key)
  x = make_x(jax.random.fold_in(key, 1), case.batch)
  y = jax.random.randint(jax.random.fold_in(key, 2), (case.batch,), 0, 10)
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.fold_in(key, 3), p.shape), params0)
  txs = {'momentum': momentum}
  txs.update(case.bases)
  txs.update(case.fops)

  step_runners, update_runners, memory, costs = {}, {}, {}, {}
  biggest = max(p.size for p in jax.tree.leaves(params0))   # the leaf hlo_passes counts
  for name, make_tx in txs.items():
    tx = make_tx()
    for kind, runners in (('step', step_runners), ('update', update_runners)):
      fn = _make_step(apply, tx) if kind == 'step' else _make_update(tx)
      box = [jax.tree.map(jnp.copy, params0), tx.init(params0)]
      memory[name] = _nbytes(box[1]) / _nbytes(params0)
      compiled = fn.lower(box[0], box[1], *((x, y) if kind == 'step' else (grads,))).compile()
      costs[name, kind] = _cost_of(compiled)
      costs[name, kind]['passes'] = hlo_passes(compiled.as_text(), biggest)

      def run(fn=fn, box=box, kind=kind):
        out = fn(box[0], box[1], x, y) if kind == 'step' else fn(box[0], box[1], grads)
        box[0], box[1] = out[0], out[1]
        jax.block_until_ready(box)

      for _ in range(args.warmup):  # compiles, then warms caches
        run()
      runners[name] = run

  step_t = H.interleaved(step_runners, args.rounds, args.inner)
  update_t = H.interleaved(update_runners, args.rounds, args.inner * 4)

  rows = []
  param_bytes = _nbytes(params0)
  base_flops = costs['momentum', 'step']['flops']
  for name in txs:
    base = None if name in case.bases or name == 'momentum' else case.base_of.get(name, 'momentum')
    ref = base or name
    s, u = step_t[name], update_t[name]
    step_ratio = H.ratios(step_t, ref)[name]      # per round, then summarised
    update_ratio = H.ratios(update_t, ref)[name]
    floor = None
    if base is not None and name.startswith('fop') and '(full)' not in name and 'r=' not in name:
      floor = 1 + fop_floor_flops(params0) / base_flops
    rows.append(dict(
        model=case.name, optimizer=name, base=base, batch=case.batch,
        params=rows_params(params0),
        step_ms=1e3 * statistics.median(s), step_ms_min=1e3 * min(s), step_ms_max=1e3 * max(s),
        step_ratio=statistics.median(step_ratio), step_ratio_min=min(step_ratio),
        step_ratio_max=max(step_ratio),
        update_ms=1e3 * statistics.median(u),
        update_ratio=statistics.median(update_ratio), update_ratio_min=min(update_ratio),
        update_ratio_max=max(update_ratio),
        state_over_params=memory[name],
        # Passes: bytes the compiled update (tx.update + apply_updates) reads and
        # writes, in units of the parameters' bytes; flops per parameter.
        update_bytes_over_params=costs[name, 'update']['bytes'] / param_bytes,
        # Reads + writes of the largest leaf by the update's top-level ops (hlo_passes).
        update_passes=costs[name, 'update']['passes'],
        update_flops_per_param=costs[name, 'update']['flops'] / rows_params(params0),
        step_flops=costs[name, 'step']['flops'], floor=floor))
  return rows


def rows_params(params) -> int:
  return sum(p.size for p in jax.tree.leaves(params))


def format_table(rows) -> str:
  head = (f"{'model':<12}{'optimizer':<16}{'step ms':>9}  {'step ratio [min-max]':<22}"
          f"{'floor':>6}{'update ms':>10}  {'update ratio [min-max]':<24}{'state/params':>12}"
          f"{'passes':>8}{'bytes/params':>13}{'flops/param':>12}")
  lines = [head, '-' * len(head)]
  for r in rows:
    ratio = '' if r['base'] is None else (
        f"{r['step_ratio']:.3f} [{r['step_ratio_min']:.3f}-{r['step_ratio_max']:.3f}]")
    uratio = '' if r['base'] is None else (
        f"{r['update_ratio']:.2f} [{r['update_ratio_min']:.2f}-{r['update_ratio_max']:.2f}]")
    floor = '' if r['floor'] is None else f"{r['floor']:.2f}"
    lines.append(
        f"{r['model']:<12}{r['optimizer']:<16}{r['step_ms']:>9.2f}  {ratio:<22}{floor:>6}"
        f"{r['update_ms']:>10.3f}  {uratio:<24}{r['state_over_params']:>12.3f}"
        f"{r['update_passes']:>8.0f}{r['update_bytes_over_params']:>13.1f}"
        f"{r['update_flops_per_param']:>12.1f}")
  return '\n'.join(lines)


def main(argv=None):
  parser = H.parser(__doc__.split('\n')[0], name='overhead', rounds=15)
  parser.add_argument('--models', default='cnn,mlp,transformer,' + ','.join(
      [f'dense{a}' for a in DENSE_WIDTHS] + ['mlp256']))
  parser.add_argument('--inner', type=int, default=2, help='steps per timing')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--cnn-width', type=float, default=0.25,
                      help='channel multiplier of All-CNN-C (96/192 channels at 1)')
  parser.add_argument('--cnn-batch', type=int, default=128)
  parser.add_argument('--tf-batch', type=int, default=16, help='transformer: sequences per batch')
  parser.add_argument('--seq', type=int, default=64)
  args = H.apply_quick(parser.parse_args(argv), parser,
                       models='dense64,mlp256', rounds=2, inner=1, warmup=1)

  wanted = args.models.split(',')
  rows, t0 = [], time.perf_counter()
  for case in cases(args):
    if case.name in wanted:
      rows += bench_case(case, args)
      print(f'[{case.name} done, {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
  print(format_table(rows))
  H.save_rows(args.out, H.metadata(args, argv=argv, module='benchmarks.overhead', t0=t0), rows)
  return rows


if __name__ == '__main__':
  main()
