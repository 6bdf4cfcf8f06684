r"""Hypergradient descent on the step size, with three update rules.

The transformation :func:`scale_by_hypergradient` returns ``α_t·u_t``, where
``u_t`` is an update direction (the gradient, a momentum trace, Adam's
``m̂/(√v̂+ε)``) and the step size ``α`` learns online from the *hypergradient*:
since ``θ_t = θ_{t-1} − α_{t-1}·u_{t-1}``, the loss at ``θ_t`` depends on the
previous step size through

.. math::
  \frac{∂J(θ_t)}{∂α_{t-1}} = −g_t · u_{t-1}, \qquad
  \frac{∂J(θ_t)}{∂\log α_{t-1}} = −α_{t-1}\, g_t · u_{t-1},

so no extra forward or backward pass is needed. Three rules use it:

* ``'additive'`` (Baydin et al., 2018, Algorithms 1-3 and their code):
  ``α_t = α_{t-1} + β·g_t·u_{t-1}``. Exact, but not scale-free: multiplying
  the loss by ``c`` multiplies ``g·u`` by up to ``c²``, so a ``β`` that works
  on one problem makes ``α`` negative (gradient ascent) or divergent on
  another.
* ``'multiplicative'`` (Baydin et al., 2018, Section 5, "multiplicative
  rule"): ``α_t = α_{t-1}·(1 + β·cos(g_t, u_{t-1}))``. Only the angle between
  successive directions matters, so it is invariant to the scale of the loss
  and of the parameters; with ``0 <= β < 1`` the step size stays positive.
* ``'log'`` (log-parametrised step size with clipping, as Clarke et al., 2022
  learn ``log α`` with a normalising hyper-optimiser and clip it to a range):
  ``h_t = α_{t-1}·g_t·u_{t-1}`` (``= −∂J/∂log α``), ``ν_t = ρ·ν_{t-1} +
  (1−ρ)·h_t²`` and

  .. math::
    \log α_t = \operatorname{clip}\Big(\log α_{t-1}
      + β·\operatorname{clip}\big(h_t/\sqrt{ν_t},\,c_-,\,c_+\big),\;
      \log α_0 ± \log r\Big).

  Dividing by the running RMS of ``h`` makes it scale-free (``ν`` is not
  bias-corrected: while it warms up the ratio is large, i.e. clipped). ``α``
  stays within ``[α_0/r, α_0·r]``.

  The clip is strongly asymmetric, ``(c_-, c_+) = (−10, 0.1)`` by default
  (``DEFAULT_STEP_CLIP``): with ``β = 0.05``, ``α`` grows by at most
  ``e^{γ}``, ``γ = β c_+ = 0.005`` (0.5 %), per step, but backs off by up to
  ``e^{β c_-} = e^{−0.5}`` per step, 100 times faster in ``log α``. Why the
  growth cap is what matters: the overshoot only shows in ``h`` once the
  stiff mode (curvature ``λ``, stable for ``α < 2/λ``) oscillates strongly
  enough to outweigh the other modes' positive ``g_t·u_{t-1}``. While ``α``
  climbs at the cap past the edge, ``α_kλ ≈ 2e^{γk}`` after ``k`` steps and
  that mode's error multiplies by ``|1 − α_kλ| ≈ 1 + 2γk`` per step, i.e. by
  ``≈ e^{γk²}`` in all. If it must grow by a factor ``R`` to dominate ``h``,
  the rule notices after ``k ≈ √(\ln R/γ)`` steps, with ``α`` already
  ``e^{√(γ \ln R)}`` times the edge. For ``\ln R ≈ 20`` that is 2.7× the
  edge at ``γ = 0.05`` (``c_+ = 1``) but 1.37× at ``γ = 0.005``. The price is
  time: ``α`` needs ``\ln(α^*/α_0)/γ`` steps to reach a good ``α^*`` from
  below, 461 steps per decade at ``γ = 0.005`` (46 at ``γ = 0.05``); a
  too-small ``α`` only costs time, an overshoot can cost the run. Shrinking
  ``β`` instead would also slow the back-off. Short runs from a too-small
  ``α_0`` pay for it: pass ``step_clip=(−10, 0.3)`` or ``(−10, 1)`` for such
  runs.

``scope`` decides how many step sizes there are: ``'global'`` one for all
parameters (Baydin et al.'s code; the dot products and norms run over the
whole tree), ``'leaf'`` one per leaf (layer-wise, the FOP paper's S-HD),
``'parameter'`` one per parameter (PP-HD; the cosine is then the sign of
``g_i·u_i``).

References:
  Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
  <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.

  Clarke et al., `Scalable One-Pass Optimisation of High-Dimensional
  Weight-Update Hyperparameters by Implicit Differentiation
  <https://arxiv.org/abs/2110.10461>`_, ICLR 2022.

  Almeida et al., Parameter adaptation in stochastic optimization, 1998.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from fop_optax import _checks
from fop_optax import online
from fop_optax import structures as structures_lib
from fop_optax.transform import _check_tree_matches, _matrix_dtype

__all__ = ['HypergradientState', 'scale_by_hypergradient', 'RULES', 'SCOPES',
           'DEFAULT_STEP_CLIP']

RULES = ('additive', 'multiplicative', 'log')
SCOPES = ('global', 'leaf', 'parameter')

#: Default ``β`` of the scale-free rules (``'additive'`` has none: its ``β``
#: depends on the problem's scale).
DEFAULT_HYPER_LEARNING_RATE = {'multiplicative': 0.1, 'log': 0.05}
#: Default ``step_clip`` ``(c_-, c_+)`` of ``rule='log'``: ``α`` backs off by up to
#: ``e^{10β}`` per step and grows by at most ``e^{0.1β}`` (0.5 % at ``β = 0.05``).
DEFAULT_STEP_CLIP = (-10.0, 0.1)

_NAME = 'scale_by_hypergradient'


class HypergradientState(NamedTuple):
  """State of :func:`scale_by_hypergradient`.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    learning_rates: the learned step sizes ``α``: one scalar for
      ``scope='global'``, a tree of scalars (params' structure without Flax
      ``Variable`` wrappers) for ``'leaf'``, a params-shaped tree for
      ``'parameter'``. Float32, or float64 for float64 parameters.
    hypergradient_sq: ``rule='log'``: running mean ``ν`` of the squared
      log-step-size hypergradient, shaped like ``learning_rates``; ``None``
      for the other rules.
    last_direction: the previous update direction ``u_{t-1}`` (params-shaped).
    inner_state: state of the transformation that makes the direction.
  """

  count: jax.Array
  learning_rates: Any
  hypergradient_sq: Any
  last_direction: optax.Updates
  inner_state: optax.OptState


def _resolve_scope(scope: Optional[str], per_parameter: Optional[bool]) -> str:
  if per_parameter is not None and not isinstance(per_parameter, (bool, numbers.Integral)):
    raise TypeError(f'{_NAME}: per_parameter must be a bool, got {per_parameter!r}')
  if scope is None:
    return 'parameter' if per_parameter else 'leaf'
  if scope not in SCOPES:
    raise ValueError(f'{_NAME}: scope must be one of {SCOPES}, got {scope!r}')
  if per_parameter is not None and bool(per_parameter) != (scope == 'parameter'):
    raise ValueError(
        f"{_NAME}: per_parameter={per_parameter} contradicts scope={scope!r} "
        "(per_parameter=True is scope='parameter'; give only scope)")
  return scope


def _resolve_hyper_learning_rate(rule: str, hyper_learning_rate: Any) -> Any:
  if hyper_learning_rate is None:
    if rule == 'additive':
      raise ValueError(
          f"{_NAME}: rule='additive' is not scale-free and has no default "
          'hyper_learning_rate: give one (Baydin et al. used 1e-3 for SGD, 1e-7 for Adam)')
    return DEFAULT_HYPER_LEARNING_RATE[rule]
  return hyper_learning_rate


def scale_by_hypergradient(
    learning_rate: Any,
    hyper_learning_rate: Optional[Any] = None,
    direction: Optional[optax.GradientTransformation] = None,
    *,
    rule: str = 'log',
    scope: Optional[str] = None,
    per_parameter: Optional[bool] = None,
    rate_range: float = 1e6,
    hypergradient_decay: float = 0.99,
    step_clip: Optional[tuple[float, float]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Hypergradient descent on the step size (Baydin et al., 2018).

  ``direction`` turns the gradient ``g_t`` into an update direction ``u_t``
  (the identity for SGD, ``optax.trace`` for momentum,
  ``optax.scale_by_adam()`` for Adam). The transformation returns
  ``α_t·u_t``, where ``α`` follows one of the rules of
  :mod:`fop_optax.hypergradient` (``h`` below is ``g_t·u_{t-1}``, summed over
  the parameters that share a step size):

  * ``'additive'``: ``α_t = α_{t-1} + β·h`` (Baydin et al. exactly);
  * ``'multiplicative'``: ``α_t = α_{t-1}·(1 + β·h/(‖g_t‖·‖u_{t-1}‖))``;
  * ``'log'`` (default): ``log α`` moves by ``β`` times the RMS-normalised
    ``α_{t-1}·h``, clipped to ``step_clip`` (default ``[−10, 0.1]``: back-off
    by up to ``e^{−10β}`` per step, growth by at most ``e^{0.1β}``, 0.5 % at
    the default ``β``; see :mod:`fop_optax.hypergradient` for why the growth
    cap is tight), and stays within ``α_0·[1/r, r]``.

  On the first call there is no previous direction, so ``α_0`` is used as it
  is. Chain with ``optax.scale(-1)`` for descent (the aliases
  :func:`fop_optax.sgd_hd` and :func:`fop_optax.adam_hd` do).

  Args:
    learning_rate: the initial step size ``α_0`` (a positive number or a
      scalar array; not a schedule: the step size is what is learned).
    hyper_learning_rate: ``β``. Required for ``'additive'`` (its scale is the
      problem's); ``None`` takes the scale-free rules' default (see
      ``DEFAULT_HYPER_LEARNING_RATE``). ``'multiplicative'`` needs ``β < 1``.
    direction: the transformation giving ``u``; default ``optax.identity()``.
    rule: ``'additive'``, ``'multiplicative'`` or ``'log'``.
    scope: ``'global'`` (one ``α``), ``'leaf'`` (one per leaf) or
      ``'parameter'`` (one per parameter); default ``'leaf'``, or
      ``'parameter'`` if ``per_parameter=True``.
    per_parameter: older spelling of ``scope='parameter'`` (``False``:
      ``'leaf'``); an error if it contradicts ``scope``.
    rate_range: ``r`` of ``rule='log'``: ``α`` is kept within
      ``[α_0/r, α_0·r]``.
    hypergradient_decay: ``ρ`` of ``rule='log'``, the decay of the running
      mean of the squared hypergradient.
    step_clip: ``(c_-, c_+)`` of ``rule='log'``: the RMS-normalised
      hypergradient is clipped to this interval, so one step multiplies ``α``
      by a factor within ``[e^{β·c_-}, e^{β·c_+}]``. Default
      ``DEFAULT_STEP_CLIP = (−10, 0.1)``; ``(−10, 1)``, the default before
      0.2.0, lets ``α`` grow ten times faster in ``log α``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = optax.chain(fop_optax.scale_by_hypergradient(0.01), optax.scale(-1.0))
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> print('f: {:.2E}'.format(f(params)))
    f: 2.00E+00
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(50):
    ...   params, state = step(params, state)
    >>> print(bool(f(params) < 6e-05))   # down from 2.0 (1.86E-05 on one machine)
    True

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`HypergradientState`.

  References:
    Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
    <https://arxiv.org/abs/1703.04782>`_, ICLR 2018

    Clarke et al., `Scalable One-Pass Optimisation of High-Dimensional
    Weight-Update Hyperparameters by Implicit Differentiation
    <https://arxiv.org/abs/2110.10461>`_, ICLR 2022
  """
  if rule not in RULES:
    raise ValueError(f'{_NAME}: rule must be one of {RULES}, got {rule!r}')
  scope = _resolve_scope(scope, per_parameter)
  if callable(learning_rate):
    raise TypeError(
        f'{_NAME}: hypergradient descent learns the step size itself: pass the '
        'initial step size as a number, not a schedule')
  if jnp.ndim(learning_rate) != 0:
    raise ValueError(f'{_NAME}: learning_rate must be a scalar, got shape {jnp.shape(learning_rate)}')
  _checks.check_number('learning_rate', learning_rate, allow_zero=False, where=_NAME)
  hyper_learning_rate = _resolve_hyper_learning_rate(rule, hyper_learning_rate)
  _checks.check_number('hyper_learning_rate', hyper_learning_rate, allow_zero=True, where=_NAME)
  if rule == 'multiplicative':
    beta = _checks._concrete(hyper_learning_rate)  # pylint: disable=protected-access
    if beta is not None and beta >= 1:
      raise ValueError(
          f"{_NAME}: rule='multiplicative' needs hyper_learning_rate < 1 (else "
          f'α·(1 + β·cos) can reach 0 or below), got {hyper_learning_rate}')
  if step_clip is None:
    step_clip = DEFAULT_STEP_CLIP
  if rule == 'log':
    _checks.check_number('rate_range', rate_range, allow_zero=False, where=_NAME)
    r = _checks._concrete(rate_range)  # pylint: disable=protected-access
    if r is not None and r < 1:
      raise ValueError(f'{_NAME}: rate_range must be >= 1, got {rate_range}')
    if (len(step_clip) != 2 or not all(isinstance(c, numbers.Real) for c in step_clip)
        or not step_clip[0] <= 0 <= step_clip[1]):
      raise ValueError(f'{_NAME}: step_clip must be two numbers (low <= 0 <= high), got {step_clip}')
    rho = _checks._concrete(hypergradient_decay)  # pylint: disable=protected-access
    if rho is not None and not 0 <= rho < 1:
      raise ValueError(f'{_NAME}: hypergradient_decay must be in [0, 1), got {hypergradient_decay}')
  direction = optax.with_extra_args_support(direction or optax.identity())

  def init_fn(params):
    def check(path, p):
      structures_lib.check_leaf_dtype(path, p, what='hypergradient descent')
    jax.tree_util.tree_map_with_path(check, params)
    leaves = jax.tree.leaves(params)
    if scope == 'global':
      dtype = jnp.float32
      for p in leaves:
        dtype = jnp.promote_types(dtype, _matrix_dtype(p.dtype, None))
      rates = jnp.full((), learning_rate, dtype)
    elif scope == 'leaf':
      # Scalars are not params-shaped: drop Variable wrappers.
      rates = structures_lib.unwrapped_treedef(params).unflatten(
          [jnp.full((), learning_rate, _matrix_dtype(p.dtype, None)) for p in leaves])
    else:
      rates = jax.tree.map(
          lambda p: jnp.full(p.shape, learning_rate, _matrix_dtype(p.dtype, None)), params)
    return HypergradientState(
        count=jnp.zeros([], jnp.int32),
        learning_rates=rates,
        hypergradient_sq=optax.tree.zeros_like(rates) if rule == 'log' else None,
        last_direction=optax.tree.zeros_like(params),
        inner_state=direction.init(params),
    )

  def reduce(per_leaf):
    """Per-parameter products -> one value per step size (list aligned with the rates)."""
    if scope == 'parameter':
      return per_leaf
    sums = [jnp.sum(x) for x in per_leaf]
    if scope == 'leaf':
      return sums
    return [sum(sums, jnp.zeros((), sums[0].dtype))] if sums else []

  def signal(rates, last_direction, updates):
    """The rule's input from ``g_t`` and ``u_{t-1}``: ``h = g_t·u_{t-1}`` per step size
    (``−∂J/∂α`` at ``η = 1``), and for the multiplicative rule its cosine."""
    alphas = jax.tree.leaves(rates)
    gs, us = jax.tree.leaves(updates), jax.tree.leaves(last_direction)
    if scope == 'global':
      dtypes = [alphas[0].dtype] * len(gs)
    else:
      dtypes = [a.dtype for a in alphas]
    gs = [g.astype(d) for g, d in zip(gs, dtypes)]
    us = [u.astype(d) for u, d in zip(us, dtypes)]
    h = reduce([g * u for g, u in zip(gs, us)])  # g_t · u_{t-1}
    if rule != 'multiplicative':
      return h
    g_norm = [jnp.sqrt(x) for x in reduce([g * g for g in gs])]
    u_norm = [jnp.sqrt(x) for x in reduce([u * u for u in us])]
    return [jnp.where(gn * un > 0, hi / jnp.where(gn * un > 0, gn * un, 1), 0)
            for hi, gn, un in zip(h, g_norm, u_norm)]

  def rule_step(h, hypergradient_sq, rates):
    """The rule's update of the step sizes (and of the log rule's ``ν``) from the signal."""
    rate_def = jax.tree.structure(rates)
    alphas = jax.tree.leaves(rates)
    if rule == 'additive':
      return rate_def.unflatten([a + hyper_learning_rate * hi for a, hi in zip(alphas, h)]), None
    if rule == 'multiplicative':
      return rate_def.unflatten(
          [a * (1 + hyper_learning_rate * c) for a, c in zip(alphas, h)]), None
    # rule == 'log'
    rho = jnp.asarray(hypergradient_decay, alphas[0].dtype if alphas else jnp.float32)
    nus = jax.tree.leaves(hypergradient_sq)
    out_a, out_nu = [], []
    for a, hi, nu in zip(alphas, h, nus):
      hl = a * hi  # −∂J/∂log α
      nu = rho * nu + (1 - rho) * hl * hl
      rms = jnp.sqrt(nu)
      step = jnp.clip(jnp.where(rms > 0, hl / jnp.where(rms > 0, rms, 1), 0), *step_clip)
      log_a0 = jnp.log(jnp.asarray(learning_rate, a.dtype))
      log_r = jnp.log(jnp.asarray(rate_range, a.dtype))
      log_a = jnp.clip(jnp.log(a) + hyper_learning_rate * step, log_a0 - log_r, log_a0 + log_r)
      out_a.append(jnp.exp(log_a).astype(a.dtype))
      out_nu.append(nu.astype(a.dtype))
    return rate_def.unflatten(out_a), rate_def.unflatten(out_nu)

  def apply(rates, directions):
    """``α·u``: each leaf's direction times its step size(s)."""
    dir_leaves = jax.tree.leaves(directions)
    alpha_leaves = jax.tree.leaves(rates)
    if scope == 'global':
      alpha_leaves = alpha_leaves * len(dir_leaves)
    return jax.tree.structure(directions).unflatten([
        (a * u.astype(a.dtype)).astype(u.dtype) for a, u in zip(alpha_leaves, dir_leaves)])

  def update_fn(updates, state, params=None, **extra_args):
    _check_tree_matches(_NAME, updates, state.last_direction)
    directions, inner_state = direction.update(
        updates, state.inner_state, params, **extra_args)
    # The shared online step: the first call has no previous direction to learn from.
    rates, hyper_sq, new_updates = online.online_step(
        state.count, state.learning_rates, state.hypergradient_sq, state.last_direction,
        updates, directions, hypergradient=signal, hyper_step=rule_step, apply=apply)
    return new_updates, HypergradientState(
        count=numerics.safe_increment(state.count),
        learning_rates=rates,
        hypergradient_sq=hyper_sq,
        last_direction=optax.tree.cast_like(directions, state.last_direction),
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
