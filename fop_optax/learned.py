r"""Any differentiable preconditioner, trained online by its one-step hypergradient.

A *learned preconditioner* is a function ``apply_fn(w, u) = P(w)·u`` of its own
parameters ``w`` (any pytree) and a params-shaped input ``u``. The
transformation :func:`scale_by_learned_preconditioner` returns
``P(w_t)·u_t``, where ``u_t = direction(g_t)`` (the raw gradient by default, a
momentum average for LODO), and the step that follows applies the learning
rate ``η``: ``θ_t = θ_{t-1} − η·P(w_{t-1})·u_{t-1}``. The loss at step ``t`` is
then a function of ``w_{t-1}`` with the exact gradient (chain rule)

.. math::
  \frac{∂J(θ_t)}{∂w_{t-1}} = −η\,
  \Big(\frac{∂\,\mathrm{apply}(w_{t-1}, u_{t-1})}{∂w}\Big)^{⊤} g_t ,

one vector–Jacobian product (``jax.vjp``) of ``apply_fn`` at the stored
``(w_{t-1}, u_{t-1})`` with the cotangent ``−η·g_t``. No extra forward or
backward pass of the model is needed: ``g_t`` is the gradient the optimiser
receives anyway (Almeida et al., 1998; Baydin et al., 2018). ``w`` is trained
on it by any optax transformation (the *hyper-optimiser*, Adam by default).

Both this transformation and :func:`fop_optax.scale_by_fop` are instances of
one online step, :func:`fop_optax.online.online_step` (stored previous input,
untouched first step, hyper step, learn-every-``k`` gate, projection after the
hyper step); they differ only in the hypergradient they plug in.

Instances:

* FOP (Moskovitz et al., 2019): ``w`` = one ``M`` per leaf, ``apply_fn`` =
  ``MᵀM·G`` on each leaf's matrix view, ``direction`` = identity. For its
  structures the vector–Jacobian product has a closed form,
  ``−η M(G_t G_{t-1}ᵀ + G_{t-1} G_tᵀ)``; :func:`fop_optax.scale_by_fop` plugs
  that into the same online step, with its guard as the step's projection, and
  ``tests/test_learned.py`` and ``tests/test_online.py`` check that both give
  the same updates and the same learned matrices, with the guard off and on.
* LODO (Liao et al., 2022): ``w`` = the block-diagonal layers of a deep
  linear network ``A``, ``P = Eᵀ AᵀA E``, ``direction`` = an EMA without bias
  correction: :func:`fop_optax.scale_by_lodo`.
* S-HD / PP-HD (Baydin et al., 2018): ``apply_fn(w, u) = w·u`` with a scalar
  or a params-shaped ``w``.

References:
  Moskovitz et al., `First-Order Preconditioning via Hypergradient Descent
  <https://arxiv.org/abs/1910.08461>`_, 2019.

  Liao et al., `Learning to Optimize Quasi-Newton Methods
  <https://arxiv.org/abs/2210.06171>`_, TMLR 2023.

  Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
  <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from fop_optax import _checks
from fop_optax import online
from fop_optax import structures as structures_lib
from fop_optax.transform import _check_tree_matches

__all__ = ['LearnedPreconditionerState', 'scale_by_learned_preconditioner',
           'DEFAULT_HYPER_LEARNING_RATE']

#: Learning rate of the default hyper-optimiser ``optax.adam``.
DEFAULT_HYPER_LEARNING_RATE = 1e-3

_NAME = 'scale_by_learned_preconditioner'


class LearnedPreconditionerState(NamedTuple):
  """State of :func:`scale_by_learned_preconditioner`.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    preconditioner_params: ``w``, the preconditioner's parameters (the tree
      ``init_fn`` returned).
    last_input: ``u_{t-1}``, the preconditioner's previous input
      (params-shaped, in the parameters' dtypes).
    hyper_state: state of the hyper-optimiser that trains ``w``.
    direction_state: state of ``direction``.
  """

  count: jax.Array
  preconditioner_params: Any
  last_input: optax.Updates
  hyper_state: optax.OptState
  direction_state: optax.OptState


def _describe(tree) -> str:
  return str(jax.tree.map(lambda x: f'{jnp.dtype(x.dtype).name}{list(x.shape)}', tree))


def _check_output(name: str, out, like) -> None:
  """Raises if ``apply_fn``'s output is not shaped and typed like its input ``like``."""
  if jax.tree.structure(out) != jax.tree.structure(like):
    raise ValueError(
        f'{name}: apply_fn(w, u) must return a tree shaped like u (the params).\n'
        f'  u:      {jax.tree.structure(like)}\n  output: {jax.tree.structure(out)}')
  for path, o, u in zip(structures_lib.leaf_paths(like), jax.tree.leaves(out),
                        jax.tree.leaves(like)):
    if tuple(o.shape) != tuple(u.shape) or jnp.dtype(o.dtype) != jnp.dtype(u.dtype):
      raise ValueError(
          f'{name}: apply_fn(w, u) returned {jnp.dtype(o.dtype).name}{list(o.shape)} for '
          f'leaf {path} of u, which is {jnp.dtype(u.dtype).name}{list(u.shape)}: the output '
          'must keep every leaf\'s shape and dtype (cast back with .astype(u.dtype))')


def _check_float_tree(name: str, what: str, tree) -> None:
  for path, leaf in zip(structures_lib.leaf_paths(tree), jax.tree.leaves(tree)):
    if not jnp.issubdtype(jnp.dtype(leaf.dtype), jnp.floating):
      raise TypeError(
          f'{name}: {what} leaf {path} has dtype {jnp.dtype(leaf.dtype).name}; the '
          'preconditioner\'s parameters are trained by gradient and must be floating '
          'point (keep fixed integer data such as permutations in apply_fn\'s closure)')


def scale_by_learned_preconditioner(
    apply_fn: Callable[[Any, optax.Updates], optax.Updates],
    init_fn: Callable[[optax.Params], Any],
    learning_rate: optax.ScalarOrSchedule = 1.0,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    direction: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions with a learned ``P(w)``, training ``w`` by its online hypergradient.

  On each call, with the incoming gradient ``g_t`` and the stored
  ``(w_{t-1}, u_{t-1})``:

  1. the hypergradient ``∂J(θ_t)/∂w_{t-1} = −η (∂ apply_fn(w_{t-1},
     u_{t-1})/∂w)ᵀ g_t`` is one ``jax.vjp`` of ``apply_fn`` (η =
     ``learning_rate``, evaluated at the previous step's count);
  2. ``hyper_optimizer`` updates ``w`` with it;
  3. ``u_t = direction(g_t)``; the transformation returns
     ``apply_fn(w_t, u_t)`` and stores ``u_t``.

  On the first call there is no previous step: ``w`` and the
  hyper-optimiser's state are left untouched, so the first update is
  ``P(w_0)·u_1``. Place it before the step that applies the learning rate,
  as for :func:`fop_optax.scale_by_fop`::

    tx = optax.chain(
        fop_optax.scale_by_learned_preconditioner(apply_fn, init_fn, 0.1),
        optax.scale_by_learning_rate(0.1))

  ``apply_fn`` need not be linear in ``u`` nor symmetric positive
  semi-definite; it only has to be differentiable in ``w``. Non-finite
  gradients are not filtered here (wrap in :func:`fop_optax.skip_nonfinite`).

  Args:
    apply_fn: ``(w, u) -> P(w)·u``; ``u`` is a params-shaped tree (the
      direction's output) and the result must have ``u``'s tree, shapes and
      dtypes. Pure and traceable (it runs under ``jax.jit`` and ``jax.vjp``).
    init_fn: ``params -> w``, the preconditioner's initial parameters, a
      pytree of floating-point arrays. It receives the parameters (arrays or
      ``jax.ShapeDtypeStruct``) and must only read their shapes and dtypes.
    learning_rate: ``η`` of the step that follows, a float or an optax
      schedule. With an adaptive hyper-optimiser (Adam) its scale mostly
      cancels; with SGD it sets the hyper step.
    hyper_optimizer: the optax transformation that trains ``w`` (its
      ``params`` are ``w``, its gradients the hypergradients); default
      ``optax.adam(1e-3)``.
    direction: an optax transformation turning ``g_t`` into the
      preconditioner's input ``u_t``; default ``optax.identity()``.
      ``optax.ema(β, debias=False)`` gives LODO's momentum.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> apply_fn = lambda w, u: jax.tree.map(lambda x: w * x, u)   # P(w) = w·I
    >>> init_fn = lambda params: jnp.ones(())
    >>> tx = optax.chain(
    ...     fop_optax.scale_by_learned_preconditioner(apply_fn, init_fn, 0.05, optax.sgd(0.01)),
    ...     optax.sgd(0.05))
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(50):
    ...   params, state = step(params, state)
    >>> print(bool(f(params) < 1e-6), '{:.2f}'.format(state[0].preconditioner_params))
    True 1.01


  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LearnedPreconditionerState`.

  Raises:
    TypeError: ``apply_fn``/``init_fn`` is not callable; a parameter or a
      leaf of ``w`` is not floating point.
    ValueError: ``learning_rate`` is negative, zero or not finite;
      ``apply_fn``'s output does not match its input's shapes and dtypes.
  """
  return _scale_by_learned(apply_fn, init_fn, learning_rate, hyper_optimizer, direction)


def _scale_by_learned(
    apply_fn: Callable[[Any, optax.Updates], optax.Updates],
    init_fn: Callable[[optax.Params], Any],
    learning_rate: optax.ScalarOrSchedule = 1.0,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    direction: Optional[optax.GradientTransformation] = None,
    *,
    project_and_apply: Optional[online.ProjectAndApplyFn] = None,
    update_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_learned_preconditioner` with the online step's other hooks.

  ``project_and_apply(w, u) -> (projected w, P(projected w)·u)`` runs after each
  hyper step in place of ``apply_fn`` (a guard on ``w``, as FOP's); with
  ``update_every = k`` only calls ``k, 2k, ...`` learn (as FOP's). Same state.
  """
  if not callable(apply_fn):
    raise TypeError(f'{_NAME}: apply_fn must be a callable (w, u) -> P(w)·u, got {apply_fn!r}')
  if not callable(init_fn):
    raise TypeError(f'{_NAME}: init_fn must be a callable params -> w, got {init_fn!r}')
  _checks.check_rate('learning_rate', learning_rate, allow_zero=False, where=_NAME)
  if hyper_optimizer is None:
    hyper_optimizer = optax.adam(DEFAULT_HYPER_LEARNING_RATE)
  direction = optax.with_extra_args_support(direction or optax.identity())
  _checks.check_int('update_every', update_every, where=_NAME)

  def init(params):
    def check(path, p):
      structures_lib.check_leaf_dtype(path, p, what=_NAME)
    jax.tree_util.tree_map_with_path(check, params)
    w = init_fn(params)
    _check_float_tree(_NAME, 'init_fn(params)', w)
    # Fail here, with a message, rather than deep inside the first update.
    like = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    _check_output(_NAME, jax.eval_shape(apply_fn, w, like), like)
    return LearnedPreconditionerState(
        count=jnp.zeros([], jnp.int32),
        preconditioner_params=w,
        # Params-shaped, so sharded like the parameters.
        last_input=optax.tree.zeros_like(params),
        hyper_state=hyper_optimizer.init(w),
        direction_state=direction.init(params),
    )

  def update(updates, state, params=None, **extra_args):
    _check_tree_matches(_NAME, updates, state.last_input)
    eta = _checks.previous_step_rate(learning_rate, state.count, _NAME)
    inputs, direction_state = direction.update(
        updates, state.direction_state, params, **extra_args)
    inputs = optax.tree.cast_like(inputs, state.last_input)

    def check_output(out, like):
      _check_output(_NAME, out, like)

    def apply(w, u):
      out = apply_fn(w, u)
      check_output(out, state.last_input)
      return out

    def project_then_apply(w, u):
      w, out = project_and_apply(w, u)
      check_output(out, state.last_input)
      return optax.tree.cast_like(w, state.preconditioner_params), out

    # ∂J(θ_t)/∂w_{t-1} = (∂ apply(w, u_{t-1})/∂w)ᵀ (−η g_t): one VJP. The first
    # call has no previous step to learn from (w and the hyper state are kept).
    new_w, hyper_state, new_updates = online.online_step(
        state.count, state.preconditioner_params, state.hyper_state, state.last_input,
        updates, inputs,
        hypergradient=online.vjp_hypergradient(apply_fn, eta, check_output=check_output),
        hyper_step=online.optax_hyper_step(hyper_optimizer),
        apply=apply, project_and_apply=project_then_apply if project_and_apply else None,
        every=update_every)
    return new_updates, LearnedPreconditionerState(
        count=numerics.safe_increment(state.count),
        preconditioner_params=new_w,
        last_input=inputs,
        hyper_state=hyper_state,
        direction_state=direction_state,
    )

  return optax.GradientTransformationExtraArgs(init, update)
