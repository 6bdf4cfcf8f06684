r"""Levenberg–Marquardt damping: one controller for every damped quadratic model.

A method that steps to the minimiser of a damped quadratic model ``M`` of the
loss (AdamQLR's :func:`fop_optax.scale_by_qlr`, series saddle-free Newton's
:func:`fop_optax.series_sfn`) measures the loss again after the step and
adapts the damping ``λ`` to how well ``M`` predicted it. With ``f`` the loss
before the step, ``f'`` after it (same batch) and ``M`` the model's predicted
change (negative for a predicted decrease),

.. math::
  ρ = \frac{f' − f}{M}, \qquad
  λ ← \begin{cases} ω_{dec}·λ & \text{success: } ρ > 3/4 \\
                    ω_{inc}·λ & \text{failure: } ρ < 1/4 \\
                    λ & \text{else} \end{cases}, \qquad λ ← \max(λ, λ_{min}).

``ρ`` alone is ambiguous where ``M ≥ 0``: a model that predicts an *increase*
(``M > 0``) and a loss that rose gives ``ρ > 0``, possibly ``> 3/4``, and
``M = 0`` gives no ratio at all. Neither is a step the model got right, so
the controller classifies a step as a **failure** (``λ ← ω_{inc}·λ``, never
``ω_{dec}``) whenever

* the model predicts no decrease, ``M ≥ 0``;
* the loss rose, ``f' > f``;
* ``f' − f`` is not finite (``f'`` or ``f`` NaN or ±Inf).

Only ``M < 0``, ``f' ≤ f`` finite is judged by ``ρ``. The reported ``ρ`` is
``−∞`` where the ratio is undefined (``f' − f`` or ``M`` not finite, or
``M = 0``) and the plain ratio ``(f' − f)/M`` otherwise, also where a failure
overrides it (``M > 0``). One exception keeps a zero gradient from ratcheting ``λ`` up
without end: a *null step*, ``M = 0`` and ``f' = f`` exactly (e.g. ``g = 0``,
so the step is zero), carries no information; ``λ`` is kept (still floored)
and ``ρ`` is reported as 1, the value the methods' states start with.

(Before 0.2.0 the two methods reported ``ρ = 1`` wherever ``M ≥ 0``, and so
*lowered* ``λ`` after a step the model had not predicted; see the changelog.)

References:
  Moré, `The Levenberg-Marquardt algorithm: implementation and theory
  <https://doi.org/10.1007/BFb0067700>`_, 1978.

  Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015
  (Section 6, adapting λ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ['levenberg_marquardt', 'SUCCESS_THRESHOLD', 'FAILURE_THRESHOLD']

#: ``ρ`` above this (with ``M < 0``, ``f' ≤ f``) decreases ``λ``.
SUCCESS_THRESHOLD = 0.75
#: ``ρ`` below this (or any failure) increases ``λ``.
FAILURE_THRESHOLD = 0.25


def levenberg_marquardt(
    damping: jax.typing.ArrayLike,
    actual_change: jax.typing.ArrayLike,
    predicted_change: jax.typing.ArrayLike,
    *,
    decrease: jax.typing.ArrayLike,
    increase: jax.typing.ArrayLike,
    min_damping: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""The reduction ratio ``ρ`` and the next damping ``λ`` (see the module docstring).

  Pure and elementwise (scalars in practice); traceable under ``jit`` and
  ``vmap``. Computed in the dtype ``actual_change``, ``predicted_change`` and
  ``damping`` promote to.

  Args:
    damping: ``λ`` used for the step.
    actual_change: ``f' − f``, the measured change of the loss.
    predicted_change: ``M``, the damped model's predicted change (``< 0`` for
      a predicted decrease).
    decrease: ``ω_dec`` (≤ 1), the factor on a success (``ρ > 3/4``).
    increase: ``ω_inc`` (≥ 1), the factor on a failure (``ρ < 1/4``, ``M ≥ 0``,
      ``f' > f`` or a non-finite ``f' − f``).
    min_damping: ``λ_min``, the floor on the new ``λ``.

  Returns:
    ``(rho, new_damping)``: ``ρ`` as reported (``−∞`` where undefined, 1 for
    a null step) and ``max(λ_new, λ_min)``.
  """
  damping, actual, predicted = (jnp.asarray(x) for x in (damping, actual_change,
                                                           predicted_change))
  dtype = jnp.result_type(damping, actual, predicted, jnp.float32)
  damping, actual, predicted = (x.astype(dtype) for x in (damping, actual, predicted))
  finite = jnp.isfinite(actual)
  null_step = (predicted == 0) & (actual == 0)
  defined = finite & jnp.isfinite(predicted) & (predicted != 0)
  ratio = jnp.where(defined, actual, -1) / jnp.where(defined, predicted, 1)
  rho = jnp.where(defined, ratio, -jnp.inf)
  rho = jnp.where(null_step, 1, rho).astype(dtype)
  # Judged by ρ only where the model predicted a decrease and the loss did not rise.
  judged = defined & (predicted < 0) & (actual <= 0)
  success = judged & (rho > SUCCESS_THRESHOLD)
  failure = ~null_step & ~(judged & (rho >= FAILURE_THRESHOLD))
  new_damping = jnp.where(success, damping * decrease,
                          jnp.where(failure, damping * increase, damping))
  new_damping = jnp.maximum(new_damping, jnp.asarray(min_damping, dtype)).astype(dtype)
  return rho, new_damping
