r"""Curvature-vector products: Hessian and Gauss-Newton, without forming a matrix.

The pieces that :func:`fop_optax.scale_by_qlr` (AdamQLR) and
:func:`fop_optax.series_sfn` (series saddle-free Newton) need, usable on their
own. ``f`` is a scalar loss of the parameters (a pytree), ``d``/``v`` are
parameter-shaped pytrees.

* :func:`hvp`: ``H v`` by forward-over-reverse, ``jvp(grad f, θ, v)``; one
  call costs about two gradient evaluations. :func:`hvp_fn` linearises
  ``grad f`` once and returns ``v ↦ H v`` for many products at one ``θ``.
* :func:`hessian_quadratic`: ``dᵀ H d`` by forward-over-forward,
  ``φ''(0)`` with ``φ(t) = f(θ + t d)``; it never runs a backward pass.
  :func:`directional_derivatives` returns ``(φ(0), φ'(0), φ''(0))`` together.
* :func:`ggn_vp` and :func:`ggn_quadratic`: the generalised Gauss-Newton
  matrix ``G = Jᵀ ∇²_z ℓ J`` of a loss written as ``ℓ(model_fn(θ))``, with
  ``J = ∂z/∂θ``: ``G v`` (a model JVP, an output-space product and a model
  VJP) and ``dᵀ G d = (J d)ᵀ ∇²_z ℓ (J d)`` (a model JVP only).

``loss_fn`` maps the model's outputs to the scalar loss (a closure holding the
labels), or names one of three losses whose output Hessian has a closed form
(it does not depend on the labels, so none are needed):

* ``'softmax_cross_entropy'``: ``mean_n −log softmax(z_n)[y_n]`` over every
  leading axis of the logits ``z`` (``optax.softmax_cross_entropy...(z,
  y).mean()``); ``∇²_{z_n} = (diag p_n − p_n p_nᵀ)/N``, so
  ``(Jd)ᵀ ∇²_z ℓ (Jd) = mean_n Σ_a t_{na} p_{na} (t_{na} − Σ_b p_{nb} t_{nb})``
  with ``t = J d``.
* ``'mse'``: ``mean((z − y)²)``, the mean over *every* element of ``z`` (all
  axes, batch and output alike) with no ½: ``optax.squared_error(z, y).mean()``
  or ``jnp.mean((z − y)**2)``. ``∇²_z = 2I/size``, so the quadratic is
  ``2·mean(t²)``.
* ``'l2'``: ``mean(½(z − y)²)`` over every element of ``z``, the ½ convention:
  ``optax.l2_loss(z, y).mean()`` (``optax.l2_loss`` is the elementwise
  ``½·squared_error``; ``.mean()`` is the reduction this name assumes).
  ``∇²_z = I/size``, so the quadratic is ``mean(t²)``, half of ``'mse'``'s.

The two squared losses differ by a factor of 2 in the loss and so in the
curvature: naming ``'mse'`` for a gradient of ``optax.l2_loss(...).mean()``
doubles the curvature and halves a Newton-type step, without an error.
A sum instead of a mean (``.sum()``, or a mean over the batch axis only) is
a different scale again; pass the loss itself as a callable then. For the
named losses the GGN equals the Fisher. The closed forms must match the loss
the gradient came from; a callable ``loss_fn`` always does (its output-space
curvature is taken by autodiff, which costs little next to the model's JVP).

All products are exact (no sampling). ``model_fn`` and ``fun`` must be pure
functions of the parameters on the batch the gradient was taken on (the same
dropout key too).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

__all__ = [
    'LOSSES', 'directional_derivatives', 'ggn_quadratic', 'ggn_vp', 'hessian_quadratic', 'hvp',
    'hvp_fn', 'output_hvp', 'output_quadratic', 'scalar_dtype', 'tree_vdot',
]

#: Loss names with a closed-form output Hessian (see the module docstring):
#: ``'mse'`` is ``mean((z − y)²)``, ``'l2'`` is ``optax.l2_loss(z, y).mean()``.
LOSSES = ('softmax_cross_entropy', 'mse', 'l2')

LossFn = Union[str, Callable[[Any], jax.Array]]


def scalar_dtype(tree) -> jnp.dtype:
  """float32 for bf16/f16/f32 leaves; float64 if any leaf is float64."""
  dtype = jnp.dtype(jnp.float32)
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      dtype = jnp.promote_types(dtype, leaf.dtype)
  return dtype


def tree_vdot(a, b, dtype=None) -> jax.Array:
  """``Σ_leaves Σ a·b`` accumulated in ``dtype`` (default: :func:`scalar_dtype`)."""
  dtype = scalar_dtype(a) if dtype is None else dtype
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if not leaves_a:
    return jnp.zeros([], dtype)
  return sum(jnp.vdot(x.astype(dtype), y.astype(dtype)) for x, y in zip(leaves_a, leaves_b))


def _cast_like(tangent, primal):
  return jax.tree.map(lambda t, p: jnp.asarray(t).astype(p.dtype), tangent, primal)


def _check_callable(name, fn, where):
  if not callable(fn):
    raise TypeError(f'{where}: {name} must be a callable, got {fn!r}')


# ----------------------------------------------------------------------- Hessian

def hvp(fun: Callable[[Any], jax.Array], params, vector):
  """Hessian-vector product ``∇²f(θ)·v`` by forward-over-reverse.

  Args:
    fun: ``params -> scalar``.
    params: ``θ``.
    vector: ``v``, shaped like ``params``.

  Returns:
    ``H v``, shaped like ``params``.
  """
  _check_callable('fun', fun, 'hvp')
  return jax.jvp(jax.grad(fun), (params,), (_cast_like(vector, params),))[1]


def hvp_fn(fun: Callable[[Any], jax.Array], params, *, mode: str = 'forward'):
  """Prepares Hessian-vector products at ``θ``: returns ``(∇f(θ), v ↦ ∇²f(θ)·v)``.

  The forward and backward passes are traced once; each call of the returned
  function runs only the part that depends on ``v``, which is what a series of
  many products at one point wants.

  Args:
    fun: ``params -> scalar``.
    params: ``θ``.
    mode: ``'forward'`` (forward-over-reverse, ``jax.linearize`` of the
      gradient) or ``'reverse'`` (reverse-over-reverse: the VJP of the gradient,
      ``vᵀH = (Hv)ᵀ`` since ``H`` is symmetric; it keeps the backward pass's
      residuals in memory; :mod:`fop_optax.one_pass` uses it for its
      Neumann series).

  Returns:
    ``(∇f(θ), hvp)`` with ``hvp(v) = ∇²f(θ)·v`` shaped like ``params``.
  """
  _check_callable('fun', fun, 'hvp_fn')
  if mode == 'forward':
    grad, lin = jax.linearize(jax.grad(fun), params)
    return grad, lambda v: lin(_cast_like(v, params))
  if mode == 'reverse':
    grad, vjp = jax.vjp(jax.grad(fun), params)
    return grad, lambda v: vjp(_cast_like(v, params))[0]
  raise ValueError(f"hvp_fn: mode must be 'forward' or 'reverse', got {mode!r}")


def directional_derivatives(fun: Callable[[Any], jax.Array], params, direction):
  """``(φ(0), φ'(0), φ''(0))`` of ``φ(t) = f(θ + t·d)``, forward-over-forward.

  ``φ'(0) = gᵀd`` and ``φ''(0) = dᵀ H d``: two nested JVPs, no backward pass.
  """
  _check_callable('fun', fun, 'directional_derivatives')
  direction = _cast_like(direction, params)

  def value_and_slope(p):
    return jax.jvp(fun, (p,), (direction,))

  (value, slope), (_, curvature) = jax.jvp(value_and_slope, (params,), (direction,))
  return value, slope, curvature


def hessian_quadratic(fun: Callable[[Any], jax.Array], params, direction) -> jax.Array:
  """``dᵀ ∇²f(θ) d`` by forward-over-forward (see :func:`directional_derivatives`)."""
  return directional_derivatives(fun, params, direction)[2]


# ------------------------------------------------------------------ Gauss-Newton

def _named_loss(loss_fn, where):
  if loss_fn not in LOSSES:
    raise ValueError(f'{where}: loss_fn must be a callable or one of {LOSSES}, got {loss_fn!r}')
  return loss_fn


def output_hvp(loss_fn: LossFn, outputs, tangent):
  """``∇²_z ℓ(z)·t`` in output space (a closed form for the named losses)."""
  if callable(loss_fn):
    return jax.jvp(jax.grad(loss_fn), (outputs,), (_cast_like(tangent, outputs),))[1]
  name = _named_loss(loss_fn, 'output_hvp')
  z = jnp.asarray(outputs)
  t = jnp.asarray(tangent).astype(z.dtype)
  if name == 'softmax_cross_entropy':
    n = z.size // z.shape[-1]
    p = jax.nn.softmax(z, axis=-1)
    return p * (t - jnp.sum(p * t, axis=-1, keepdims=True)) / n
  if name == 'l2':
    return t / z.size
  return 2.0 * t / z.size


def output_quadratic(loss_fn: LossFn, outputs, tangent) -> jax.Array:
  """``tᵀ ∇²_z ℓ(z) t`` in output space (a closed form for the named losses)."""
  if callable(loss_fn):
    return hessian_quadratic(loss_fn, outputs, tangent)
  name = _named_loss(loss_fn, 'output_quadratic')
  dtype = scalar_dtype(outputs)
  z = jnp.asarray(outputs).astype(dtype)
  t = jnp.asarray(tangent).astype(dtype)
  if name == 'softmax_cross_entropy':
    p = jax.nn.softmax(z, axis=-1)
    mean_t = jnp.sum(p * t, axis=-1, keepdims=True)
    per_example = jnp.sum(t * p * (t - mean_t), axis=-1)
    return jnp.mean(per_example)
  if name == 'l2':
    return jnp.mean(t * t)
  return 2.0 * jnp.mean(t * t)


def _check_ggn_args(model_fn, loss_fn, where):
  _check_callable('model_fn', model_fn, where)
  if not callable(loss_fn):
    _named_loss(loss_fn, where)


def ggn_vp(model_fn: Callable[[Any], Any], loss_fn: LossFn, params, vector):
  """Generalised Gauss-Newton-vector product ``Jᵀ ∇²_z ℓ J v``.

  Args:
    model_fn: ``params -> outputs`` (``z``, e.g. logits) on the batch.
    loss_fn: ``outputs -> scalar`` or a name in :data:`LOSSES`.
    params: ``θ``.
    vector: ``v``, shaped like ``params``.

  Returns:
    ``G v``, shaped like ``params``.
  """
  _check_ggn_args(model_fn, loss_fn, 'ggn_vp')
  outputs, jv = jax.jvp(model_fn, (params,), (_cast_like(vector, params),))
  hjv = output_hvp(loss_fn, outputs, jv)
  _, vjp = jax.vjp(model_fn, params)
  return vjp(_cast_like(hjv, outputs))[0]


def ggn_quadratic(model_fn: Callable[[Any], Any], loss_fn: LossFn, params,
                  direction) -> jax.Array:
  """``dᵀ G d = (J d)ᵀ ∇²_z ℓ (J d)``: one model JVP, no backward pass."""
  _check_ggn_args(model_fn, loss_fn, 'ggn_quadratic')
  outputs, jd = jax.jvp(model_fn, (params,), (_cast_like(direction, params),))
  return output_quadratic(loss_fn, outputs, jd)
