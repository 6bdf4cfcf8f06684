"""The registry of every public optimiser, for the optax-citizen harness (``test_citizen.py``).

Like optax's ``contrib/_common_test.py``: one entry per optimiser factory exported in
``fop_optax.__all__``, each saying how a new user builds it (``make(learning_rate)``) and which
keyword arguments its ``update`` needs besides ``(updates, state, params)`` (``extra(loss,
params)``, ``loss`` being the batch loss ``params -> scalar``). ``test_citizen.py`` runs every
entry through the same checks; ``test_registry_covers_all_factories`` keeps this registry equal
to the factories the package exports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import fop_optax


@dataclasses.dataclass(frozen=True)
class Entry:
  """How to build one optimiser (``factory(**kwargs(learning_rate))``) and call its ``update``."""
  factory: Callable[..., optax.GradientTransformation]
  kwargs: Callable[[float], dict]
  # keyword arguments ``update`` needs besides (updates, state, params), from the batch loss
  extra: Callable[[Callable, Any], dict] = lambda loss, params: {}
  # the keyword of ``factory`` that sets the step size (None: it has none)
  learning_rate_arg: str | None = 'learning_rate'
  # an alias wrapped in ``skip_nonfinite`` (skips a non-finite step and counts it)
  skips_nonfinite: bool = False
  # what ``optax.inject_hyperparams`` must keep static (Python ints that set shapes, and
  # callables, which it would otherwise take for schedules)
  static_args: tuple[str, ...] = ()

  def make(self, learning_rate: float) -> optax.GradientTransformation:
    return self.factory(**self.kwargs(learning_rate))


def _value_fn(loss, params):
  return {'value': loss(params), 'grad': jax.grad(loss)(params), 'value_fn': loss}


def _one_pass(loss, params):
  # the validation batch: the same loss at shifted parameters (another batch's loss)
  return {'value_fn': loss,
          'validation_value_fn': lambda p: loss(jax.tree.map(lambda x: x + 0.1, p))}


def _learned_apply(w, u):
  return jax.tree.map(lambda x: (w * x).astype(x.dtype), u)


def _learned_init(params):
  del params
  return jnp.ones((), jnp.float32)


F = fop_optax
_LODO_STATIC = ('num_layers', 'block_size', 'seed')
_ONE_PASS_STATIC = ('period', 'neumann_terms')
REGISTRY: dict[str, Entry] = {
    'fop': Entry(F.fop, lambda lr: dict(learning_rate=lr, momentum=0.9), skips_nonfinite=True),
    'fop_norm': Entry(F.fop, lambda lr: dict(learning_rate=lr, momentum=0.9, normalize=True),
                      skips_nonfinite=True),
    'fop_adam': Entry(F.fop_adam, lambda lr: dict(learning_rate=lr), skips_nonfinite=True),
    'scale_by_fop': Entry(F.scale_by_fop, lambda lr: dict(learning_rate=lr)),
    'sgd_hd': Entry(F.sgd_hd, lambda lr: dict(learning_rate=lr), skips_nonfinite=True),
    'sgd_hd_momentum': Entry(F.sgd_hd, lambda lr: dict(learning_rate=lr, momentum=0.9),
                             skips_nonfinite=True),
    'pp_hd': Entry(F.sgd_hd, lambda lr: dict(learning_rate=lr, per_parameter=True),
                   skips_nonfinite=True),
    'adam_hd': Entry(F.adam_hd, lambda lr: dict(learning_rate=lr), skips_nonfinite=True),
    'scale_by_hypergradient': Entry(F.scale_by_hypergradient, lambda lr: dict(learning_rate=lr)),
    'scale_by_learned_preconditioner': Entry(
        F.scale_by_learned_preconditioner,
        lambda lr: dict(apply_fn=_learned_apply, init_fn=_learned_init, learning_rate=lr),
        static_args=('apply_fn', 'init_fn')),
    'lodo': Entry(F.lodo, lambda lr: dict(learning_rate=lr), skips_nonfinite=True,
                  static_args=_LODO_STATIC),
    'scale_by_lodo': Entry(F.scale_by_lodo, lambda lr: dict(learning_rate=lr),
                           static_args=_LODO_STATIC),
    'adam_qlr': Entry(F.adam_qlr, lambda lr: dict(curvature='hessian'), _value_fn,
                      learning_rate_arg=None, skips_nonfinite=True),
    'scale_by_qlr': Entry(F.scale_by_qlr,
                          lambda lr: dict(direction=optax.identity(), curvature='hessian'),
                          _value_fn, learning_rate_arg=None),
    'series_sfn': Entry(F.series_sfn, lambda lr: dict(learning_rate=lr), _value_fn,
                        skips_nonfinite=True,
                        static_args=('num_terms', 'acceleration_order', 'power_iterations')),
    'one_pass_hpo': Entry(F.one_pass_hpo,
                          lambda lr: dict(learning_rate=lr, momentum=0.9, weight_decay=1e-4),
                          _one_pass, static_args=_ONE_PASS_STATIC, skips_nonfinite=True),
    'one_pass_hpo_injected': Entry(
        F.one_pass_hpo_injected,
        lambda lr: dict(optimizer=optax.inject_hyperparams(optax.sgd)(lr, 0.9)),
        _one_pass, learning_rate_arg=None, static_args=_ONE_PASS_STATIC, skips_nonfinite=True),
}

# Exported callables that are not optimiser factories, and why.
NOT_FACTORIES = {
    'skip_nonfinite': 'a wrapper of another transformation (checked through the aliases)',
    'lodo_preconditioner': "LODO's network as (init_fn, apply_fn) for "
                           'scale_by_learned_preconditioner',
    'resolve_structures': 'the structure rule, not an optimiser',
    'structures_for': 'the module-aware structure rule, not an optimiser',
    'describe': 'a table of the structures, not an optimiser',
    'einsum_dimensions': "an einsum equation's dimension numbers, not an optimiser",
}
