"""One leaderboard for the whole fop_optax family and the optimisers users would pick instead.

Every entry of :data:`ENTRIES` (fop_optax's optimisers and the peers: momentum, Adam,
``optax.contrib.muon``, PSGD kron from ``psgd-jax``, K-FAC from ``kfac-jax`` (its quick-start
configuration, and its authors' minibatch recipe: ``benchmarks/_kfac_recipe.py``), Shampoo from
``precondition-opt``: ``benchmarks/_shampoo.py``)
trains each task of :data:`TASKS`:

* ``mlp``: Fashion-MNIST, ``examples/common.py``'s ``MLP`` 784-256-256-10;
* ``cnn``: Fashion-MNIST, ``examples/common.py``'s small All-CNN ``CNN`` (widths 32, 64);
* ``ppo``: gymnax CartPole-v1 with ``examples/ppo.py``'s PPO (its ``make_gymnax_trainer``,
  its config; the optimiser is chained after ``clip_by_global_norm(0.5)`` as there);
* ``lm``: ``examples/lm.py``'s byte-level Transformer (2 layers, width 64, 4 heads, Einsum
  attention, context 64; 136,704 parameters) on its corpus of 31 pinned CPython standard-library
  files (the last 10% held out as validation text): ``--lm-steps`` (3000) steps of
  ``--lm-batch`` (8) random training windows. The final metric is the **validation loss**
  (nats/byte, lower is better) on ``--lm-valid-windows`` (256) fixed held-out windows, the
  same for every entry and seed, also recorded every ``--lm-eval-every`` (100) steps.

Per run it records the history (step, training wall seconds, running train loss or return,
test accuracy or the LM's validation loss), the first step and the training wall seconds at
which the target is reached (``--target-mlp``/``--target-cnn``: test accuracy on
``--test-subset`` images; ``--target-ppo``: mean return of the last 5 PPO updates;
``--target-lm``: validation loss at or below it, default 2.0), and the final metric at the
fixed budget (test accuracy on the whole test set; PPO: mean return over the last 10 updates;
LM: the validation loss). Each entry runs at
its published defaults and at every value of a small sweep (by default the learning rate ×
0.1, 0.3, 1, 3; see ``Entry.grid``); the table gives, per task and entry, medians (min–max)
over seeds at the default and at the best sweep value. The classifiers' best value is chosen on
the held-out validation split (the last ``--val-size`` training images: highest median
accuracy there) and its test accuracy is reported; PPO's (highest median return) and the LM's
(lowest validation loss) on the metric reported, so optimistic for every entry alike.
(One-pass HPO's hypergradient reads validation batches from the same split, so its choice
there is optimistic.) Boards recorded before this rule (docs/leaderboard.md's MLP, CNN and PPO
tables) chose on the test metric. The LM's defaults are the classification ones (``Entry.default['lm']``).

Same data for every entry: per seed the same model initialisation, the same permutation of
the training set and (one-pass HPO) the same validation batches; PPO's environment keys are
the same per seed (its data then depend on the policy); the LM: per seed the same
initialisation and the same sequence of training windows (``lm.train``'s keys). Wall time: compilation is done before
the clock starts (ahead-of-time ``jit(...).lower().compile()``; K-FAC, whose steps compile
inside its own ``jit``, by warm-up steps on copies), evaluation is excluded, and every step
waits for its loss. Runs are interleaved (task → seed → sweep position → entry) so a change of
machine load hits all entries alike; the 1-minute load average is recorded before every run.

How an entry's step is driven (``Entry.drive``):

* ``grad``: ``tx.update(grads, state, params)``;
* ``curvature`` (AdamQLR, series SFN): also ``value=``, ``value_fn=`` (the loss on the
  batch), ``model_fn=`` (logits of the batch) and ``loss_fn=`` (cross-entropy of logits) for
  Gauss–Newton / Hessian-vector products;
* ``hpo`` (one-pass HPO): also ``value_fn=`` (the batch's loss) and ``validation_value_fn=`` (a
  batch of ``--val-batch`` images from a held-out validation split: the last ``--val-size``
  of the 60,000 training images, never trained on);
* ``kfac``: ``kfac_jax.Optimizer`` (not an optax transformation) through :class:`KfacAdapter`;
  the loss registers its logits with ``kfac_jax.register_softmax_cross_entropy_loss`` and the
  dense/conv layers are found by kfac-jax's automatic graph matching.

PPO passes the gradient only (``examples/ppo.py``'s update), so ``curvature``, ``hpo`` and
``kfac`` entries are reported as not applicable there, with the reason. The LM runs ``grad``
and ``curvature`` entries (the closures are the batch's loss, the model's logits and the
next-token cross-entropy); ``hpo`` (it would need a third split of the corpus) and ``kfac``
(not wired up for the Einsum attention) are reported as not applicable on it. Muon on the LM
takes the attention projections and MLP kernels as its matrices (``_muon_dims_lm``) and gives
the embeddings, head, biases and norms to its Adam. ``fop_paper`` is the paper's FOP exactly
(``max_scale=None``, ``hyper_optimizer=optax.adam(1e-4)``; ``examples/common.py``'s arm).

Peers come from optional packages (``pip install -e ".[bench]"``: ``psgd-jax``, ``kfac-jax``,
``precondition-opt``); an entry whose package is missing or fails to import is listed with its
reason instead of being dropped. Shampoo is precondition-opt's ``distributed_shampoo`` with its
authors' presets (docs/benchmarks.md §10: ~200x momentum's step on 2 CPU cores with roots every
step, so the full board with it needs an accelerator). The K-FAC recipe entries (one per damping
of its grid, the peak learning rate swept) were added after the board of docs/leaderboard.md
ran: they are not in its tables yet.

Commands (``--out`` JSON, ``--markdown`` prints the table, ``--plot PNG`` loss/return against
wall time, ``--from-json`` re-prints a saved run), from the repository root::

  python3 -m benchmarks.leaderboard --smoke                   # every entry, every task, a few steps
  python3 -m benchmarks.leaderboard --tasks ppo --markdown    # CartPole, sweep, 3 seeds (~45 min)
  python3 -m benchmarks.leaderboard --tasks mlp --no-sweep --markdown          # ~1.5 h
  python3 -m benchmarks.leaderboard --tasks lm --no-sweep --markdown \
      --entries momentum,adam,fop,fop_paper,fop_adam,muon,psgd_kron \
      --out results/leaderboard_lm.json --plot docs/img/leaderboard_lm.png     # ~1 h, see below
  python3 -m benchmarks.leaderboard --markdown --plot results/leaderboard.png  # everything (GPU)
  python3 -m benchmarks.leaderboard --from-json results/leaderboard.json --markdown > docs/leaderboard.md

Duration. ``--smoke`` (tiny models, 3 steps, 2 PPO updates) took 48 s (MLP), 115 s (CNN) and
89 s (PPO) on 2 shared CPU cores at load 3-7: most of it is compiling ~45 programs (LODO's
alone 18-34 s), not training. For the full board (defaults: 3 seeds; sweep of 3-4 values per
entry, 12 runs per entry and task; 858 steps = 2 epochs of the 55,000 training images at batch
128; 100 PPO updates) we measured a few steps per entry at full size (1 seed, load 3-6) and
extrapolate:

* MLP: ms/step momentum 7, Adam 3.5, S-HD/PP-HD/Adam-HD/one-pass 5-8, AdamQLR 6, K-FAC 28,
  Muon 35, FOP-norm 60, FOP/FOP+Adam 20-160 (erratic between steps on the shared machine),
  PSGD kron 130, series SFN 144, LODO 1,300; about 2 s for one step of every entry, so ~30 min
  per (seed, sweep value) with compilation, **~6 h** for the sweep (LODO two thirds of it),
  ~1.5 h with ``--no-sweep``.
* CNN: the cheap entries run 250-500 ms/step (docs/benchmarks.md), K-FAC ~40 s/step (conv
  curvature on CPU) and series SFN did not finish compiling plus 3 steps in 3 minutes, so both
  hit ``--run-time-limit`` (30 min); **~30 h** for the sweep on 2 CPU cores: use an accelerator,
  or ``--no-sweep --entries`` without ``kfac,series_sfn,lodo`` (~3 h).
* PPO: ~14 s compilation and 30-60 ms per update per run, 132 runs: **~45 min**.
* LM (``--tasks lm``, 3000 steps, no sweep): measured at full size, 1-min load 5-15 (other
  sessions' runs on the same 2 cores), ms/step momentum 19, Adam 22, Muon 28, FOP 35, FOP+Adam
  38, the paper's FOP 32, PSGD kron 34, AdamQLR 24, LODO 585, series SFN 1,260 (a 60-step
  probe); with compilation (15-40 s) 1.5-3.5 min a run. The seven cheap entries the issue
  names, 3 seeds: **44 min** (2657 s, 21 runs); AdamQLR's 3 seeds 5 min; LODO would take ~30 min
  a seed, so it ran one seed under ``--run-time-limit 240`` (stopped at step 411). ``--smoke --tasks lm`` (a 1-layer
  width-16 model, 3 steps): 89 s for 8 entries at load 4-6, compilation nearly all of it.

So on this machine: ``--tasks ppo``, ``--tasks mlp --no-sweep`` and ``--tasks lm --no-sweep``
without LODO and series SFN are practical; the whole
board needs a GPU (or days). Measured when they ran (docs/leaderboard.md, load 1.4-5.8): MLP
``--no-sweep``, 3 seeds, 89 min (LODO 2.9 s/step, stopped by ``--run-time-limit`` after 618
steps; series SFN 0.66 s/step); the MLP sweep without LODO and series SFN (3 seeds, 119 runs:
``--entries`` without them, ``--resume``) 41 min at load 0.4-5.8, 5-50 s a run (PSGD kron and
Muon the longest); PPO with the sweep, 2 seeds, 88 runs, ~45 min; the narrow CNN
(``--cnn-widths 8,16``) 1.5-2 min a run for the cheap entries, series SFN 24 s/step.
``--resume`` (every run is appended to ``OUT.partial.jsonl``) lets a board span sessions or
give a costly entry fewer seeds.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.leaderboard')

# jaxlib's CPU QR (FOP's low-rank guard) calls OpenBLAS, whose threads stall 10-40x on a busy CPU
# (docs/troubleshooting.md); set before jax loads it.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse
import dataclasses
import importlib
import json
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fop_optax
from benchmarks import _harness as H
from benchmarks import _shampoo
from benchmarks._kfac_recipe import RECIPE_GRID, recipe_make
from benchmarks.time_to_target import _muon_dims  # shared with benchmarks/time_to_target.py
from examples.common import CNN, MLP, load_dataset, save_figure
from flax import nnx

# ----------------------------------------------------------------------------- peers


def _import_psgd_kron():
  """psgd-jax's ``kron``; 0.2.9 imports ``optax._src.clipping``, which optax 0.2.8 moved."""
  try:
    from optax.transforms import _clipping
    sys.modules.setdefault('optax._src.clipping', _clipping)
  except ImportError:
    pass
  from psgd_jax.kron import kron
  return kron


_KFAC_PATCHED = False


def _import_kfac():
  """kfac-jax, made to trace on JAX ≥ 0.9 (``Primitive.get_bind_params`` returns params only).

  kfac-jax 0.0.8's graph matcher unpacks ``subfuns, params = get_bind_params(...)``; newer
  JAX returns just the params. The replacement accepts both.
  """
  global _KFAC_PATCHED
  import kfac_jax
  if not _KFAC_PATCHED:
    from kfac_jax._src import tag_graph_matcher as tgm
    import jax.extend as jex

    def eval_jaxpr_eqn(eqn, in_values):
      out = eqn.primitive.get_bind_params(eqn.params)
      subfuns, params = out if isinstance(out, tuple) else ((), out)
      with jex.source_info_util.user_context(eqn.source_info.traceback):
        result = eqn.primitive.bind(*subfuns, *in_values, **params)
      return result if isinstance(result, list) else [result]
    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    _KFAC_PATCHED = True
  return kfac_jax


class KfacAdapter:
  """``kfac_jax.Optimizer`` behind the leaderboard's ``init``/``step`` interface.

  ``loss_fn(params, (x, y))`` must register its logits with
  ``kfac_jax.register_softmax_cross_entropy_loss``. ``learning_rate=None`` is kfac-jax's
  published configuration (README and examples): adaptive learning rate, momentum and damping
  (initial damping 1.0); a number fixes the learning rate (momentum 0.9, damping still
  adaptive). ``num_burnin_steps=0``: burn-in would draw 10 extra batches from an iterator,
  which would change the data order shared by all entries.
  """

  def __init__(self, loss_fn, learning_rate: Optional[float]):
    kfac_jax = _import_kfac()
    adaptive = learning_rate is None
    kw = dict(use_adaptive_learning_rate=True, use_adaptive_momentum=True) if adaptive else dict(
        learning_rate_schedule=lambda step: jnp.asarray(learning_rate),
        momentum_schedule=lambda step: jnp.asarray(0.9))
    self.optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0, use_adaptive_damping=True,
        initial_damping=1.0, multi_device=False, num_burnin_steps=0, **kw)
    self.rng = jax.random.key(0)
    self.count = 0

  def init(self, params, batch):
    return self.optimizer.init(params, self.rng, batch)

  def step(self, params, state, batch):
    params, state, stats = self.optimizer.step(params, state, jax.random.fold_in(
        self.rng, self.count), batch=batch, global_step_int=self.count)
    self.count += 1
    return params, state, stats['loss']


# ----------------------------------------------------------------------------- registry

SGD_FACTORS = (0.1, 0.3, 1.0, 3.0)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One leaderboard row.

  ``make(value, task)`` builds the optimiser (an optax transformation, or for ``drive='kfac'``
  a ``loss_fn -> KfacAdapter`` factory) with its swept hyperparameter (``sweep``, usually the
  learning rate) at ``value``; ``default[kind]`` is the published default for ``kind`` in
  {'classify', 'ppo', 'lm'} (:func:`kind_of`; ``None``: the method sets it itself, e.g. K-FAC's
  adaptive rate; the LM's defaults are the classification ones unless ``lm=`` is given);
  ``grid[kind]`` the sweep, which holds the default. ``covers``: the fop_optax exports the
  entry runs (the test checks that every exported optimiser is covered).
  """
  name: str
  label: str
  make: Callable[[Any, str], Any]
  default: dict
  grid: dict
  drive: str = 'grad'
  family: str = 'fop_optax'
  covers: tuple = ()
  requires: Optional[str] = None     # an optional package (its import name)
  sweep: str = 'learning_rate'
  always_skip: Optional[str] = None  # a reason: the entry never runs


def _grid(default, factors=SGD_FACTORS):
  return [float(f'{default * f:.3g}') for f in factors]


def _entry(name, label, make, classify, ppo=None, *, lm=None, factors=SGD_FACTORS, **kw):
  default = {'classify': classify, 'ppo': ppo, 'lm': classify if lm is None else lm}
  grid = {k: (_grid(v, factors) if v is not None else None) for k, v in default.items()}
  return Entry(name, label, make, default, grid, **kw)


def _kfac_make(lr, task):
  return lambda loss_fn: KfacAdapter(loss_fn, lr)


def _psgd_make(lr, task):
  return _import_psgd_kron()(lr)


def _muon_dims_lm(params):
  """Muon's matrices in ``examples/lm.py``'s Transformer: the attention projections as the
  layers compute them (query/key/value ``(d, heads, head_dim)``: ``d`` → ``heads·head_dim``;
  out ``(heads, head_dim, d)``) and the MLP kernels; the token and position tables, the head,
  biases and LayerNorm scales go to Muon's Adam, as its authors do for embeddings and heads."""
  def dims(path, p):
    names = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    if names[0] in ('embed', 'pos', 'head') or names[-1] != 'kernel':
      return None
    if p.ndim == 3:
      return (optax.contrib.MuonDimensionNumbers(0, (1, 2)) if names[-2] != 'out' else
              optax.contrib.MuonDimensionNumbers((0, 1), 2))
    return optax.contrib.MuonDimensionNumbers(0, 1) if p.ndim == 2 else None
  return jax.tree_util.tree_map_with_path(dims, params)


def _muon_make(lr, task):
  return optax.contrib.muon(lr, adam_learning_rate=1e-3, muon_weight_dimension_numbers=(
      _muon_dims_lm if task == 'lm' else _muon_dims))


# Published defaults. Classification: SGD-type 0.05 with momentum 0.9 and Adam-type 1e-3
# (examples/common.py and docs/results_classify.md), LODO 0.5 (docs/lodo.md), Muon 0.02 and
# PSGD kron 1e-3 (their defaults). PPO CartPole: examples/ppo.py's DEFAULT_LR (SGD-type 0.1,
# Adam-type 1e-2, FOP hyper lr 1e-3); entries that examples/ppo.py does not tune get the rate
# of their type.
_PPO_FOP_HYPER = 1e-3
ENTRIES: dict[str, Entry] = {e.name: e for e in [
    _entry('momentum', 'momentum', lambda lr, t: optax.sgd(lr, momentum=0.9), 0.05, 0.1,
           family='peer'),
    _entry('adam', 'Adam', lambda lr, t: optax.adam(lr), 1e-3, 1e-2, family='peer'),
    _entry('fop', 'FOP+momentum', lambda lr, t: fop_optax.fop(
        lr, 0.9, **({'hyper_learning_rate': _PPO_FOP_HYPER} if t == 'ppo' else {})), 0.05, 0.1,
           covers=('fop', 'scale_by_fop')),
    _entry('fop_norm', 'FOP-norm', lambda lr, t: fop_optax.fop(
        lr, 0.9, normalize=True, **({'hyper_learning_rate': _PPO_FOP_HYPER} if t == 'ppo' else {})),
           0.05, 0.1, covers=('fop',)),
    # The paper's FOP exactly (examples/common.py's 'fop_paper' arm): P = MᵀM unbounded
    # (max_scale=None) and the paper's hyper-optimiser optax.adam(1e-4) applied as it is.
    _entry('fop_paper', 'FOP (paper: unbounded, Adam 1e-4 hyper)', lambda lr, t: fop_optax.fop(
        lr, 0.9, hyper_optimizer=optax.adam(1e-4), max_scale=None), 0.05, 0.1, covers=('fop',)),
    _entry('fop_adam', 'FOP+Adam', lambda lr, t: fop_optax.fop_adam(
        lr, **({'hyper_learning_rate': _PPO_FOP_HYPER} if t == 'ppo' else {})), 1e-3, 1e-2,
           covers=('fop_adam',)),
    _entry('shd', 'S-HD', lambda lr, t: fop_optax.sgd_hd(lr, momentum=0.9), 0.05, 0.1,
           covers=('sgd_hd', 'scale_by_hypergradient')),
    _entry('pphd', 'PP-HD', lambda lr, t: fop_optax.sgd_hd(lr, momentum=0.9, per_parameter=True),
           0.05, 0.1, covers=('sgd_hd',)),
    _entry('adam_hd', 'Adam-HD', lambda lr, t: fop_optax.adam_hd(lr), 1e-3, 1e-2,
           covers=('adam_hd',)),
    _entry('lodo', 'LODO', lambda lr, t: fop_optax.lodo(lr), 0.5, 0.5,
           covers=('lodo', 'scale_by_lodo')),
    # No learning rate: the step size comes from the damped quadratic model; the sweep scales it.
    _entry('adam_qlr', 'AdamQLR', lambda s, t: fop_optax.adam_qlr(step_size_scale=s), 1.0,
           factors=(0.3, 1.0, 3.0), drive='curvature', sweep='step_size_scale',
           covers=('adam_qlr', 'scale_by_qlr')),
    # Nor here: its adaptive step (the default) ignores learning_rate, so the sweep is over the
    # knob the authors tuned, the initial damping λ₀ (1 by default; 1.8e-3 for their
    # Fashion-MNIST runs, ../shared/design/series_sfn.md).
    _entry('series_sfn', 'series SFN', lambda d, t: fop_optax.series_sfn(initial_damping=d), 1.0,
           factors=(1e-3, 1e-2, 0.1, 1.0), drive='curvature', sweep='initial_damping',
           covers=('series_sfn',)),
    _entry('one_pass_hpo', 'one-pass HPO (SGD)', lambda lr, t: fop_optax.one_pass_hpo(lr, 0.9),
           0.05, drive='hpo', sweep='initial learning_rate', covers=('one_pass_hpo',)),
    _entry('one_pass_adam', 'one-pass HPO (Adam)', lambda lr, t: fop_optax.one_pass_hpo_injected(
        optax.inject_hyperparams(optax.adam)(learning_rate=lr)), 1e-3, drive='hpo',
           sweep='initial learning_rate', covers=('one_pass_hpo_injected',)),
    _entry('muon', 'Muon (optax.contrib)', _muon_make, 0.02, 0.02, family='peer'),
    _entry('psgd_kron', 'PSGD kron (psgd-jax)', _psgd_make, 1e-3, 1e-3, family='peer',
           requires='psgd_jax'),
    Entry('kfac', 'K-FAC (kfac-jax)', _kfac_make, {'classify': None, 'ppo': None, 'lm': None},
          {'classify': [1e-3, 1e-2, 1e-1], 'ppo': None, 'lm': None}, drive='kfac', family='peer',
          requires='kfac_jax'),
    # K-FAC per its authors' minibatch recipe (benchmarks/_kfac_recipe.py: fixed damping,
    # warm-up + cosine rate, norm constraint, burn-in; each value cited there): one entry per
    # damping of the recipe's grid, the peak learning rate swept.
    *[Entry(f'kfac_recipe_d{d:g}', f'K-FAC recipe, damping {d:g} (kfac-jax)', recipe_make(d),
            {'classify': 1e-3, 'ppo': None, 'lm': None},
            {'classify': list(RECIPE_GRID['learning_rate']), 'ppo': None, 'lm': None},
            drive='kfac', family='peer', requires='kfac_jax', sweep='peak learning_rate')
      for d in RECIPE_GRID['damping']],
    # Shampoo from precondition-opt (Google Research's distributed_shampoo; benchmarks/_shampoo.py
    # has its presets and the JAX >= 0.6 shim): SGD-grafted, so momentum's rates; the LM preset's
    # Adam-type rate.
    _entry('shampoo', 'Shampoo (precondition-opt)', lambda lr, t: _shampoo.shampoo(lr, t),
           0.05, 0.1, lm=1e-3, family='peer', requires='precondition'),
]}


def skip_reason(entry: Entry, task: str) -> Optional[str]:
  """Why ``entry`` does not run on ``task`` (``None``: it runs)."""
  if entry.always_skip:
    return entry.always_skip
  if entry.requires:
    try:
      if entry.requires == 'kfac_jax':
        _import_kfac()
      elif entry.requires == 'psgd_jax':
        _import_psgd_kron()
      elif entry.requires == 'precondition':
        _shampoo._import_shampoo()   # a bare import succeeds where init would fail
      else:
        importlib.import_module(entry.requires)
    except Exception as e:  # noqa: BLE001  (a missing package or one that fails to import)
      return (f'optional package {entry.requires} not usable ({type(e).__name__}: {e}); '
              'pip install -e ".[bench]"')
  if task == 'ppo' and entry.drive != 'grad':
    return (f"n/a: needs {entry.drive} arguments (value_fn/closures or kfac's registered loss); "
            "examples/ppo.py's update passes the gradient only")
  if task == 'lm' and entry.drive == 'hpo':
    return ('n/a on lm: its validation batches would need a third split of the corpus '
            '(examples/lm.py holds out only the validation text the board reports on)')
  if task == 'lm' and entry.drive == 'kfac':
    return ("n/a on lm: not wired up (kfac-jax's registered loss and layer matching are set up "
            "for the classifiers' dense/conv layers, not the Einsum attention)")
  return None


# ----------------------------------------------------------------------------- tasks

TASKS = ('mlp', 'cnn', 'ppo', 'lm')
# The final metric's direction: accuracy and return go up, the LM's validation loss goes down.
LOWER_IS_BETTER = frozenset({'lm'})


def kind_of(task: str) -> str:
  """The key of ``Entry.default``/``Entry.grid`` a task reads: 'ppo', 'lm' or 'classify'."""
  return task if task in ('ppo', 'lm') else 'classify'


def _better_key(task: str, value) -> float:
  """A sort key on a final metric, smaller is better whichever way the task's metric goes;
  a missing value is worst."""
  if value is None:
    return np.inf
  return value if task in LOWER_IS_BETTER else -value
_DATA_CACHE: dict = {}


def _loadavg():
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def classify_data(args):
  """``(x_train, y_train, x_val, y_val, x_test, y_test)``: a held-out validation split (the last
  ``val_size`` training images) and the first ``train_subset`` of the rest."""
  key = (args.data_dir, args.train_subset, args.val_size)
  if key not in _DATA_CACHE:
    x, y, xt, yt = load_dataset('fashion_mnist', args.data_dir)
    xv, yv = x[-args.val_size:], y[-args.val_size:]
    x, y = x[:-args.val_size], y[:-args.val_size]
    if args.train_subset:
      x, y = x[:args.train_subset], y[:args.train_subset]
    _DATA_CACHE[key] = (x, y, xv, yv, xt, yt)
  return _DATA_CACHE[key]


def _train_loop(do_step, params, opt_state, steps, args, eval_every, evaluate, reached):
  """The board's timed loop, shared by the classifiers and the LM.

  ``do_step(params, state, i) -> (params, state, loss)``; the clock counts the steps only
  (each waits for its loss), not ``evaluate(params)`` (every ``eval_every`` steps and at the
  end), whose value ``reached(value)`` tests against the target. Stops at a non-finite train
  loss or evaluation (recorded as ``None``), or past ``args.run_time_limit`` seconds. Returns
  ``(params, loop)``: ``loop`` holds ``history`` (step, seconds, running train loss, metric),
  the last ``loss``, ``stopped``, ``ema`` and the result's ``timing`` fields.
  """
  history, ema, clock, hit, loss, stopped, i = [], None, 0.0, None, float('nan'), False, -1
  for i in range(steps):
    t0 = time.perf_counter()
    params, opt_state, loss = do_step(params, opt_state, i)
    loss = float(loss)  # waits for the step
    clock += time.perf_counter() - t0
    ema = loss if ema is None else 0.9 * ema + 0.1 * loss
    stopped = bool(args.run_time_limit and clock > args.run_time_limit and i + 1 < steps)
    last = i + 1 == steps or stopped
    if not np.isfinite(loss):
      history.append((i + 1, round(clock, 4), None, None))
      break
    if (i + 1) % eval_every == 0 or last:
      value = evaluate(params)
      if not np.isfinite(value):
        loss = value   # a non-finite evaluation is a divergence too
        history.append((i + 1, round(clock, 4), round(ema, 5), None))
        break
      history.append((i + 1, round(clock, 4), round(ema, 5), round(value, 5)))
      if hit is None and reached(value):
        hit = (i + 1, clock)
    if stopped:
      break
  timing = dict(wall_s=clock, ms_per_step=1e3 * clock / max(i + 1, 1),
                target_step=hit and hit[0], target_wall_s=hit and hit[1],
                stopped_at=(i + 1) if stopped else None)
  return params, dict(history=history, loss=loss, stopped=stopped, ema=ema, timing=timing)


def run_classify(task, entry, value, seed, args):
  x_train, y_train, x_val, y_val, x_test, y_test = classify_data(args)
  model = (MLP(int(np.prod(x_train.shape[1:])), hidden=args.mlp_hidden, rngs=nnx.Rngs(seed))
           if task == 'mlp' else CNN(x_train.shape[-1], 10, widths=args.cnn_widths,
                                     rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)

  def apply(p, x):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)(x)

  def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def loss_fn(p, x, y):
    return ce(apply(p, x), y)

  b = args.batch_size
  rng = np.random.default_rng(seed)
  n = len(x_train)
  per_epoch = n // b
  order = np.concatenate([rng.permutation(n)[:per_epoch * b] for _ in range(args.epochs)])
  steps = args.steps or per_epoch * args.epochs
  order = np.resize(order, steps * b)
  val_rng = np.random.default_rng(10_000 + seed)
  val_idx = val_rng.integers(0, len(x_val), (steps, args.val_batch))
  xt, yt = jnp.asarray(x_test[:args.test_subset]), jnp.asarray(y_test[:args.test_subset])
  batch = lambda i: (jnp.asarray(x_train[order[i * b:(i + 1) * b]]),
                     jnp.asarray(y_train[order[i * b:(i + 1) * b]]))
  val_batch = lambda i: (jnp.asarray(x_val[val_idx[i]]), jnp.asarray(y_val[val_idx[i]]))

  accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(apply(p, x), -1) == y)).lower(
      params, xt, yt).compile()

  if entry.drive == 'kfac':
    kfac_jax = _import_kfac()

    def kfac_loss(p, data):
      logits = apply(p, data[0])
      kfac_jax.register_softmax_cross_entropy_loss(logits, data[1])
      return ce(logits, data[1])
    factory = entry.make(value, task)
    # The recipe's learning-rate schedule needs the run's length (benchmarks/_kfac_recipe.py).
    opt = (factory(kfac_loss, total_steps=steps)
           if getattr(factory, 'needs_total_steps', False) else factory(kfac_loss))
    opt_state = opt.init(params, batch(0))
    # Warm-up on copies: kfac-jax compiles inside its own jit, one program per kind of step
    # (curvature/inverse updates every few steps), so run a few steps off the clock.
    warm = (jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state))
    for i in range(min(args.kfac_warmup, steps)):
      warm = opt.step(*warm[:2], batch(i))[:2]
    jax.block_until_ready(warm)
    opt.count = 0

    def do_step(p, s, i):
      return opt.step(p, s, batch(i))
  else:
    tx = optax.with_extra_args_support(entry.make(value, task))
    opt_state = tx.init(params)

    def step(p, s, x, y, xv, yv):
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      if entry.drive == 'curvature':
        extra = dict(value=loss, grad=grads, value_fn=lambda q: loss_fn(q, x, y),
                     model_fn=lambda q: apply(q, x), loss_fn=lambda z: ce(z, y))
      elif entry.drive == 'hpo':
        extra = dict(value_fn=lambda q: loss_fn(q, x, y),
                     validation_value_fn=lambda q: loss_fn(q, xv, yv))
      else:
        extra = {}
      updates, s = tx.update(grads, s, p, **extra)
      return optax.apply_updates(p, updates), s, loss
    compiled = jax.jit(step).lower(params, opt_state, *batch(0), *val_batch(0)).compile()

    def do_step(p, s, i):
      return compiled(p, s, *batch(i), *val_batch(i))

  params, loop = _train_loop(
      do_step, params, opt_state, steps, args, args.eval_every,
      lambda p: float(accuracy(p, xt, yt)), lambda acc: acc >= args.target[task])
  history, loss, stopped, ema = (loop[k] for k in ('history', 'loss', 'stopped', 'ema'))
  final = final_val = None
  if np.isfinite(loss) and not stopped:
    def chunked(xs, ys, n):   # in whole chunks of the compiled test shape
      return float(np.mean([float(accuracy(params, jnp.asarray(xs[j:j + len(xt)]),
                                           jnp.asarray(ys[j:j + len(xt)])))
                            for j in range(0, max(n - len(xt) + 1, 1), len(xt))]))
    final = chunked(x_test, y_test, args.final_test or len(x_test))
    # The held-out validation split (never trained on) on which board() chooses the sweep's
    # best value: in whole chunks, or in one piece where it is smaller than a chunk.
    final_val = (chunked(x_val, y_val, len(x_val)) if len(x_val) >= len(xt) else
                 float(jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(apply(p, x), -1) == y))(
                     params, jnp.asarray(x_val), jnp.asarray(y_val))))
  return dict(steps=steps, final=final, final_val=final_val,
              final_train_loss=ema if np.isfinite(loss) else None,
              history=history, **loop['timing'])


def ppo_config(args):
  from examples import ppo
  cfg = ppo.ENV_CONFIGS['CartPole-v1']
  if args.smoke:
    cfg = dataclasses.replace(cfg, num_envs=2, num_steps=64, epochs=1, minibatches=2, hidden=8)
  return cfg


def run_ppo(task, entry, value, seed, args):
  from examples import ppo
  cfg = ppo.ENV_CONFIGS['CartPole-v1'] if not args.smoke else ppo_config(args)
  tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), entry.make(value, task))
  init, run = ppo.make_gymnax_trainer('CartPole-v1', tx, cfg)
  runner = jax.jit(init)(jax.random.key(seed))
  one = jax.jit(run, static_argnums=1).lower(runner, 1).compile()
  updates = args.ppo_updates
  history, returns, clock, hit = [], [], 0.0, None
  for i in range(updates):
    t0 = time.perf_counter()
    runner, metrics = one(runner)
    metrics = jax.tree.map(np.asarray, metrics)  # waits for the update
    clock += time.perf_counter() - t0
    ret = float(metrics['return'][0])
    returns.append(ret)
    recent = [r for r in returns[-5:] if np.isfinite(r)]
    level = float(np.mean(recent)) if recent else None
    history.append((i + 1, round(clock, 4), level and round(level, 3), None))
    if hit is None and level is not None and len(returns) >= 5 and level >= args.target['ppo']:
      hit = (i + 1, clock)
    if args.run_time_limit and clock > args.run_time_limit and i + 1 < updates:
      return dict(steps=updates, wall_s=clock, ms_per_step=1e3 * clock / (i + 1), final=None,
                  final_train_loss=None, target_step=hit and hit[0],
                  target_wall_s=hit and hit[1], history=history, stopped_at=i + 1)
  finite = jax.tree.leaves(jax.tree.map(lambda x: bool(np.all(np.isfinite(x))), runner.params))
  last = [r for r in returns[-10:] if np.isfinite(r)]
  final = float(np.mean(last)) if last and all(finite) else None
  return dict(steps=updates, wall_s=clock, ms_per_step=1e3 * clock / updates, final=final,
              final_train_loss=None, target_step=hit and hit[0],
              target_wall_s=hit and hit[1], history=history, stopped_at=None,
              env_steps_per_update=cfg.num_envs * cfg.num_steps)


def lm_config(args) -> dict:
  """``examples/lm.py``'s model configuration from the arguments (its defaults: 136,704
  parameters)."""
  return dict(layers=args.lm_layers, width=args.lm_width, heads=args.lm_heads, seq=args.lm_seq)


def lm_data(args):
  """``(train tokens, fixed validation windows)``: the corpus split of ``examples/lm.py``
  (last 10% held out) and ``--lm-valid-windows`` windows of the held-out text, drawn once with a
  fixed key (the same for every entry and seed)."""
  from examples import lm
  key = ('lm', args.lm_seq, args.lm_valid_windows)
  if key not in _DATA_CACHE:
    train, valid = lm.split(lm.load_corpus())
    _DATA_CACHE[key] = (jnp.asarray(train), lm.batches(
        valid, args.lm_valid_windows, args.lm_seq, jax.random.key(12345)))
  return _DATA_CACHE[key]


def run_lm(task, entry, value, seed, args):
  """``examples/lm.py``'s byte-level Transformer on its corpus for ``--lm-steps`` steps.

  Per seed the same initialisation (``lm.init_params(seed)``) and the same batches (the keys of
  ``lm.train``: ``split(key(seed + 1), steps)``; the windows are cut inside the compiled step,
  so the batch sequence is a function of the seed only). History: every ``--lm-eval-every``
  steps the running train loss (EMA 0.9) and the validation loss on the fixed windows of
  :func:`lm_data`; final = that validation loss after the budget (nats per byte).
  """
  from examples import lm
  if entry.drive not in ('grad', 'curvature'):
    raise ValueError(f'{entry.name}: drive {entry.drive!r} does not run on lm (skip_reason)')
  train_tokens, valid = lm_data(args)
  config = lm_config(args)
  params = lm.init_params(seed, **config)
  seq, b, steps = args.lm_seq, args.lm_batch, args.lm_steps
  tx = optax.with_extra_args_support(entry.make(value, task))
  opt_state = tx.init(params)

  def step(p, s, key):
    tokens = lm.batches(train_tokens, b, seq, key)
    loss, grads = jax.value_and_grad(lm.loss_fn)(p, tokens)
    extra = {}
    if entry.drive == 'curvature':
      extra = dict(value=loss, grad=grads, value_fn=lambda q: lm.loss_fn(q, tokens),
                   model_fn=lambda q: lm.apply(q, tokens[:, :-1]),
                   loss_fn=lambda z: lm.next_token_loss(z, tokens))
    updates, s = tx.update(grads, s, p, **extra)
    return optax.apply_updates(p, updates), s, loss
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  compiled = jax.jit(step).lower(params, opt_state, keys[0]).compile()
  valid_loss = jax.jit(lm.loss_fn).lower(params, valid).compile()

  params, loop = _train_loop(
      lambda p, s, i: compiled(p, s, keys[i]), params, opt_state, steps, args, args.lm_eval_every,
      lambda p: float(valid_loss(p, valid)), lambda v: v <= args.target[task])
  history, loss, stopped, ema = (loop[k] for k in ('history', 'loss', 'stopped', 'ema'))
  ok = np.isfinite(loss) and not stopped
  final = history[-1][3] if ok else None
  return dict(steps=steps, final=final, final_train_loss=ema if ok else None, history=history,
              valid_windows=int(valid.shape[0]), param_count=lm.param_count(params),
              **loop['timing'])


def run_one(task, entry, value, seed, args):
  run = {'ppo': run_ppo, 'lm': run_lm}.get(task, run_classify)
  load = _loadavg()
  t0 = time.perf_counter()
  try:
    out = run(task, entry, value, seed, args)
    out['error'] = None
  except Exception as e:  # noqa: BLE001  (a crash is a result: it goes in the table)
    out = dict(steps=None, wall_s=None, ms_per_step=None, final=None, final_train_loss=None,
               target_step=None, target_wall_s=None, history=[],
               error=f'{type(e).__name__}: {str(e)[:300]}')
  out.update(task=task, entry=entry.name, value=value, seed=seed, loadavg_before=load,
             seconds_with_compile=time.perf_counter() - t0)
  return out


# ----------------------------------------------------------------------------- summary


def _stats(vals):
  """Median, range, mean and standard deviation (population, ``ddof=0``, as
  ``examples/paper_length.py``'s tables) over seeds, ignoring missing values."""
  vals = [v for v in vals if v is not None]
  if not vals:
    return None
  return dict(median=statistics.median(vals), min=min(vals), max=max(vals),
              mean=statistics.fmean(vals), std=statistics.pstdev(vals), n=len(vals))


def summarize_runs(runs):
  """Per (task, entry, swept value): medians and ranges over seeds."""
  out = {}
  for r in runs:
    out.setdefault((r['task'], r['entry'], r['value']), []).append(r)
  rows = []
  for (task, name, value), rs in out.items():
    reached = [r for r in rs if r['target_step'] is not None]
    # Time to target: the median only when most seeds got there.
    most = len(reached) * 2 > len(rs)
    rows.append(dict(task=task, entry=name, value=value, seeds=len(rs), reached=len(reached),
                     target_step=_stats([r['target_step'] for r in reached]) if most else None,
                     target_wall_s=_stats([r['target_wall_s'] for r in reached]) if most else None,
                     final=_stats([r['final'] for r in rs]),
                     # classification only: the validation split the best value is chosen on
                     final_val=(_stats([r.get('final_val') for r in rs])
                                if any(r.get('final_val') is not None for r in rs) else None),
                     # Runs whose loss went non-finite (no final metric, not stopped by
                     # --run-time-limit, no error): they rank as failures, not as absent.
                     diverged=sum(r['final'] is None and not r.get('stopped_at')
                                  and not r['error'] for r in rs),
                     ms_per_step=_stats([r['ms_per_step'] for r in rs]),
                     stopped=sorted(r['stopped_at'] for r in rs if r.get('stopped_at')),
                     errors=sorted({r['error'] for r in rs if r['error']})))
  return rows


def board(runs, skips, entries=None):
  """Per task and entry: the default's row and the best swept value's row (best median final
  metric: highest, or lowest for the LM's validation loss (:data:`LOWER_IS_BETTER`); ties to
  fewer median steps to target; a value with a diverged seed ranks below every
  value without one); skips as ``{(task, entry): reason}``.

  The classifiers' best value is chosen on the held-out validation split (``final_val``: the
  last ``--val-size`` training images, never trained on), and its row reports the test
  accuracy of that choice; PPO's and the LM's on the metric they report (no third split)."""
  rows = summarize_runs(runs)
  names = entries or list(ENTRIES)
  result = []
  tasks = list(dict.fromkeys([r['task'] for r in runs] + [t for t, _ in skips]))
  for task in [t for t in TASKS if t in tasks]:
    for name in names:
      if (task, name) in skips:
        result.append(dict(task=task, entry=name, status='skipped', reason=skips[(task, name)]))
        continue
      mine = [r for r in rows if r['task'] == task and r['entry'] == name]
      if not mine:
        continue
      default = ENTRIES[name].default[kind_of(task)]
      d = next((r for r in mine if r['value'] == default), None)
      on_val = all(r.get('final_val') is not None or r['final'] is None for r in mine) and any(
          r.get('final_val') is not None for r in mine)
      chosen_on = 'final_val' if on_val else 'final'
      key = lambda r: (r.get('diverged', 0) > 0,
                       _better_key(task, (r.get(chosen_on) or {}).get('median')),
                       (r['target_step'] or {'median': np.inf})['median'])
      best = min(mine, key=key)
      errors = sorted({e for r in mine for e in r['errors']})
      status = 'works' if not errors else 'error'
      result.append(dict(task=task, entry=name, status=status, reason='; '.join(errors),
                         default=d, best=best, sweep=sorted(
                             ((r['value'], r['final'] and r['final']['median']) for r in mine),
                             key=lambda v: (v[0] is None, v[0] or 0))))
  return result


def _fmt(s, fmt, scale=1.0):
  if s is None:
    return '—'
  if s['min'] == s['max']:
    return format(s['median'] * scale, fmt)
  return (f"{format(s['median'] * scale, fmt)} ({format(s['min'] * scale, fmt)}–"
          f"{format(s['max'] * scale, fmt)})")


def _num(x):
  return '?' if x is None else f'{x:.1f}'


def shown(value) -> str:
  """A swept value as the table shows it (``None``: K-FAC's adaptive learning rate)."""
  return 'adaptive' if value is None else f'{value:g}'


def _cells(s, ms: bool = False) -> list[str]:
  """Table cells of one setting's summary ``s``: steps to target [reached/seeds], seconds to
  target, final metric, and (``ms``) milliseconds per step; '—' where ``s`` is None."""
  keys = [('target_step', '.0f'), ('target_wall_s', '.1f'), ('final', '.3f')]
  keys += [('ms_per_step', '.1f')] if ms else []
  if s is None:
    return ['—'] * len(keys)
  cells = [_fmt(s[k], fmt) for k, fmt in keys]
  cells[0] += f" [{s['reached']}/{s['seeds']}]"
  if s.get('diverged'):   # the final metric's median is over the seeds that did not diverge
    cells[2] += f" [{s['diverged']}/{s['seeds']} diverged]"
  return cells


def _provenance(meta) -> str:
  """How the runs on the board came about, for the markdown's first lines."""
  missing = meta.get('missing_runs') or []
  if meta.get('from_partial'):
    text = f" (board built from the partial file's {meta['resumed_runs']} runs, nothing run"
    if missing:
      text += f"; {len(missing)} planned runs missing: {', '.join(missing)}"
    return text + ')'
  if meta.get('resumed_runs'):
    return f" (this call; {meta['resumed_runs']} runs resumed from an earlier call's partial file)"
  return ''


def _rank(r):
  """Board order: working entries first, by the final metric at the best value (the LM's
  validation loss: lowest first), ties (e.g. CartPole's 500) by steps to target."""
  b = r.get('best') or {}
  return (r['status'] != 'works', _better_key(r['task'], (b.get('final') or {}).get('median')),
          (b.get('target_step') or {'median': np.inf})['median'])


def markdown(result, meta) -> str:
  """The leaderboard as GitHub markdown (docs/leaderboard.md)."""
  a = meta['args']
  lines = [f"Command: `{meta['command']}`  ",
           f"jax {meta['jax']}, optax {meta['optax']}, "
           + ', '.join(f'{k} {v}' for k, v in meta.get('peers', {}).items()) +
           f"; {meta.get('cpu_count')} CPUs ({meta.get('devices')}); 1-min load average before "
           f"each run {_num(meta.get('load_min'))}–{_num(meta.get('load_max'))}; runs one after "
           f"another, interleaved (task → seed → sweep position → entry); "
           f"{meta.get('seconds', 0):.0f} s in all"
           + _provenance(meta) + '.', '']
  for task in dict.fromkeys(r['task'] for r in result):
    unit = 'updates' if task == 'ppo' else 'steps'
    metric = ('mean return of the last 10 updates' if task == 'ppo' else
              f"validation loss (nats/byte) on {a.get('lm_valid_windows')} fixed held-out "
              f"windows of {a.get('lm_seq')} bytes" if task == 'lm' else
              f"test accuracy on {a.get('final_test') or 'all 10,000'} test images")
    target = a['target'][task]
    aim = {'ppo': 'return ≥', 'lm': 'validation loss ≤'}.get(task, 'test accuracy ≥')
    # Without a sweep (--no-sweep) the best value is the default: one set of columns.
    swept = any(len(r.get('sweep') or ()) > 1 for r in result if r['task'] == task)
    lines += [f"### {task}: target {aim} {target}; "
              f"final = {metric} after the budget; medians (min–max) over seeds", '']
    lines += ([f'| entry | status | value (default → best) | {unit} to target (default) | s to '
               f'target (default) | final (default) | {unit} to target (best) | s to target '
               f'(best) | final (best) | ms/{unit[:-1]} (best) |',
               '|---|---|---|---|---|---|---|---|---|---|'] if swept else
              [f'| entry | status | value (default) | {unit} to target | s to target | final '
               f'| ms/{unit[:-1]} |', '|---|---|---|---|---|---|---|'])
    for r in sorted([r for r in result if r['task'] == task], key=_rank):
      label = ENTRIES[r['entry']].label
      if r['status'] == 'skipped':
        lines.append(f"| {label} | skipped: {r['reason']} |" + ' |' * (8 if swept else 5))
        continue
      d, b = r['default'], r['best']
      dv = shown(ENTRIES[r['entry']].default[kind_of(task)])
      status = r['status'] + (f": {r['reason']}" if r['reason'] else '')
      if d and d.get('stopped'):
        status += (f"; {len(d['stopped'])}/{d['seeds']} stopped by --run-time-limit at step "
                   + ', '.join(map(str, d['stopped'])))
      row = ([label, status, dv] + _cells(d, ms=True) if not swept else
             [label, status, f"{dv} → {shown(b['value'])}"] + _cells(d) + _cells(b, ms=True))
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  lines.append('value: the learning rate, except ' + '; '.join(
      f'{e.label}: {e.sweep}' for e in ENTRIES.values() if e.sweep != 'learning_rate') +
      "; K-FAC's \"adaptive\" is kfac-jax's adaptive learning rate, momentum and damping "
      '(its README), a number fixes the learning rate (momentum 0.9). Time to target: the '
      'median only when most seeds reached it, [reached/seeds]. Final: the median over the '
      'seeds whose loss stayed finite, [k/n diverged] where some did not. Best: highest median '
      'accuracy on the held-out validation split (mlp, cnn: the last --val-size training '
      'images, never trained on; the test accuracy of that choice is reported), highest median '
      'return (ppo) or lowest validation loss (lm), over the sweep among the values where no '
      'seed diverged (then the others).')
  return '\n'.join(lines)


def mean_std(result) -> str:
  """Final metric as mean ± std over seeds (population std), at the default and at the best
  swept value: the form the closing notes quote. Markdown, one table per task, ranked as
  :func:`markdown` ranks (best value's median)."""
  lines = []
  for task in dict.fromkeys(r['task'] for r in result):
    lines += [f'### {task}: final metric, mean ± std over seeds (n = seeds with a final metric)',
              '', '| entry | default | final (default) | best | final (best) |',
              '|---|---|---|---|---|']
    for r in sorted([r for r in result if r['task'] == task and r['status'] != 'skipped'],
                    key=_rank):
      cells = []
      for s in (r['default'], r['best']):
        f = s and s['final']
        text = '—' if not f else f"{f['mean']:.3f} ± {f['std']:.3f} (n = {f['n']})"
        if s and s.get('diverged'):
          text += f" [{s['diverged']}/{s['seeds']} diverged]"
        cells += [shown(s['value']) if s else '—', text]
      lines.append(f"| {ENTRIES[r['entry']].label} | " + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot(runs, result, path):
  """Per task: the median seed's curve at the best value against steps and against training
  wall seconds (log axis: the entries' costs span three decades)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  tasks = list(dict.fromkeys(r['task'] for r in result if r['status'] != 'skipped'))
  fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.8 * len(tasks)), squeeze=False)
  styles = [(c, ls) for ls in ('-', '--', ':') for c in plt.rcParams['axes.prop_cycle'].by_key()[
      'color']]
  for (ax_steps, ax_wall), task in zip(axes, tasks):
    k = 0
    for r in result:
      if r['task'] != task or r['status'] == 'skipped' or r['best'] is None:
        continue
      # The median seed's curve at the best value (by final metric).
      rs = [x for x in runs if x['task'] == task and x['entry'] == r['entry']
            and x['value'] == r['best']['value'] and x['history']]
      if not rs:
        continue
      rs.sort(key=lambda x: -_better_key(task, x['final']))
      h = rs[len(rs) // 2]['history']
      color, ls = styles[k % len(styles)]
      k += 1
      y = 3 if task == 'lm' else 2   # the LM: its validation loss; else the train loss/return
      h = [p for p in h if p[y] is not None]
      for ax, col in ((ax_steps, 0), (ax_wall, 1)):
        ax.plot([p[col] for p in h], [p[y] for p in h], color=color, ls=ls,
                label=ENTRIES[r['entry']].label)
    unit = 'PPO updates' if task == 'ppo' else 'steps'
    for ax, xlabel in ((ax_steps, unit), (ax_wall, 'training wall seconds (log)')):
      ax.set_xlabel(xlabel)
      ax.set_ylabel({'ppo': 'return (mean of last 5 updates)',
                     'lm': 'validation loss (nats/byte)'}.get(task, 'train loss (EMA 0.9)'))
      ax.set_title(f'{task}: median seed at the best value')
      if task not in ('ppo', 'lm'):
        ax.set_yscale('log')
    ax_wall.set_xscale('log')
    ax_steps.legend(fontsize=7, ncol=2)
  save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------- main


def _versions():
  out = {}
  for dist in ('psgd-jax', 'kfac-jax', 'flax', 'gymnax'):
    try:
      from importlib.metadata import version
      out[dist] = version(dist)
    except Exception:  # noqa: BLE001
      out[dist] = None
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--tasks', default=','.join(TASKS))
  p.add_argument('--entries', default=','.join(ENTRIES))
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--no-sweep', action='store_true', help='published defaults only')
  p.add_argument('--epochs', type=int, default=2, help='classification budget (same for all)')
  p.add_argument('--steps', type=int, default=0, help='classification budget in steps (0: epochs)')
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--eval-every', type=int, default=25)
  p.add_argument('--test-subset', type=int, default=2000,
                 help='test images checked every --eval-every steps (final: the whole set)')
  p.add_argument('--final-test', type=int, default=0,
                 help='test images for the final accuracy (0: all 10,000; a multiple of '
                 '--test-subset)')
  p.add_argument('--train-subset', type=int, default=0, help='first N training images (0: all)')
  p.add_argument('--val-size', type=int, default=5000, help='held-out validation split (HPO)')
  p.add_argument('--val-batch', type=int, default=128)
  p.add_argument('--ppo-updates', type=int, default=100)
  p.add_argument('--target-mlp', type=float, default=0.85)
  p.add_argument('--target-cnn', type=float, default=0.85)
  p.add_argument('--target-ppo', type=float, default=400.0)
  p.add_argument('--target-lm', type=float, default=2.0,
                 help='LM target: validation loss (nats/byte) at or below this')
  p.add_argument('--lm-steps', type=int, default=3000, help='LM budget in steps (same for all)')
  p.add_argument('--lm-batch', type=int, default=8, help='LM windows per step')
  p.add_argument('--lm-eval-every', type=int, default=100)
  p.add_argument('--lm-valid-windows', type=int, default=256,
                 help='fixed held-out validation windows the LM is scored on')
  p.add_argument('--lm-seq', type=int, default=64, help='LM context (window) length')
  p.add_argument('--lm-width', type=int, default=64)
  p.add_argument('--lm-layers', type=int, default=2)
  p.add_argument('--lm-heads', type=int, default=4)
  p.add_argument('--mlp-hidden', type=lambda s: tuple(int(v) for v in s.split(',')),
                 default=(256, 256))
  p.add_argument('--cnn-widths', type=lambda s: tuple(int(v) for v in s.split(',')),
                 default=(32, 64))
  p.add_argument('--run-time-limit', type=float, default=1800.0,
                 help='stop a run whose training wall time passes this many seconds (its '
                 'final metric is then missing and the run says where it stopped; 0: no limit)')
  p.add_argument('--kfac-warmup', type=int, default=6,
                 help='K-FAC warm-up steps on copies (compilation off the clock)')
  p.add_argument('--data-dir', default=None)
  p.add_argument('--out', default=os.path.join('results', 'leaderboard.json'))
  p.add_argument('--resume', action='store_true',
                 help='keep the runs already in --out\'s partial file (OUT.partial.jsonl, '
                 'written after every run) and do only the rest of the plan')
  p.add_argument('--from-partial', action='store_true',
                 help='run nothing: build the board from the runs in --out\'s partial file (a '
                 'stopped board); the plan\'s runs it lacks are named in the output')
  p.add_argument('--markdown', action='store_true', help='print the table as markdown')
  p.add_argument('--plot', default=None, metavar='PNG', help='loss/return against wall time')
  p.add_argument('--mean-std', action='store_true',
                 help='also print the final metric as mean ± std over seeds (default and best)')
  p.add_argument('--from-json', default=None, metavar='PATH', help='re-print a saved run')
  p.add_argument('--smoke', action='store_true',
                 help='every entry on every task for a few steps on a tiny subset (a test)')
  args = p.parse_args(argv)
  if args.smoke:
    args.seeds, args.no_sweep, args.steps, args.batch_size = 1, True, 3, 32
    args.eval_every, args.test_subset, args.train_subset = 3, 200, 256
    args.val_size, args.val_batch, args.ppo_updates, args.kfac_warmup = 256, 32, 2, 1
    args.mlp_hidden, args.cnn_widths, args.final_test = (32,), (4, 8), 200
    args.lm_steps, args.lm_eval_every, args.lm_valid_windows = 3, 1, 16
    args.lm_seq, args.lm_width, args.lm_layers, args.lm_heads = 16, 16, 1, 2
    if args.out == os.path.join('results', 'leaderboard.json'):
      args.out = os.path.join('results', 'leaderboard_smoke.json')
  args.target = {'mlp': args.target_mlp, 'cnn': args.target_cnn, 'ppo': args.target_ppo,
                 'lm': args.target_lm}
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    runs, meta = saved['runs'], saved['meta']
    skips = {tuple(k.split('/', 1)): v for k, v in saved['skips'].items()}
    result = board(runs, skips)
  else:
    t_start = time.perf_counter()
    tasks = args.tasks.split(',')
    names = args.entries.split(',')
    unknown = [n for n in names if n not in ENTRIES] + [t for t in tasks if t not in TASKS]
    if unknown:
      raise SystemExit(f'unknown entries/tasks: {unknown}')
    skips, plan = {}, []
    for task in tasks:
      kind = kind_of(task)
      for name in names:
        reason = skip_reason(ENTRIES[name], task)
        if reason:
          skips[(task, name)] = reason
      for seed in range(args.seeds):
        width = max(len(ENTRIES[n].grid[kind] or [None]) for n in names)
        for pos in range(1 if args.no_sweep else width):  # interleaved: position, then entry
          for name in names:
            e = ENTRIES[name]
            if (task, name) in skips:
              continue
            values = [e.default[kind]] if args.no_sweep else (
                [e.default[kind]] + [v for v in (e.grid[kind] or []) if v != e.default[kind]])
            if pos < len(values):
              plan.append((task, name, values[pos], seed))
    runs, resumed = [], 0
    partial = args.out + '.partial.jsonl'
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    if args.from_partial and not os.path.exists(partial):
      raise SystemExit(f'--from-partial: no partial file {partial}')
    if (args.resume or args.from_partial) and os.path.exists(partial):
      with open(partial) as f:
        runs = [json.loads(line) for line in f if line.strip()]
      resumed = len(runs)
    elif os.path.exists(partial):
      os.remove(partial)
    done = {(r['task'], r['entry'], r['value'], r['seed']) for r in runs}
    missing = []
    for k, (task, name, value, seed) in enumerate(plan):
      if (task, name, value, seed) in done:
        continue
      if args.from_partial:
        missing.append(f'{task}/{name}/{value}/seed {seed}')
        continue
      r = run_one(task, ENTRIES[name], value, seed, args)
      runs.append(r)
      with open(partial, 'a') as f:   # a stopped board resumes from here (--resume)
        f.write(json.dumps(r, default=lambda x: None) + '\n')
      print(f"[{k + 1}/{len(plan)} {task} {name} {value} seed {seed}: final {r['final']}, "
            f"target@{r['target_step']}, {r['seconds_with_compile']:.1f}s"
            f"{' ' + r['error'] if r['error'] else ''}; "
            f"{time.perf_counter() - t_start:.0f}s total]", file=sys.stderr, flush=True)
    loads = [r['loadavg_before'] for r in runs if r['loadavg_before'] is not None]
    # The harness's metadata (command, git commit, versions, platform, ...) and the board's own.
    meta = H.metadata(args, argv=argv, module='benchmarks.leaderboard', t0=t_start,
                      peers=_versions(), load_min=min(loads, default=None),
                      load_max=max(loads, default=None), cpu_count=os.cpu_count(),
                      devices=str(jax.devices()), resumed_runs=resumed,
                      from_partial=args.from_partial, missing_runs=missing)
    if args.from_partial:  # the time the runs took, not this call's
      meta['seconds'] = sum(r.get('seconds_with_compile') or 0.0 for r in runs)
    if missing:
      print(f'{len(missing)} of {len(plan)} planned runs not in {partial}: {", ".join(missing)}',
            file=sys.stderr)
    # Entries resumed from the partial file stay on the board even when this call's --entries
    # leaves them out (e.g. a costly entry run for fewer seeds in an earlier call).
    names = [n for n in ENTRIES if n in names or any(r['entry'] == n for r in runs)]
    result = board(runs, skips, names)
    with open(args.out, 'w') as f:
      json.dump(dict(meta=meta, board=result, runs=runs,
                     skips={f'{t}/{n}': v for (t, n), v in skips.items()}), f, indent=1,
                default=lambda x: None)
  if args.markdown:
    print(markdown(result, meta))
  else:
    for r in result:
      print(r['task'], r['entry'], r['status'], r.get('reason', ''),
            '' if r['status'] == 'skipped' else (r['best'] or {}).get('final'))
  if args.mean_std:
    print(mean_std(result))
  if args.plot:
    plot(runs, result, args.plot)
  return dict(meta=meta, board=result, runs=runs)


if __name__ == '__main__':
  main()
