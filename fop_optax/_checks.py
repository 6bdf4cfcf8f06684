"""Up-front checks of rates given to the transformations and aliases.

One place for the rule: a rate given as a Python number, a concrete NumPy/JAX
array or a schedule (evaluated at step 0) must be finite and non-negative
(positive where zero makes no sense). Tracers, e.g. the arrays that
``optax.inject_hyperparams`` passes inside ``jax.jit``, cannot be inspected and
are let through.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['check_number', 'check_rate', 'previous_step_rate']


def _concrete(value: Any) -> Optional[np.ndarray]:
  """``value`` as a float NumPy array, or ``None`` if it cannot be inspected."""
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return np.asarray(float(value))
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    try:
      array = np.asarray(value)
    except Exception:  # pylint: disable=broad-except  # e.g. a non-addressable array
      return None
    if np.issubdtype(array.dtype, np.complexfloating):
      raise TypeError(f'expected a real rate, got a complex array of dtype {array.dtype}')
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
      return None
    return array.astype(np.float64)
  return None


def check_number(name: str, value: Any, *, allow_zero: bool, where: str = '') -> None:
  """Raises ``ValueError`` if a concrete ``value`` is non-finite or out of range.

  Args:
    name: the argument's name, for the message.
    value: a Python number or a NumPy/JAX array; tracers and other objects
      are not checked.
    allow_zero: whether 0 is allowed (``>= 0``) or not (``> 0``).
    where: the function's name, prefixed to the message.
  """
  array = _concrete(value)
  if array is None:
    return
  prefix = f'{where}: ' if where else ''
  bound = '>= 0' if allow_zero else '> 0'
  shown = value if array.ndim == 0 else array
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{prefix}{name} must be finite and {bound}, got {shown}')
  if np.any(array < 0) or (not allow_zero and np.any(array == 0)):
    raise ValueError(f'{prefix}{name} must be {bound}, got {shown}')


def check_rate(name: str, value: Any, *, allow_zero: bool = False, where: str = '') -> None:
  """Like :func:`check_number`, and a schedule is checked at step 0.

  A schedule (any callable) is called once with ``0``; if that fails, or
  returns something that cannot be inspected, it is not checked here. Its
  value at step 0 may be 0 (warm-up schedules start there) but must be finite
  and not negative.
  """
  if callable(value):
    try:
      value = value(0)
    except Exception:  # pylint: disable=broad-except  # e.g. a schedule that needs an array
      return
    name = f'{name} (a schedule) at step 0'
    allow_zero = True
  check_number(name, value, allow_zero=allow_zero, where=where)


def previous_step_rate(learning_rate: Any, count: jax.Array, where: str = '') -> Any:
  """``η`` of the step that produced ``θ_t``: a schedule is evaluated at the previous call's count.

  The one-step online hypergradients (FOP, learned preconditioners) differentiate
  ``θ_t = θ_{t−1} − η·(…)``, whose ``η`` is the previous call's. Raises
  ``ValueError`` if ``η`` is not a scalar.
  """
  eta = learning_rate(jnp.maximum(count - 1, 0)) if callable(learning_rate) else learning_rate
  if jnp.ndim(eta) != 0:
    prefix = f'{where}: ' if where else ''
    raise ValueError(f'{prefix}learning_rate must be a scalar (or a schedule returning one), '
                     f'got shape {jnp.shape(eta)}')
  return eta


class MissingClosureError(TypeError, ValueError):
  """A closure ``update`` needs was not passed (a ``TypeError``, as for any missing argument;
  also a ``ValueError``, what AdamQLR and series SFN raised before 0.2)."""


def require_closures(where: str, closures: dict[str, Any], usage: str,
                     callables: tuple[str, ...] | None = None) -> None:
  """Checks the keyword closures an ``update`` needs: present, and callable where they must be.

  Args:
    where: the transformation's name, for the message.
    closures: ``{name: value}`` of the closures this call needs.
    usage: how to pass them, e.g. ``'tx.update(grads, state, params, value_fn=loss_fn)'``;
      the message adds what a Flax ``nnx.Optimizer`` user writes.
    callables: the names that must be callables (default: all).

  Raises:
    MissingClosureError: a closure is ``None`` (all missing ones are named).
    TypeError: a closure that must be callable is not.
  """
  missing = [name for name, value in closures.items() if value is None]
  if missing:
    raise MissingClosureError(
        f'{where}: update() needs {", ".join(f"{n}=..." for n in missing)}, as keyword '
        f'argument(s): {usage}; under flax.nnx, optimizer.update(model, grads, ...) passes '
        'them through. Wrappers that pass no extra arguments (flax TrainState.apply_gradients) '
        'cannot drive it.')
  for name in (closures if callables is None else callables):
    if not callable(closures[name]):
      raise TypeError(f'{where}: {name} must be a callable, got {closures[name]!r}')


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False,
              where: str = '') -> None:
  """Checks a Python-int argument that sets a shape or a count (not a traced array).

  Raises:
    ValueError: ``value`` is not an int (``bool`` excluded) ``>= minimum`` (or ``None`` where
      allowed). A ``jax.Array`` (what ``optax.inject_hyperparams`` makes of a number it was
      not told to keep static) gets the hint to name it in ``static_args``.
  """
  if allow_none and value is None:
    return
  if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
    return
  hint = (' (under optax.inject_hyperparams, name it in static_args: it sets the shape of the '
          'computation)' if isinstance(value, jax.Array) else '')
  prefix = f'{where}: ' if where else ''
  none = 'None or ' if allow_none else ''
  raise ValueError(f'{prefix}{name} must be {none}an int >= {minimum}, got {value!r}{hint}')
