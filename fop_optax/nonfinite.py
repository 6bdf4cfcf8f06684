"""Skipping steps whose gradients (or resulting updates) are not finite."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ['SkipNonFiniteState', 'skip_nonfinite']


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    skipped_steps: how many steps were skipped so far (int32 scalar).
    inner_state: the wrapped transformation's state.
  """

  skipped_steps: jax.Array
  inner_state: optax.OptState


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose incoming gradients or outgoing updates hold NaN or Inf.

  On such a step the updates are zeros and the inner state (FOP's matrices and
  stored gradient, momentum, the hyper-optimiser's state, counts) is kept as it
  was, so training continues with the next batch as if the bad one never came.
  Unlike ``optax.apply_if_finite`` it never gives up after a number of
  consecutive bad steps, and it checks the gradients too, so a bad batch never
  reaches the inner state even where the inner transformation would mask it.

  Args:
    inner: the transformation to protect.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipNonFiniteState`; ``skipped_steps`` counts the skipped steps.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipNonFiniteState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    ok = jnp.logical_and(_all_finite(updates), _all_finite(new_updates))
    new_updates = optax.tree.where(ok, new_updates, optax.tree.zeros_like(new_updates))
    inner_state = optax.tree.where(ok, inner_state, state.inner_state)
    skipped = state.skipped_steps + jnp.logical_not(ok).astype(jnp.int32)
    return new_updates, SkipNonFiniteState(skipped, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
