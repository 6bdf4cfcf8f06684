r"""Quadratic-model learning rates (AdamQLR): any direction, a damped step size.

Clarke, Su and Hernández-Lobato's AdamQLR takes Adam's direction and chooses
its step size from a damped quadratic model of the loss along it, with
Levenberg–Marquardt damping, as K-FAC does. One step, with ``f`` the loss on
the batch, ``g = ∇f(θ)`` and ``d`` the direction (Adam's ``m̂/(√v̂ + ε)`` by
default; it points along ``+g``):

.. math::
  c = dᵀ C d, \qquad Q = c + λ‖d‖², \qquad α = −\frac{gᵀd}{Q}, \qquad
  Δθ = α·d,

``C`` the generalised Gauss-Newton matrix (``curvature='ggn'``, the paper's
default; ``(Jd)ᵀ ∇²_z ℓ (Jd)`` from one JVP of the model) or the Hessian
(``'hessian'``; forward-over-forward ``φ''(0)`` of ``φ(t) = f(θ + t d)``).
``α`` minimises the model ``M(α) = f + α gᵀd + ½α²Q`` and is negative for a
descent direction; the step is invariant to the scale (and sign) of ``d``.
After the step the loss is measured again on the same batch,
``f' = f(θ + Δθ)`` (one forward pass), and the damping adapts to how well the
model predicted it:

.. math::
  ρ = \frac{f' − f}{α gᵀd + ½α²Q}, \qquad
  λ ← \begin{cases} ω_{dec}·λ & ρ > 3/4 \\ ω_{inc}·λ & ρ < 1/4 \\ λ & \text{else}
  \end{cases}, \qquad λ ≥ λ_{min},

the new ``λ`` applying from the next step (:func:`fop_optax._damping.levenberg_marquardt`,
shared with :func:`fop_optax.series_sfn`). A step the model did not predict is a
failure whatever ``ρ`` says: where ``M = α gᵀd + ½α²Q ≥ 0`` (the model predicts no
decrease, e.g. ``step_size_scale > 2`` or ``saddle_free=False`` on negative
curvature), where ``f' > f``, or where ``f'`` is not finite, ``λ ← ω_{inc}·λ``;
``ρ`` is then reported as the plain ratio, or ``−∞`` where that is undefined
(``M = 0``, non-finite ``f'``). A null step (``M = 0`` and ``f' = f``, e.g.
``g = 0``) keeps ``λ`` and reports ``ρ = 1``. Cost per step, besides the gradient: one
model JVP (GGN) or two nested JVPs of the loss (Hessian), and one forward
pass, about one more gradient evaluation in all.

The direction is any optax transformation: ``optax.scale_by_adam()`` (the
default) gives AdamQLR, ``optax.identity()`` SGDQLR, and FOP's preconditioned
gradient (``optax.chain(fop_optax.scale_by_fop(...), optax.scale_by_adam())``)
fits the same frame.

References:
  Clarke, Su and Hernández-Lobato, `Adam through a Second-Order Lens
  <https://arxiv.org/abs/2310.14963>`_, ICML 2024 (as "Studying K-FAC
  Heuristics by Viewing Adam through a Second-Order Lens").
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fop_optax import _checks
from fop_optax import _damping
from fop_optax import curvature as curvature_lib
from fop_optax import nonfinite

__all__ = ['QlrState', 'adam_qlr', 'scale_by_qlr', 'CURVATURES', 'DAMPING_RULES']

CURVATURES = ('ggn', 'hessian')
DAMPING_RULES = ('levenberg_marquardt', 'decreasing_loss')


class QlrState(NamedTuple):
  """State of :func:`scale_by_qlr`.

  Attributes:
    count: steps taken (int32).
    damping: ``λ`` for the next step.
    step_size: the ``α`` of the last step (negative for a descent step).
    rho: the last step's reduction ratio ``ρ`` (1 before the first step and
      after a null step; ``−∞`` where undefined: ``M = 0`` or ``f'`` not
      finite).
    curvature: the last step's ``dᵀCd`` (without damping).
    direction_state: the direction transformation's state.
  """

  count: jax.Array
  damping: jax.Array
  step_size: jax.Array
  rho: jax.Array
  curvature: jax.Array
  direction_state: optax.OptState


def scale_by_qlr(
    direction: Optional[optax.GradientTransformation] = None,
    *,
    curvature: str = 'ggn',
    initial_damping: float = 1e-3,
    damping_decrease: float = 0.5,
    damping_increase: float = 2.0,
    min_damping: float = 1e-8,
    saddle_free: bool = True,
    max_step_size: Optional[float] = None,
    step_size_scale: float = 1.0,
    damping_rule: str = 'levenberg_marquardt',
) -> optax.GradientTransformationExtraArgs:
  r"""A direction scaled by the step size that minimises a damped quadratic model.

  Terminal: it emits the final update ``α·d`` (add it to the parameters), so
  it must be last in a chain.

  ``update(updates, state, params, *, value=None, grad=None, value_fn,
  model_fn=None, loss_fn=None)`` (optax's names, as
  ``optax.scale_by_zoom_linesearch``):

  * ``updates``: what ``direction`` is applied to (the gradient, or whatever a
    chain before this made of it: clipped, decayed).
  * ``grad``: the gradient ``g`` of ``value_fn`` at ``params``, the model's
    linear term ``gᵀd``; computed with ``value_fn`` (one more backward pass)
    when not given. It is never read from ``updates``, so a clip or weight
    decay chained before changes the direction, not the model.
  * ``value_fn(params) -> scalar``: the loss on the batch ``grads`` came
    from (same dropout key); it measures ``f'`` for the damping, and is the
    Hessian in ``curvature='hessian'``.
  * ``value``: ``f(params)``; computed with ``value_fn`` (one more forward
    pass) when not given.
  * ``model_fn(params) -> outputs`` and ``loss_fn`` (``outputs -> scalar``,
    or ``'softmax_cross_entropy'`` / ``'mse'`` / ``'l2'``, see
    :mod:`fop_optax.curvature`): the GGN, for ``curvature='ggn'``.

  Args:
    direction: the direction's transformation; ``None`` for
      ``optax.scale_by_adam()`` (AdamQLR). Its learning rate and sign do not
      matter (``α`` absorbs them).
    curvature: ``'ggn'`` (the paper's) or ``'hessian'``.
    initial_damping: ``λ_0`` (the paper's untuned 1e-3); 0 with
      ``min_damping=0`` gives the undamped variant.
    damping_decrease: ``ω_dec`` (≤ 1), applied when ``ρ > 3/4`` (and the
      model predicted a decrease that came).
    damping_increase: ``ω_inc`` (≥ 1), applied when ``ρ < 1/4`` or on any
      failure (``M ≥ 0``, ``f' > f``, non-finite ``f'``). Both 1: fixed
      damping.
    min_damping: lower bound on ``λ`` (1e-8 as the reference).
    saddle_free: use ``α = −gᵀd/|Q|``, so that a direction of negative
      curvature (possible only with ``curvature='hessian'``) is still followed
      downhill; ``False`` is the reference's ``−gᵀd/Q``, which there moves to
      the model's maximum. No effect for the GGN (``Q ≥ 0``).
    max_step_size: clip ``|α|`` (the reference's older variant); ``None``
      (default) for no clipping.
    step_size_scale: multiplies ``α`` (the reference's amplification, 1).
    damping_rule: ``'levenberg_marquardt'`` (the ``ρ`` rule above) or
      ``'decreasing_loss'``, the reference's SGDQLR rule: when ``f' < f``
      the step is kept and ``λ ← damping_decrease·λ``; otherwise it is
      rejected (a zero update, the direction's state restored) and
      ``λ ← damping_increase·λ``. Its configs use ``initial_damping=1,
      damping_decrease=0.9, damping_increase=2``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(x): return jnp.sum(jnp.array([1., 10.]) * x ** 2)
    >>> tx = fop_optax.scale_by_qlr(optax.identity(), curvature='hessian')
    >>> params = jnp.array([1., 2.])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   value, grad = jax.value_and_grad(f)(params)
    ...   updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
    ...   params = optax.apply_updates(params, updates)
    ...   print('f: {:.2E}'.format(f(params)))
    f: 8.10E-01
    f: 1.53E-02

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`QlrState`.
  """
  where = 'scale_by_qlr'
  if damping_rule not in DAMPING_RULES:
    raise ValueError(f'{where}: damping_rule must be one of {DAMPING_RULES}, got {damping_rule!r}')
  if curvature not in CURVATURES:
    raise ValueError(f'{where}: curvature must be one of {CURVATURES}, got {curvature!r}')
  _checks.check_number('initial_damping', initial_damping, allow_zero=True, where=where)
  _checks.check_number('min_damping', min_damping, allow_zero=True, where=where)
  _checks.check_number('damping_decrease', damping_decrease, allow_zero=False, where=where)
  _checks.check_number('damping_increase', damping_increase, allow_zero=False, where=where)
  _checks.check_number('step_size_scale', step_size_scale, allow_zero=False, where=where)
  if max_step_size is not None:
    _checks.check_number('max_step_size', max_step_size, allow_zero=False, where=where)
  if isinstance(damping_decrease, numbers.Real) and damping_decrease > 1:
    raise ValueError(f'{where}: damping_decrease must be <= 1, got {damping_decrease}')
  if isinstance(damping_increase, numbers.Real) and damping_increase < 1:
    raise ValueError(f'{where}: damping_increase must be >= 1, got {damping_increase}')
  direction = optax.with_extra_args_support(
      optax.scale_by_adam() if direction is None else direction)

  def init_fn(params):
    dtype = curvature_lib.scalar_dtype(params)
    return QlrState(
        count=jnp.zeros([], jnp.int32),
        damping=jnp.asarray(initial_damping, dtype),
        step_size=jnp.zeros([], dtype),
        rho=jnp.ones([], dtype),
        curvature=jnp.zeros([], dtype),
        direction_state=direction.init(params),
    )

  def update_fn(updates, state, params=None, *, value=None, grad=None, value_fn=None,
                model_fn=None, loss_fn=None, **extra_args):
    if params is None:
      raise ValueError(f'{where}: update() needs params (the step size is measured at them)')
    needs = {'value_fn': value_fn}
    if curvature == 'ggn':
      needs.update(model_fn=model_fn, loss_fn=loss_fn)
    _checks.require_closures(
        where, needs, 'value_fn(params) -> the loss on the batch (for ρ and the curvature); with '
        "curvature='ggn' also model_fn(params) -> the outputs and loss_fn(outputs) -> the loss "
        "(or 'softmax_cross_entropy' / 'mse' / 'l2'), as in tx.update(grads, state, params, "
        'value=loss, grad=grads, value_fn=value_fn, model_fn=model_fn, loss_fn=loss_fn)',
        callables=tuple(n for n in needs if n != 'loss_fn'))
    dtype = curvature_lib.scalar_dtype(params)
    d, direction_state = direction.update(updates, state.direction_state, params, **extra_args)
    if grad is None:
      value_and_grad = jax.value_and_grad(value_fn)(params)
      value = value_and_grad[0] if value is None else value
      grads = value_and_grad[1]
    else:
      grads = grad
    if value is None:
      value = value_fn(params)
    value = jnp.asarray(value).astype(dtype)
    gd = curvature_lib.tree_vdot(grads, d, dtype)
    dd = curvature_lib.tree_vdot(d, d, dtype)
    if curvature == 'ggn':
      c = curvature_lib.ggn_quadratic(model_fn, loss_fn, params, d)
    else:
      c = curvature_lib.hessian_quadratic(value_fn, params, d)
    c = jnp.asarray(c).astype(dtype)
    damping = state.damping.astype(dtype)
    q = c + damping * dd
    denominator = jnp.abs(q) if saddle_free else q
    safe = jnp.where(denominator == 0, 1, denominator)
    alpha = jnp.where(denominator == 0, 0, -gd / safe) * step_size_scale
    if max_step_size is not None:
      alpha = jnp.clip(alpha, -max_step_size, max_step_size)
    alpha = alpha.astype(dtype)
    new_updates = jax.tree.map(lambda x, p: (alpha * x).astype(p.dtype), d, params)

    new_value = jnp.asarray(value_fn(optax.apply_updates(params, new_updates))).astype(dtype)
    predicted = alpha * gd + 0.5 * alpha * alpha * q
    rho, new_damping = _damping.levenberg_marquardt(
        damping, new_value - value, predicted, decrease=damping_decrease,
        increase=damping_increase, min_damping=min_damping)
    if damping_rule != 'levenberg_marquardt':
      accept = new_value < value  # False for a NaN f'
      new_damping = jnp.where(accept, damping * damping_decrease, damping * damping_increase)
      new_updates = optax.tree.where(accept, new_updates, optax.tree.zeros_like(new_updates))
      direction_state = optax.tree.where(accept, direction_state, state.direction_state)
      new_damping = jnp.maximum(new_damping, min_damping)
    return new_updates, QlrState(
        count=optax.safe_increment(state.count),
        damping=new_damping.astype(state.damping.dtype),
        step_size=alpha.astype(state.step_size.dtype),
        rho=rho.astype(state.rho.dtype),
        curvature=c.astype(state.curvature.dtype),
        direction_state=direction_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_qlr(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    curvature: str = 'ggn',
    initial_damping: float = 1e-3,
    damping_decrease: float = 0.5,
    damping_increase: float = 2.0,
    min_damping: float = 1e-8,
    saddle_free: bool = True,
    max_step_size: Optional[float] = None,
    step_size_scale: float = 1.0,
    damping_rule: str = 'levenberg_marquardt',
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """AdamQLR with the paper's untuned defaults: no learning rate to tune.

  :func:`scale_by_qlr` on ``optax.scale_by_adam(b1, b2, eps)``, wrapped by
  default in :func:`fop_optax.skip_nonfinite`. Call ``update`` with
  ``value``, ``value_fn``, ``model_fn`` and ``loss_fn`` (see
  :func:`scale_by_qlr`). The paper's tuned starting point is
  ``initial_damping=1, damping_decrease=0.95, damping_increase=1.0526``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(x): return jnp.sum(jnp.array([1., 10.]) * x ** 2)
    >>> tx = fop_optax.adam_qlr(curvature='hessian')   # 'ggn' needs model_fn and loss_fn
    >>> params = jnp.array([1., 2.])
    >>> state = tx.init(params)
    >>> print('f:', f(params))
    f: 41.0
    >>> for _ in range(3):
    ...   value, grad = jax.value_and_grad(f)(params)
    ...   updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
    ...   params = optax.apply_updates(params, updates)
    ...   print('f: {:.2E}'.format(f(params)))
    f: 9.09E-01
    f: 8.25E-01
    f: 7.91E-01

  On a network, ``model_fn = lambda p: apply(p, x)``, ``loss_fn = lambda z:
  optax.softmax_cross_entropy_with_integer_labels(z, y).mean()`` and
  ``value_fn = lambda p: loss_fn(model_fn(p))``, all passed to ``update``.
  """
  tx = scale_by_qlr(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps), curvature=curvature,
      initial_damping=initial_damping, damping_decrease=damping_decrease,
      damping_increase=damping_increase, min_damping=min_damping, saddle_free=saddle_free,
      max_step_size=max_step_size, step_size_scale=step_size_scale, damping_rule=damping_rule)
  return nonfinite.for_alias(tx, skip_nonfinite)
