"""Skipping steps whose gradients (or resulting updates) are not finite."""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fop_optax import _checks

__all__ = ['SkipNonFiniteState', 'skip_nonfinite', 'NonFiniteStepsWarning',
           'NonFiniteLetThroughWarning', 'for_alias']

#: Default ``warn_after`` of :func:`skip_nonfinite`.
WARN_AFTER = 100
#: ``max_consecutive_errors`` of the aliases' :func:`skip_nonfinite` (see :func:`for_alias`).
ALIAS_MAX_CONSECUTIVE_ERRORS = 100


class NonFiniteStepsWarning(RuntimeWarning):
  """Many steps in a row had NaN/Inf gradients or updates (see :func:`skip_nonfinite`)."""


class NonFiniteLetThroughWarning(NonFiniteStepsWarning):
  """``max_consecutive_errors`` was reached: NaN/Inf now reach the parameters (see :func:`skip_nonfinite`)."""


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    skipped_steps: how many steps were skipped so far (int32 scalar).
    consecutive_nonfinite: how many of the latest steps in a row were
      non-finite (int32 scalar; 0 after a finite step). Counts the steps let
      through after ``max_consecutive_errors`` too.
    inner_state: the wrapped transformation's state.
  """

  skipped_steps: jax.Array
  consecutive_nonfinite: jax.Array
  inner_state: optax.OptState


def _all_finite(tree) -> jax.Array:
  """Whether every floating-point entry of ``tree`` is finite: one fused reduction per leaf.

  ``Σ (x − x)`` is 0 when every ``x`` is finite and NaN otherwise (``Inf − Inf`` is NaN), and
  it cannot overflow; XLA reads each leaf once (``jnp.all(jnp.isfinite(x))`` may write
  a boolean copy of each leaf first: two passes). Integer leaves are finite.
  """
  sums = [jnp.sum(x - x, dtype=jnp.promote_types(x.dtype, jnp.float32))
          for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  if not sums:
    return jnp.array(True)
  return jnp.isfinite(sum(sums))


def _warn(crossing, consecutive, skipped, let_through):
  # Under jax.vmap the cond around this callback becomes a select that runs it
  # on every step, with batched arguments: warn only where a threshold is crossed.
  crossing = np.asarray(crossing)
  if not crossing.any():
    return
  n = int(np.asarray(consecutive)[crossing].max())
  total = int(np.asarray(skipped)[crossing].max())
  tail = ('; max_consecutive_errors is reached, so non-finite updates now reach the '
          'parameters' if np.asarray(let_through)[crossing].any()
          else '; the parameters are frozen where they are')
  warnings.warn(
      f'skip_nonfinite: the last {n} steps in a row had NaN/Inf gradients or updates '
      f'({total} skipped in all){tail}. A run that only skips is not training: the '
      'iterate or the learning rate has probably blown up.', NonFiniteStepsWarning, stacklevel=1)


def _announce_let_through(first, let_through, consecutive, skipped, limit):
  """Host side of the let-through warning; returns ``let_through`` unchanged.

  A ``jax.pure_callback`` (not ``jax.debug.callback``): it has no side effect in
  JAX's sense, so a compiled step that holds it keeps jit's C++ dispatch fast
  path (a ``jax.debug.callback`` inside the same ``lax.cond`` costs every
  step), and the updates it gates depend on its result, so it runs before the NaNs are
  let through. Under ``jax.vmap`` the arguments are batched (see
  :func:`_let_through_gate`): warn only where ``first``.
  """
  first_np = np.asarray(first)
  if first_np.any():
    n = int(np.asarray(consecutive)[first_np].max())
    total = int(np.asarray(skipped)[first_np].max())
    warnings.warn(
        f'skip_nonfinite: {n} steps in a row had NaN/Inf gradients or updates ({total} '
        f'skipped in all); max_consecutive_errors={int(limit)} is reached, so from this step on '
        'the non-finite updates and optimiser state are let through to the parameters. '
        'The iterate or the learning rate has probably blown up.',
        NonFiniteLetThroughWarning, stacklevel=1)
  return np.asarray(let_through)


@functools.partial(jax.custom_batching.custom_vmap)
def _let_through_gate(first, let_through, consecutive, skipped, limit):
  """``let_through``, after warning on the host where ``first`` (arrays of any one shape).

  The callback sits in a ``lax.cond`` on ``any(first)``, so it runs only on a step that
  lets NaNs through. Its vmap rule keeps that so: a plain ``lax.cond`` with a batched
  predicate becomes a select that runs the callback on every step; here the batch is folded into
  the arrays and the predicate stays ``any(first)``, a scalar.
  """
  return jax.lax.cond(
      jnp.any(first),
      lambda: jax.pure_callback(
          _announce_let_through, jax.ShapeDtypeStruct(let_through.shape, jnp.bool_),
          first, let_through, consecutive, skipped, limit, vmap_method='sequential'),
      lambda: let_through)


@_let_through_gate.def_vmap
def _let_through_gate_vmap(axis_size, in_batched, first, let_through, consecutive, skipped,
                           limit):
  args = [x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
          for x, b in zip((first, let_through, consecutive, skipped), in_batched)]
  # Calling the gate again (not its body) handles nested vmaps the same way.
  return _let_through_gate(*args, limit), True


def _gate_let_through(first, let_through, consecutive, skipped, limit):
  return _let_through_gate(first, let_through, consecutive, skipped,
                           jnp.asarray(limit, jnp.int32))


def _is_crossing(n: jax.Array, every: int) -> jax.Array:
  """True at n = every, 2·every, 4·every, ...: one warning per doubling."""
  q = n // every
  return (n % every == 0) & (q >= 1) & ((q & (q - 1)) == 0)


def skip_nonfinite(
    inner: optax.GradientTransformation,
    max_consecutive_errors: Optional[int] = None,
    warn_after: Optional[int] = WARN_AFTER,
) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose incoming gradients or outgoing updates hold NaN or Inf.

  On such a step the updates are zeros and the inner state (FOP's matrices and
  stored gradient, momentum, the hyper-optimiser's state, learned step sizes,
  counts) is kept as it was, so training continues with the next batch as if
  the bad one never came. It checks the gradients too, so a bad batch never
  reaches the inner state even where the inner transformation would mask it.

  A run that skips step after step is not training: once the iterate has blown
  up every gradient overflows and the parameters stay frozen at the garbage
  point. So that this is not a quiet success:

  * after ``warn_after`` non-finite steps in a row a
    :class:`NonFiniteStepsWarning` is issued from inside the compiled step
    (``jax.debug.callback``), and again at ``2·warn_after``,
    ``4·warn_after``, ... consecutive steps (once per doubling, not every
    step). Under ``jax.vmap`` the ``lax.cond`` around it becomes a select, so
    the host callback runs (silently) on every step. A compiled step that
    holds a host callback costs more on every call, also where it never
    fires, which is why the aliases turn it off
    (:func:`for_alias`);
  * with ``max_consecutive_errors=k``, at most ``k`` steps in a row are
    skipped: from the ``k+1``-th consecutive non-finite step on, the update
    and the inner state are let through, NaN and all, as
    ``optax.apply_if_finite`` does, so that the failure shows in the
    parameters and the loss. ``None`` (the default) skips without limit.
    On the first step let through (the ``k+1``-th in a row) a
    :class:`NonFiniteLetThroughWarning` says so, with the number of steps
    skipped, before the non-finite values are let through. It comes from a
    ``jax.pure_callback`` inside a ``lax.cond`` that only runs on that step
    and whose result gates the updates, so it costs nothing while no step is
    let through (jit's fast path is kept, and a ``jax.custom_batching.custom_vmap``
    rule keeps the ``cond``'s predicate a scalar, ``any`` over the batch, under
    ``jax.vmap``, so that a vmapped run does not call the host on every step). Silence it
    with ``warnings.filterwarnings('ignore', category=NonFiniteLetThroughWarning)``.

  Args:
    inner: the transformation to protect.
    max_consecutive_errors: the most non-finite steps in a row to skip;
      ``None`` for no limit.
    warn_after: warn after this many non-finite steps in a row (then at each
      doubling); ``None`` never warns.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipNonFiniteState`; ``skipped_steps`` counts the skipped steps
    and ``consecutive_nonfinite`` the current run of non-finite steps.
  """
  for name, value in (('max_consecutive_errors', max_consecutive_errors),
                      ('warn_after', warn_after)):
    _checks.check_int(name, value, minimum=0 if name == 'max_consecutive_errors' else 1,
                      allow_none=True, where='skip_nonfinite')
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    # Two arrays, not one shared: a state whose leaves share a buffer cannot be
    # donated (jax.jit(..., donate_argnums=...) rejects the same buffer twice).
    return SkipNonFiniteState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                              inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    finite = jnp.logical_and(_all_finite(updates), _all_finite(new_updates))
    consecutive = jnp.where(finite, 0, state.consecutive_nonfinite + 1).astype(jnp.int32)
    if max_consecutive_errors is None:
      let_through = jnp.array(False)
    else:
      let_through = consecutive > max_consecutive_errors
      # Warn on the first step let through, before the NaNs are: the updates
      # below depend on the gate's result (the same let_through).
      let_through = _gate_let_through(
          consecutive == max_consecutive_errors + 1, let_through, consecutive,
          state.skipped_steps, max_consecutive_errors)
    ok = finite | let_through
    new_updates = optax.tree.where(ok, new_updates, optax.tree.zeros_like(new_updates))
    inner_state = optax.tree.where(ok, inner_state, state.inner_state)
    skipped = state.skipped_steps + jnp.logical_not(ok).astype(jnp.int32)
    if warn_after is not None:
      crossing = _is_crossing(consecutive, warn_after)
      jax.lax.cond(
          crossing,
          lambda: jax.debug.callback(_warn, crossing, consecutive, skipped, let_through),
          lambda: None)
    return new_updates, SkipNonFiniteState(skipped, consecutive, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def for_alias(tx: optax.GradientTransformation, enabled: bool = True):
  """The aliases' :func:`skip_nonfinite`: skip up to 100 non-finite steps in a row, then warn.

  A run whose gradients stay non-finite for ``ALIAS_MAX_CONSECUTIVE_ERRORS`` (100)
  steps in a row has blown up; from the next such step on the NaNs are let through
  (as ``optax.apply_if_finite`` does), so the failure shows in the parameters and
  the loss instead of a frozen model that looks healthy, and a
  :class:`NonFiniteLetThroughWarning` says so on that step (a ``jax.pure_callback``
  that runs only then: no per-step cost). There is no ``warn_after`` warning: its
  ``jax.debug.callback`` costs every step, also where it never fires.
  ``enabled=False`` returns ``tx`` unchanged.

  Every alias (:func:`fop_optax.fop`, :func:`fop_optax.fop_adam`,
  :func:`fop_optax.sgd_hd`, :func:`fop_optax.adam_hd`, :func:`fop_optax.lodo`, and
  the ``qlr`` and ``series_sfn`` aliases) wraps its whole chain in this, so its state
  is a :class:`SkipNonFiniteState` and ``state.skipped_steps`` is at the top.
  """
  if not enabled:
    return tx
  return skip_nonfinite(tx, max_consecutive_errors=ALIAS_MAX_CONSECUTIVE_ERRORS, warn_after=None)
