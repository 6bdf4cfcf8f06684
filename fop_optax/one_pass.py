r"""One-pass optimisation of SGD's learning rate, momentum and weight decay.

Clarke, Oldewage and Hernández-Lobato (ICLR 2022) learn the *weight-update*
hyperparameters ``λ`` of SGD against the **validation** loss, during a single
training run, by implicit differentiation through the update.

SGD as PyTorch writes it, with learning rate ``η``, momentum ``μ`` and weight
decay ``ω``, on training gradients ``∇L_T``:

.. math::
  b_t = μ\,b_{t-1} + ∇L_T(w_t) + ω\,w_t \quad (b_{-1} = 0), \qquad
  u(w_t, λ) = η\,b_t, \qquad w_{t+1} = w_t − u(w_t, λ).

The hyperparameters are learned in unconstrained coordinates
``a = log₁₀ η`` (clipped to ``[log₁₀ η_min, log₁₀ η_max] = [−10, 0]``),
``m = logit μ`` and ``c = log₁₀ ω``. If training converged to a fixed point
``w* = w* − u(w*, λ)``, the implicit function theorem gives

.. math::
  \frac{dL_V(w^*)}{dλ} = −∇L_V^⊤ \Big(\frac{∂u}{∂w}\Big)^{-1} \frac{∂u}{∂λ},
  \qquad J = \frac{∂u}{∂w} = \operatorname{diag}(η)\,(H_T + ω I)

(``b_{t-1}`` held fixed; ``H_T`` the training loss's Hessian on the step's
batch). The inverse is replaced by ``K`` terms of its Neumann series,
``p = Σ_{j<K} v (I − J)^j`` with ``v = ∇L_V(w_{t+1})`` on a validation batch,
which needs ``K − 1`` Hessian-vector products, and the hypergradient is
``−p^⊤ ∂u/∂λ`` in closed form (``⊙`` elementwise, sums over all parameters
for a scalar hyperparameter):

.. math::
  h_a = −\ln 10\; η ⊙ b_t ⊙ p, \qquad
  h_m = −μ(1 − μ)\; η ⊙ b_{t-1} ⊙ p, \qquad
  h_c = −\ln 10\; ω\; η ⊙ w_t ⊙ p.

Every ``period`` steps (the last step of each period) this hypergradient is
computed and the raw hyperparameters take one step of the hyper-optimiser
(``optax.adam(0.05)`` by default, the paper's). The other steps are plain SGD
with the current values, so the cost is about ``period + 1 + 2(K − 1)``
gradient evaluations per ``period`` steps: about twice plain SGD with the
defaults ``period=10, K=5``.

The period's hyper step runs under ``lax.cond`` so that one compiled step
serves every call. Under ``jax.vmap`` with a *batched* ``count`` the ``cond``
becomes a ``select`` and the hyper step's work is done on every step; vmap
with the state's ``count`` unbatched (``in_axes=None`` for it) to keep the
``cond`` (see ``examples/one_pass_study.py``).

References:
  Clarke, Oldewage, Hernández-Lobato, `Scalable One-Pass Optimisation of
  High-Dimensional Weight-Update Hyperparameters by Implicit Differentiation
  <https://arxiv.org/abs/2110.10461>`_, ICLR 2022.

  Lorraine, Vicol, Duvenaud, `Optimizing Millions of Hyperparameters by
  Implicit Differentiation <https://arxiv.org/abs/1911.02590>`_, AISTATS 2020.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fop_optax import _checks
from fop_optax import curvature
from fop_optax.nonfinite import _all_finite as all_finite
from fop_optax import structures as structures_lib

__all__ = ['HYPERPARAMETERS', 'OnePassHPOState', 'OnePassInjectedState', 'one_pass_hpo',
           'one_pass_hpo_injected']

_NAME = 'one_pass_hpo'
#: The hyperparameters :func:`one_pass_hpo` can learn, in natural units.
HYPERPARAMETERS = ('learning_rate', 'momentum', 'weight_decay')
_LN10 = math.log(10.0)


class OnePassHPOState(NamedTuple):
  """State of :func:`one_pass_hpo`.

  Attributes:
    count: calls to ``update`` so far, skipped steps included (int32
      scalar); the hyper step runs when ``count % period == period - 1``.
    hyperparams: the values the next step uses, in natural units:
      ``{'learning_rate', 'momentum', 'weight_decay'}``, each a scalar or,
      if per-parameter, shaped like the parameters. The learned ones are
      recomputed from ``raw_hyperparams`` at every hyper step; the others can
      be edited here (as with ``optax.inject_hyperparams``).
    raw_hyperparams: the learned hyperparameters in the hyper-optimiser's
      coordinates: ``'learning_rate'`` holds ``log₁₀ η``, ``'momentum'``
      ``logit μ``, ``'weight_decay'`` ``log₁₀ ω``.
    momentum: the momentum buffer ``b_{t-1}`` (shaped like the parameters).
    hyper_state: the hyper-optimiser's state.
    hypergradient: the latest hypergradient ``dL_V/d raw`` (zeros before the
      first hyper step), shaped like ``raw_hyperparams``.
    skipped_steps: steps skipped because the gradients or the update were
      not finite (the update is then zero and the state is kept).
    skipped_hypersteps: hyper steps skipped because the hypergradient was not
      finite (the weight step still happens).
  """

  count: jax.Array
  hyperparams: dict[str, Any]
  raw_hyperparams: dict[str, Any]
  momentum: optax.Updates
  hyper_state: optax.OptState
  hypergradient: dict[str, Any]
  skipped_steps: jax.Array
  skipped_hypersteps: jax.Array


# ----------------------------------------------------------------------------- helpers

_USAGE = ('value_fn(params) -> the training loss on the batch of `grads` (for Hessian-vector '
          'products) and validation_value_fn(params) -> a validation batch loss, as in '
          'tx.update(grads, state, params, value_fn=..., validation_value_fn=...)')


def _renamed_closures(extra_args, name: str = _NAME) -> None:
  """A clear error for the closures' names before 0.2 (they would be ignored as extra args)."""
  old = [n for n in ('train_loss_fn', 'val_loss_fn') if n in extra_args]
  if old:
    raise TypeError(
        f'{name}: {" and ".join(old)} were renamed in 0.2 to optax\'s convention: pass '
        'value_fn= (the training loss on the batch of `grads`) and validation_value_fn= (a '
        'validation batch loss); see CHANGELOG.md')


def _times(h, tree):
  """A hyperparameter (scalar or params-shaped) times a params-shaped tree."""
  if isinstance(h, (jax.Array, np.ndarray, numbers.Number)) and jnp.ndim(h) == 0:
    return jax.tree.map(lambda x: h * x, tree)
  return jax.tree.map(lambda a, x: a * x, h, tree)


def _tmap(f, h):
  """``f`` applied to a hyperparameter, scalar or params-shaped."""
  return jax.tree.map(f, h)


def _natural(name: str, raw):
  if name == 'momentum':
    return jax.tree.map(jax.nn.sigmoid, raw)
  return jax.tree.map(lambda r: jnp.power(jnp.asarray(10.0, r.dtype), r), raw)


def _to_raw(name: str, value):
  if name == 'momentum':
    return jnp.log(value) - jnp.log1p(-value)
  return jnp.log10(value)


def _concrete_float(value) -> Optional[float]:
  array = _checks._concrete(value)  # pylint: disable=protected-access
  if array is None or array.ndim != 0:
    return None
  return float(array)


def one_pass_hpo(
    learning_rate: Any,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    *,
    learn: Sequence[str] = HYPERPARAMETERS,
    per_parameter: Sequence[str] = (),
    period: int = 10,
    neumann_terms: int = 5,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    hyper_learning_rate: float = 0.05,
    learning_rate_bounds: tuple[float, float] = (1e-10, 1.0),
) -> optax.GradientTransformationExtraArgs:
  r"""SGD whose learning rate, momentum and weight decay learn from the validation loss.

  The update is PyTorch's SGD (``b ← μ b + g + ω w``, ``w ← w − η b``; the
  weight decay applies to every leaf and only inside the update). Every
  ``period`` steps, on the last step of the period, the hyperparameters in
  ``learn`` take one step of ``hyper_optimizer`` along the implicit
  hypergradient of the validation loss at the new weights (Clarke et al.,
  2022; the maths is in :mod:`fop_optax.one_pass`).

  ``update`` needs two closures as keyword arguments, like optax's line
  search needs ``value_fn``::

    updates, state = tx.update(
        grads, state, params,
        value_fn=lambda p: loss(p, x_batch, y_batch),   # the batch of `grads`
        validation_value_fn=lambda p: loss(p, x_val, y_val))         # a validation batch
    params = optax.apply_updates(params, updates)

  ``value_fn`` must be the loss whose gradient ``grads`` is, *without*
  weight decay (it is added here); it gives the Hessian-vector products.
  ``validation_value_fn`` is called at ``params + updates``. Both are only evaluated
  on the hyper steps (inside ``lax.cond``), but must be given on every call.

  Args:
    learning_rate: initial ``η`` (a number in ``learning_rate_bounds``).
    momentum: initial ``μ`` in ``[0, 1)`` (``(0, 1)`` if learned). The paper
      keeps hyperparameters it does not learn at their initial values.
    weight_decay: initial ``ω >= 0``. ``0`` (the default) switches weight
      decay off *and keeps it off*: ``ω`` is learned as ``log₁₀ ω``, where 0
      is out of reach, so ``'weight_decay'`` in ``learn`` is then ignored.
      Start from a small positive value to learn it (the paper draws
      ``log₁₀ ω ~ U(−7, −2)``).
    learn: which of ``'learning_rate'``, ``'momentum'``, ``'weight_decay'``
      are learned; ``()`` is plain SGD with fixed values.
    per_parameter: which learned hyperparameters have one value per
      parameter element instead of one scalar (the paper's
      "high-dimensional" variant learns ``('learning_rate',)``).
    period: ``T``: one hyper step every ``T`` steps (the paper's 10).
    neumann_terms: ``K``: terms of the Neumann series (the paper's 5);
      ``K = 1`` ignores the curvature (``p = v``).
    hyper_optimizer: the optax transformation applied to the raw
      hyperparameters' gradients; default ``optax.adam(hyper_learning_rate)``.
    hyper_learning_rate: the default hyper-optimiser's learning rate (the
      paper's 0.05).
    learning_rate_bounds: ``η`` is clipped to this range after each hyper
      step (``log₁₀ η ∈ [−10, 0]`` in the paper).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`OnePassHPOState`. Its updates are the final ones (``−η b``), to
    add to the parameters with ``optax.apply_updates``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(x): return jnp.sum(jnp.array([1., 10.]) * x ** 2)          # training loss
    >>> def f_val(x): return jnp.sum(jnp.array([1., 10.]) * (x - 0.1) ** 2)  # validation
    >>> tx = fop_optax.one_pass_hpo(learning_rate=0.02, momentum=0.5)
    >>> params = jnp.array([1., 2.])
    >>> state = tx.init(params)
    >>> for _ in range(20):
    ...   grad = jax.grad(f)(params)
    ...   updates, state = tx.update(grad, state, params, value_fn=f, validation_value_fn=f_val)
    ...   params = optax.apply_updates(params, updates)
    >>> print('f: {:.2E}'.format(f(params)))
    f: 2.24E-02
    >>> print({k: round(float(v), 3) for k, v in state.hyperparams.items()})
    {'learning_rate': 0.024, 'momentum': 0.521, 'weight_decay': 0.0}

  Raises:
    ValueError: bad hyperparameter values or names.
    TypeError: at ``update``, a missing closure or ``params``; at ``init``,
      non-floating-point parameters.

  References:
    Clarke, Oldewage, Hernández-Lobato, `Scalable One-Pass Optimisation of
    High-Dimensional Weight-Update Hyperparameters by Implicit
    Differentiation <https://arxiv.org/abs/2110.10461>`_, ICLR 2022.
  """
  if isinstance(learn, str) or isinstance(per_parameter, str):
    raise TypeError(f'{_NAME}: learn and per_parameter must be sequences of names, e.g. '
                    "('learning_rate',), not a string")
  learn, per_parameter = tuple(learn), tuple(per_parameter)
  for arg, names in (('learn', learn), ('per_parameter', per_parameter)):
    unknown = [n for n in names if n not in HYPERPARAMETERS]
    if unknown:
      raise ValueError(f'{_NAME}: {arg} has unknown names {unknown}; expected a subset of '
                       f'{HYPERPARAMETERS}')
  not_learned = [n for n in per_parameter if n not in learn]
  if not_learned:
    raise ValueError(f'{_NAME}: per_parameter names {not_learned} are not in learn={learn}; '
                     'only learned hyperparameters can be per-parameter')
  for name, value in (('period', period), ('neumann_terms', neumann_terms)):
    _checks.check_int(name, value, where=_NAME)
  for name, value in (('learning_rate', learning_rate), ('momentum', momentum),
                      ('weight_decay', weight_decay)):
    if callable(value):
      raise TypeError(f'{_NAME}: {name} must be a number (it is learned or kept fixed), '
                      'not a schedule')
    if jnp.ndim(value) != 0:
      raise ValueError(f'{_NAME}: {name} must be a scalar, got shape {jnp.shape(value)}')
  _checks.check_number('learning_rate', learning_rate, allow_zero=False, where=_NAME)
  _checks.check_number('weight_decay', weight_decay, allow_zero=True, where=_NAME)
  _checks.check_number('momentum', momentum, allow_zero=True, where=_NAME)
  _checks.check_number('hyper_learning_rate', hyper_learning_rate, allow_zero=True, where=_NAME)
  lo, hi = learning_rate_bounds
  if not (isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real) and 0 < lo <= hi):
    raise ValueError(f'{_NAME}: learning_rate_bounds must be two numbers 0 < low <= high, '
                     f'got {learning_rate_bounds}')
  lr0, mu0, wd0 = (_concrete_float(v) for v in (learning_rate, momentum, weight_decay))
  if lr0 is not None and not lo <= lr0 <= hi:
    raise ValueError(f'{_NAME}: learning_rate={lr0} is outside learning_rate_bounds={learning_rate_bounds}')
  if mu0 is not None:
    if 'momentum' in learn and not 0 < mu0 < 1:
      raise ValueError(f'{_NAME}: a learned momentum must start in (0, 1) (it is learned as '
                       f'logit μ), got {mu0}')
    if mu0 >= 1:
      raise ValueError(f'{_NAME}: momentum must be < 1, got {mu0}')
  if wd0 is not None and wd0 == 0:
    learn = tuple(n for n in learn if n != 'weight_decay')
    per_parameter = tuple(n for n in per_parameter if n != 'weight_decay')
  if hyper_optimizer is None:
    hyper_optimizer = optax.adam(hyper_learning_rate)
  hyper_optimizer = optax.with_extra_args_support(hyper_optimizer)
  log_lo, log_hi = math.log10(lo), math.log10(hi)
  initial = {'learning_rate': learning_rate, 'momentum': momentum, 'weight_decay': weight_decay}

  def init_fn(params):
    def check(path, p):
      structures_lib.check_leaf_dtype(path, p, what=_NAME)
    jax.tree_util.tree_map_with_path(check, params)
    dtype = jnp.float32
    for p in jax.tree.leaves(params):
      dtype = jnp.promote_types(dtype, p.dtype)
    hyperparams, raw = {}, {}
    for name in HYPERPARAMETERS:
      value = jnp.asarray(initial[name], dtype)
      if name in per_parameter:
        value = jax.tree.map(lambda p, v=value: jnp.full(p.shape, v, dtype), params)
      hyperparams[name] = value
      if name in learn:
        raw[name] = jax.tree.map(lambda v, n=name: _to_raw(n, v), value)
    return OnePassHPOState(
        count=jnp.zeros([], jnp.int32),
        hyperparams=hyperparams,
        raw_hyperparams=raw,
        momentum=optax.tree.zeros_like(params),
        hyper_state=hyper_optimizer.init(raw),
        hypergradient=optax.tree.zeros_like(raw),
        skipped_steps=jnp.zeros([], jnp.int32),
        skipped_hypersteps=jnp.zeros([], jnp.int32),
    )

  def hypergradient(state, params, b_prev, b, updates, value_fn, validation_value_fn):
    """``dL_V/d raw`` for the learned hyperparameters (the paper's estimate)."""
    hp = state.hyperparams
    eta, mu, wd = hp['learning_rate'], hp['momentum'], hp['weight_decay']
    cdtype = jax.tree.leaves(eta)[0].dtype
    up = lambda t: jax.tree.map(lambda x: x.astype(cdtype), t)
    down = lambda t, like: jax.tree.map(lambda x, p: x.astype(p.dtype), t, like)
    new_params = optax.apply_updates(params, updates)
    v = up(jax.grad(validation_value_fn)(new_params))
    _, hvp = curvature.hvp_fn(value_fn, params, mode='reverse')

    def vjp_update(x):  # xᵀ ∂u/∂w = H (η ⊙ x) + ω η ⊙ x
      s = _times(eta, x)
      return optax.tree.add(up(hvp(down(s, params))), _times(wd, s))

    def body(_, carry):
      term, p = carry
      term = optax.tree.sub(term, vjp_update(term))
      return term, optax.tree.add(p, term)

    _, p = jax.lax.fori_loop(0, neumann_terms - 1, body, (v, v))
    eta_p = _times(eta, p)
    # −pᵀ ∂u/∂raw, elementwise before the sum over a scalar's parameters.
    partials = {
        'learning_rate': lambda: _times(-_LN10, optax.tree.mul(eta_p, b)),
        'momentum': lambda: _times(_tmap(lambda m: -m * (1 - m), mu),
                                   optax.tree.mul(eta_p, b_prev)),
        'weight_decay': lambda: _times(_tmap(lambda o: -_LN10 * o, wd),
                                       optax.tree.mul(eta_p, up(params))),
    }
    grads = {}
    for name in learn:
      raw = state.raw_hyperparams[name]
      value = partials[name]()
      if name in per_parameter:
        grads[name] = jax.tree.map(lambda x, r: x.astype(r.dtype), value, raw)
      else:
        grads[name] = optax.tree.sum(value).astype(raw.dtype)
    return grads

  def update_fn(updates, state, params=None, *, value_fn=None, validation_value_fn=None,
                **extra_args):
    if params is None:
      raise TypeError(f'{_NAME}: update needs params (the current weights: the step uses '
                      'them for weight decay and the hypergradient)')
    _renamed_closures(extra_args)
    _checks.require_closures(_NAME, {'value_fn': value_fn,
                                     'validation_value_fn': validation_value_fn}, _USAGE)
    hp = state.hyperparams
    eta, mu, wd = hp['learning_rate'], hp['momentum'], hp['weight_decay']
    cdtype = jax.tree.leaves(eta)[0].dtype
    up = lambda t: jax.tree.map(lambda x: jnp.asarray(x).astype(cdtype), t)
    g = optax.tree.add(up(updates), _times(wd, up(params)))
    b_prev = up(state.momentum)
    b = optax.tree.add(_times(mu, b_prev), g)
    new_updates = jax.tree.map(lambda u, p: (-u).astype(p.dtype), _times(eta, b), params)
    finite = all_finite(updates) & all_finite(new_updates)
    is_hyper = (state.count % period) == (period - 1)

    def natural(raw):
      hyperparams = dict(hp)
      for name, value in raw.items():
        hyperparams[name] = jax.tree.map(lambda x, old: _natural(name, x).astype(old.dtype),
                                         value, hp[name])
      return hyperparams

    def hyper_step(_):
      h = hypergradient(state, params, b_prev, b, new_updates, value_fn, validation_value_fn)
      steps, hyper_state = hyper_optimizer.update(h, state.hyper_state, state.raw_hyperparams)
      raw = optax.apply_updates(state.raw_hyperparams, steps)
      if 'learning_rate' in raw:
        raw['learning_rate'] = jax.tree.map(lambda a: jnp.clip(a, log_lo, log_hi),
                                            raw['learning_rate'])
      raw = jax.tree.map(lambda new, old: new.astype(old.dtype), raw, state.raw_hyperparams)
      hyper_ok = all_finite(h) & all_finite(raw) & all_finite(hyper_state)
      ok = hyper_ok & finite  # a skipped weight step skips its hyper step too
      keep = lambda new, old: optax.tree.where(ok, new, old)
      h = optax.tree.where(ok, h, optax.tree.where(finite, optax.tree.zeros_like(h),
                                                   state.hypergradient))
      return (keep(natural(raw), hp), keep(raw, state.raw_hyperparams),
              keep(hyper_state, state.hyper_state), h,
              (finite & jnp.logical_not(hyper_ok)).astype(jnp.int32))

    def no_hyper_step(_):
      return (hp, state.raw_hyperparams, state.hyper_state, state.hypergradient,
              jnp.zeros([], jnp.int32))

    # The predicate depends on the count alone, so that under jax.vmap with an
    # unbatched count this stays a cond (a batched predicate becomes a select).
    # Only the hyper step touches the hyperparameters' state.
    if learn:
      hyperparams, raw, hyper_state, h, hyper_skipped = jax.lax.cond(
          is_hyper, hyper_step, no_hyper_step, None)
    else:  # plain SGD: nothing to differentiate, no closure is called
      hyperparams, raw, hyper_state, h, hyper_skipped = no_hyper_step(None)
    # A skipped step (non-finite gradients or update) keeps everything but the
    # counters. `count` counts calls, skipped ones too, so that it never
    # depends on the data (under jax.vmap an unbatched count keeps the cond).
    momentum = jax.tree.map(lambda x, m: jnp.where(finite, x.astype(m.dtype), m),
                            b, state.momentum)
    new_state = OnePassHPOState(
        count=state.count + 1,
        hyperparams=hyperparams,
        raw_hyperparams=raw,
        momentum=momentum,
        hyper_state=hyper_state,
        hypergradient=h,
        skipped_steps=state.skipped_steps + jnp.logical_not(finite).astype(jnp.int32),
        skipped_hypersteps=state.skipped_hypersteps + hyper_skipped,
    )
    new_updates = optax.tree.where(finite, new_updates, optax.tree.zeros_like(new_updates))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- any injected optimiser

_TRANSFORMS = ('log10', 'logit', 'identity')
_DEFAULT_TRANSFORM = {'learning_rate': 'log10', 'weight_decay': 'log10', 'eps': 'log10',
                      'momentum': 'logit', 'b1': 'logit', 'b2': 'logit', 'decay': 'logit'}


def _raw_of(transform: str, value):
  if transform == 'log10':
    return jnp.log10(value)
  if transform == 'logit':
    return jnp.log(value) - jnp.log1p(-value)
  return value


def _value_of(transform: str, raw):
  if transform == 'log10':
    return jnp.power(jnp.asarray(10.0, raw.dtype), raw)
  if transform == 'logit':
    return jax.nn.sigmoid(raw)
  return raw


class OnePassInjectedState(NamedTuple):
  """State of :func:`one_pass_hpo_injected`.

  Attributes:
    count: calls to ``update`` so far (int32 scalar).
    inner_state: the wrapped ``optax.inject_hyperparams`` optimiser's state;
      its ``hyperparams`` hold the values in use, in natural units.
    raw_hyperparams: the learned hyperparameters in the hyper-optimiser's
      coordinates (``log₁₀``, ``logit`` or as they are).
    hyper_state: the hyper-optimiser's state.
    hypergradient: the latest ``dL_V/d raw`` (zeros before the first hyper step).
    skipped_steps: steps skipped because the gradients or the update were not finite.
    skipped_hypersteps: hyper steps skipped because the hypergradient was not finite.
  """

  count: jax.Array
  inner_state: Any
  raw_hyperparams: dict[str, jax.Array]
  hyper_state: optax.OptState
  hypergradient: dict[str, jax.Array]
  skipped_steps: jax.Array
  skipped_hypersteps: jax.Array


def one_pass_hpo_injected(
    optimizer: optax.GradientTransformation,
    learn: Any = ('learning_rate',),
    *,
    period: int = 10,
    neumann_terms: int = 5,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    hyper_learning_rate: float = 0.05,
) -> optax.GradientTransformationExtraArgs:
  r"""One-pass hyperparameter learning for any ``optax.inject_hyperparams`` optimiser.

  The generalisation of :func:`one_pass_hpo` (Clarke et al., 2022): the
  optimiser's update ``u(w, λ) = −optimizer.update(∇L_T(w), state, w)`` (its
  state, e.g. Adam's moments, held fixed) is differentiated by ``jax.vjp``
  with respect to the weights (for the Neumann series of ``(∂u/∂w)⁻¹``,
  ``K − 1`` vector-Jacobian products through the gradient, i.e. Hessian-vector
  products) and with respect to the learned hyperparameters, instead of by the
  closed forms of SGD. One hyper step every ``period`` steps, under
  ``lax.cond``; ``update`` takes ``value_fn`` and ``validation_value_fn`` as
  :func:`one_pass_hpo` does.

  Example::

    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-4)
    tx = fop_optax.one_pass_hpo_injected(opt, learn=('learning_rate', 'b1'))

  For SGD, ``optax.inject_hyperparams`` of ``chain(add_decayed_weights(ω),
  sgd(η, μ))`` gives the same hypergradients as :func:`one_pass_hpo`
  (tested); that one is cheaper (closed forms, one HVP per term).

  Args:
    optimizer: the result of ``optax.inject_hyperparams(factory)(...)``; the
      learned hyperparameters must be numbers there, not schedules.
    learn: the names of the hyperparameters to learn, or a dict name ->
      coordinate: ``'log10'`` (positive values; default for
      ``learning_rate``, ``weight_decay``, ``eps``), ``'logit'`` (values in
      (0, 1); default for ``momentum``, ``b1``, ``b2``, ``decay``) or
      ``'identity'`` (default for other names).
    period: one hyper step every ``period`` steps.
    neumann_terms: terms of the Neumann series.
    hyper_optimizer: default ``optax.adam(hyper_learning_rate)``.
    hyper_learning_rate: the default hyper-optimiser's learning rate.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(x): return jnp.sum(jnp.array([1., 10.]) * x ** 2)
    >>> def f_val(x): return jnp.sum(jnp.array([1., 10.]) * (x - 0.1) ** 2)
    >>> inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.02)
    >>> tx = fop_optax.one_pass_hpo_injected(inner)
    >>> params = jnp.array([1., 2.])
    >>> state = tx.init(params)
    >>> for _ in range(20):
    ...   grad = jax.grad(f)(params)
    ...   updates, state = tx.update(grad, state, params, value_fn=f, validation_value_fn=f_val)
    ...   params = optax.apply_updates(params, updates)
    >>> print('{:.3f}'.format(state.inner_state.hyperparams['learning_rate']))
    0.025

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`OnePassInjectedState`.
  """
  name = 'one_pass_hpo_injected'
  if isinstance(learn, str):
    raise TypeError(f"{name}: learn must be a sequence of names or a dict, e.g. ('learning_rate',)")
  if not isinstance(learn, dict):
    learn = {n: _DEFAULT_TRANSFORM.get(n, 'identity') for n in learn}
  if not learn:
    raise ValueError(f'{name}: learn is empty; nothing to learn')
  bad = {n: t for n, t in learn.items() if t not in _TRANSFORMS}
  if bad:
    raise ValueError(f'{name}: unknown coordinates {bad}; expected one of {_TRANSFORMS}')
  for arg, value in (('period', period), ('neumann_terms', neumann_terms)):
    _checks.check_int(arg, value, where=name)
  _checks.check_number('hyper_learning_rate', hyper_learning_rate, allow_zero=True, where=name)
  if hyper_optimizer is None:
    hyper_optimizer = optax.adam(hyper_learning_rate)
  hyper_optimizer = optax.with_extra_args_support(hyper_optimizer)
  inner = optax.with_extra_args_support(optimizer)

  def with_raw(inner_state, raw):
    hyperparams = dict(inner_state.hyperparams)
    for n, r in raw.items():
      hyperparams[n] = _value_of(learn[n], r).astype(jnp.asarray(hyperparams[n]).dtype)
    return inner_state._replace(hyperparams=hyperparams)

  def init_fn(params):
    inner_state = inner.init(params)
    hyperparams = getattr(inner_state, 'hyperparams', None)
    if not isinstance(hyperparams, dict):
      raise TypeError(f'{name}: optimizer must come from optax.inject_hyperparams (its state '
                      f'has a hyperparams dict); got state {type(inner_state).__name__}')
    missing = [n for n in learn if n not in hyperparams]
    if missing:
      raise ValueError(f'{name}: {missing} are not hyperparameters of the optimizer; it has '
                       f'{sorted(hyperparams)}')
    scheduled = [n for n in learn if n in getattr(inner_state, 'hyperparams_states', {})]
    if scheduled:
      raise ValueError(f'{name}: {scheduled} are schedules; a learned hyperparameter must be '
                       'given as a number')
    raw = {}
    for n, t in learn.items():
      value = jnp.asarray(hyperparams[n])
      if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f'{name}: hyperparameter {n!r} is not floating point ({value.dtype})')
      raw[n] = _raw_of(t, value)
    return OnePassInjectedState(
        count=jnp.zeros([], jnp.int32), inner_state=inner_state, raw_hyperparams=raw,
        hyper_state=hyper_optimizer.init(raw), hypergradient=optax.tree.zeros_like(raw),
        skipped_steps=jnp.zeros([], jnp.int32), skipped_hypersteps=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, value_fn=None, validation_value_fn=None,
                **extra_args):
    if params is None:
      raise TypeError(f'{name}: update needs params (the current weights)')
    _renamed_closures(extra_args, name)
    _checks.require_closures(name, {'value_fn': value_fn,
                                    'validation_value_fn': validation_value_fn}, _USAGE)
    new_updates, new_inner = inner.update(updates, state.inner_state, params)
    finite = all_finite(updates) & all_finite(new_updates)
    is_hyper = (state.count % period) == (period - 1)

    def hyper_step(_):
      def u(w, raw):  # u = w_t − w_{t+1}, the optimizer's state held fixed
        g = jax.grad(value_fn)(w)
        step, _ = inner.update(g, with_raw(state.inner_state, raw), w)
        return jax.tree.map(jnp.negative, step)

      new_params = optax.apply_updates(params, new_updates)
      v = jax.tree.map(lambda x, p: x.astype(p.dtype), jax.grad(validation_value_fn)(new_params), params)
      _, vjp = jax.vjp(u, params, state.raw_hyperparams)

      def body(_, carry):
        term, p = carry
        term = optax.tree.sub(term, vjp(term)[0])
        return term, optax.tree.add(p, term)

      _, p = jax.lax.fori_loop(0, neumann_terms - 1, body, (v, v))
      h = jax.tree.map(jnp.negative, vjp(p)[1])
      steps, hyper_state = hyper_optimizer.update(h, state.hyper_state, state.raw_hyperparams)
      raw = optax.apply_updates(state.raw_hyperparams, steps)
      raw = jax.tree.map(lambda a, b: a.astype(b.dtype), raw, state.raw_hyperparams)
      hyper_ok = all_finite(h) & all_finite(raw) & all_finite(hyper_state)
      ok = hyper_ok & finite
      keep = lambda new, old: optax.tree.where(ok, new, old)
      h = optax.tree.where(ok, h, optax.tree.where(finite, optax.tree.zeros_like(h),
                                                   state.hypergradient))
      return (keep(raw, state.raw_hyperparams), keep(hyper_state, state.hyper_state), h,
              (finite & jnp.logical_not(hyper_ok)).astype(jnp.int32))

    def no_hyper_step(_):
      return (state.raw_hyperparams, state.hyper_state, state.hypergradient,
              jnp.zeros([], jnp.int32))

    raw, hyper_state, h, hyper_skipped = jax.lax.cond(is_hyper, hyper_step, no_hyper_step, None)
    new_inner = optax.tree.where(finite, with_raw(new_inner, raw), state.inner_state)
    new_state = OnePassInjectedState(
        count=state.count + 1, inner_state=new_inner, raw_hyperparams=raw,
        hyper_state=hyper_state, hypergradient=h,
        skipped_steps=state.skipped_steps + jnp.logical_not(finite).astype(jnp.int32),
        skipped_hypersteps=state.skipped_hypersteps + hyper_skipped)
    new_updates = optax.tree.where(finite, new_updates, optax.tree.zeros_like(new_updates))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
