r"""The online hypergradient step, written once.

An online-hypergradient optimiser keeps parameters ``w`` of its update rule
(FOP's matrices ``M``, a learned preconditioner's ``w``, a step size ``α``) and
the previous input ``u_{t-1}`` of that rule. Since the step taken at ``t-1``
was ``θ_t = θ_{t-1} − η·P(w_{t-1})·u_{t-1}``, the gradient ``g_t`` the
optimiser receives at ``t`` already gives the one-step hypergradient

.. math::
  \frac{∂J(θ_t)}{∂w_{t-1}} = −η\,
  \Big(\frac{∂\,P(w_{t-1})\,u_{t-1}}{∂w}\Big)^{⊤} g_t

(Almeida et al., 1998; Baydin et al., 2018), with no extra forward or backward
pass. :func:`online_step` is one such step, shared by every instance:

1. the learn/keep gate (:func:`learn_now`): the first call has no previous
   step to learn from and leaves ``w`` and the hyper-optimiser's state
   untouched; with ``every = k`` only calls ``k, 2k, ...`` learn;
2. on a learning call: the one-step hypergradient (a pluggable
   ``hypergradient(w, last_input, gradient)``: FOP's closed form per structure,
   or :func:`vjp_hypergradient`, one ``jax.vjp`` of ``apply_fn``), the hyper
   step (a pluggable ``hyper_step(hypergrads, hyper_state, w)``:
   :func:`optax_hyper_step` for an optax hyper-optimiser, with an optional
   calibration of its step, e.g. FOP's per-leaf ``hyper_step_scale``), then
   the output, either ``apply(new_w, inputs)`` or, with a guard,
   ``project_and_apply(new_w, inputs)``: the projection of ``w`` after the
   hyper step and the preconditioning by the projected ``w`` in one function,
   so that they can share work (FOP's ``clip_and_precondition``);
3. on a keeping call: ``apply(w, inputs)`` only.

The gate is a ``jax.lax.cond``: a keeping call does none of the learning
call's work (under ``jax.vmap`` both branches run). The instance keeps its own
state ``NamedTuple`` (checkpoints stay compatible), stores ``inputs`` as the
next call's ``last_input`` and increments its count.

Instances:

* :func:`fop_optax.scale_by_fop`: ``w`` = the ``M`` s, ``hypergradient`` =
  each structure's closed form, ``hyper_step`` = the hyper-optimiser with the
  per-leaf calibration of the default Adam, ``project_and_apply`` = the guard
  (``Structure.clip_and_precondition``), ``every`` = ``update_every``.
* :func:`fop_optax.scale_by_learned_preconditioner` (and LODO through it):
  ``hypergradient`` = :func:`vjp_hypergradient` of ``apply_fn``, no projection.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ['online_step', 'learn_now', 'vjp_hypergradient', 'optax_hyper_step']

#: ``(w, last_input, gradient) -> hypergrads``: ``∂J(θ_t)/∂w_{t-1}`` (or whatever signal
#: ``hyper_step`` consumes), from the stored ``w_{t-1}``, ``u_{t-1}`` and the new ``g_t``.
HypergradientFn = Callable[[Any, Any, Any], Any]
#: ``(hypergrads, hyper_state, w) -> (new_w, new_hyper_state)``.
HyperStepFn = Callable[[Any, Any, Any], tuple[Any, Any]]
#: ``(w, inputs) -> outputs``.
ApplyFn = Callable[[Any, Any], Any]
#: ``(w, inputs) -> (projected w, outputs with the projected w)``.
ProjectAndApplyFn = Callable[[Any, Any], tuple[Any, Any]]


def learn_now(count: jax.Array, every: int = 1) -> jax.Array:
  """Whether the call with this ``count`` (calls made before it) learns.

  Never the first (``count == 0``: no previous step); with ``every = k`` only
  calls ``k, 2k, ...``.
  """
  learn = count > 0
  if every > 1:
    learn = learn & (count % every == 0)
  return learn


def vjp_hypergradient(apply_fn: ApplyFn, learning_rate: jax.Array, *,
                      check_output: Optional[Callable[[Any, Any], None]] = None
                      ) -> HypergradientFn:
  r"""The one-step hypergradient of any differentiable ``apply_fn`` by one ``jax.vjp``.

  Returns ``hypergradient(w, last_input, gradient) = (∂ apply_fn(w, last_input)/∂w)ᵀ
  (−η·gradient)``, cast to ``w``'s dtypes. The cotangent is formed in at least
  float32 and cast to ``apply_fn``'s output dtypes. ``check_output(out, like)``,
  if given, checks ``apply_fn(w, last_input)`` against ``last_input``.
  """
  def hypergradient(w, last_input, gradient):
    out_prev, vjp = jax.vjp(lambda w: apply_fn(w, last_input), w)
    if check_output is not None:
      check_output(out_prev, last_input)
    cotangent = jax.tree.map(
        lambda g, o: (-learning_rate * g.astype(jnp.promote_types(g.dtype, jnp.float32))
                      ).astype(o.dtype),
        gradient, out_prev)
    (hypergrads,) = vjp(cotangent)
    return optax.tree.cast_like(hypergrads, w)

  return hypergradient


def optax_hyper_step(hyper_optimizer: optax.GradientTransformation,
                     calibrate: Optional[Callable[[Any], Any]] = None) -> HyperStepFn:
  """The hyper step of an optax hyper-optimiser: ``w ← w + calibrate(update(hypergrads))``.

  ``hyper_optimizer`` sees the hypergradients as gradients and ``w`` as its
  params; ``calibrate`` (default: none) rescales its updates before they are
  applied (FOP: ``Structure.hyper_step_scale`` per leaf). ``w`` keeps its dtypes.
  """
  def hyper_step(hypergrads, hyper_state, w):
    hyper_updates, hyper_state = hyper_optimizer.update(hypergrads, hyper_state, w)
    if calibrate is not None:
      hyper_updates = calibrate(hyper_updates)
    return optax.tree.cast_like(optax.apply_updates(w, hyper_updates), w), hyper_state

  return hyper_step


def online_step(
    count: jax.Array,
    w: Any,
    hyper_state: Any,
    last_input: Any,
    gradient: Any,
    inputs: Any,
    *,
    hypergradient: HypergradientFn,
    hyper_step: HyperStepFn,
    apply: ApplyFn,
    project_and_apply: Optional[ProjectAndApplyFn] = None,
    every: int = 1,
) -> tuple[Any, Any, Any]:
  """One online-hypergradient step: learn ``w`` from ``(w, last_input, gradient)`` or keep it.

  Args:
    count: calls made before this one (the instance's state count).
    w: ``w_{t-1}``, the rule's learned parameters (any pytree).
    hyper_state: the hyper step's state.
    last_input: ``u_{t-1}``, the input ``apply`` received on the previous call.
    gradient: ``g_t``, the gradient at the parameters the previous step reached.
    inputs: ``u_t``, this call's input of ``apply``.
    hypergradient: ``(w, last_input, gradient) -> hypergrads``.
    hyper_step: ``(hypergrads, hyper_state, w) -> (new_w, new_hyper_state)``.
    apply: ``(w, inputs) -> outputs``.
    project_and_apply: ``(w, inputs) -> (projected w, outputs)``, run after the
      hyper step instead of ``apply`` (a guard); ``None``: no projection.
    every: learn on every ``every``-th call only (see :func:`learn_now`).

  Returns:
    ``(new_w, new_hyper_state, outputs)``; on a keeping call ``w`` and
    ``hyper_state`` as they came and ``apply(w, inputs)``.
  """
  def learn(operand):
    w, hyper_state = operand
    hypergrads = hypergradient(w, last_input, gradient)
    new_w, hyper_state = hyper_step(hypergrads, hyper_state, w)
    if project_and_apply is None:
      return new_w, hyper_state, apply(new_w, inputs)
    new_w, outputs = project_and_apply(new_w, inputs)
    return new_w, hyper_state, outputs

  def keep(operand):
    w, hyper_state = operand
    return w, hyper_state, apply(w, inputs)

  return jax.lax.cond(learn_now(count, every), learn, keep, (w, hyper_state))
