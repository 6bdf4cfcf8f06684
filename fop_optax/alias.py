"""Ready-made optimisers: FOP and hypergradient descent composed with optax.

Each alias is an ``optax.chain`` of the transformations in
:mod:`fop_optax.transform` and optax's own, wrapped by default in
:func:`fop_optax.skip_nonfinite` so that a batch with NaN/Inf gradients is
skipped instead of poisoning the weights and the learned preconditioners.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import optax

from fop_optax import _checks
from fop_optax import hypergradient
from fop_optax import nonfinite
from fop_optax import transform
from fop_optax._lodo import scale_by_lodo as _scale_by_lodo

__all__ = ['fop', 'fop_adam', 'sgd_hd', 'adam_hd', 'lodo']


def _no_zero_momentum(momentum):
  # optax.sgd keeps a trace for momentum=0.0; None skips it. Arrays (e.g. from
  # inject_hyperparams) are passed through as they are.
  if isinstance(momentum, numbers.Real) and momentum == 0:
    return None
  return momentum


def _finish(tx, skip_nonfinite: bool):
  return nonfinite.for_alias(tx, skip_nonfinite)


def _fop_then(base, learning_rate, hyper_learning_rate, hyper_optimizer, structures,
              normalize, max_full_dim, rank, skip_nonfinite, max_scale, gamma, update_every):
  """FOP's preconditioning followed by ``base`` (which applies the learning rate)."""
  fop_tx = transform.scale_by_fop(
      learning_rate, hyper_learning_rate, hyper_optimizer, structures,
      normalize=normalize, max_full_dim=max_full_dim, rank=rank, max_scale=max_scale,
      gamma=gamma, update_every=update_every)
  return _finish(optax.chain(fop_tx, base), skip_nonfinite)


def fop(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    nesterov: bool = False,
    hyper_learning_rate: float = 1e-4,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    structures: Any = None,
    *,
    normalize: bool = False,
    max_full_dim: Optional[int] = None,
    rank: Optional[int] = None,
    skip_nonfinite: bool = True,
    max_scale: Optional[float] = transform.DEFAULT_MAX_SCALE,
    gamma: Optional[tuple[Any, float]] = None,
    update_every: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum on FOP-preconditioned gradients (the paper's main set-up).

  .. math::

    θ_t = θ_{t-1} - η\,v_t, \qquad v_t = α\,v_{t-1} + P_t\,g_t, \qquad P_t = M_t^\top M_t,

  with the ``M`` matrices learned online by hypergradient descent
  (:func:`fop_optax.scale_by_fop`).

  Args:
    learning_rate: ``η``, a float or an optax schedule (shared by the SGD step
      and the hypergradient).
    momentum: ``α``; ``None`` or ``0`` for plain SGD.
    nesterov: Nesterov momentum.
    hyper_learning_rate: Adam learning rate for the ``M`` matrices (the paper used 1e-4).
    hyper_optimizer: replaces ``optax.adam(hyper_learning_rate)``.
    structures: per-leaf structures, see :func:`fop_optax.scale_by_fop`.
    normalize: FOP-norm (``P`` only rotates).
    max_full_dim: default rule's size limit for full matrices (default 32).
    rank: rank of low-rank preconditioners (default 8).
    skip_nonfinite: skip steps with NaN/Inf gradients (see
      :func:`fop_optax.skip_nonfinite`).
    max_scale: the guard's bound on ``λ_max(P)``, see
      :func:`fop_optax.scale_by_fop`; ``None`` disables it.
    gamma: ``(δ, p_∞)``, Theorem 1's normalisation ``P/(δ(t)‖P‖₂ + (1 − δ(t))p_∞)``,
      of the ``P`` clipped at ``max_scale`` (``None``: of the unbounded ``P``), see
      :func:`fop_optax.scale_by_fop`.
    update_every: learn ``P`` on every ``k``-th step only (the hypergradient's
      cost paid once in ``k`` steps), see :func:`fop_optax.scale_by_fop`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = fop_optax.fop(learning_rate=0.05, momentum=0.9)
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
    >>> print(bool(f(params) < 0.03))   # down from 2.0 (9.96E-03 on one machine)
    True
    >>> lam = fop_optax.diagnostics.spectra(state, params)['w']   # eigenvalues of P
    >>> print(lam.shape, bool(lam.max() <= 1 + 1e-4))   # the guard: λ_max(P) ≤ max_scale = 1
    (3,) True

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return _fop_then(optax.sgd(learning_rate, _no_zero_momentum(momentum), nesterov),
                   learning_rate, hyper_learning_rate, hyper_optimizer, structures,
                   normalize, max_full_dim, rank, skip_nonfinite, max_scale, gamma, update_every)


def fop_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    hyper_learning_rate: float = 1e-4,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    structures: Any = None,
    *,
    normalize: bool = False,
    max_full_dim: Optional[int] = None,
    rank: Optional[int] = None,
    skip_nonfinite: bool = True,
    max_scale: Optional[float] = transform.DEFAULT_MAX_SCALE,
    gamma: Optional[tuple[Any, float]] = None,
    update_every: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam on FOP-preconditioned gradients: ``optax.adam`` fed ``P·g``.

  The hypergradient is FOP's online one (it treats the Adam step as
  ``−η·P·g``); with the default Adam hyper-optimiser ``η``'s scale cancels.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: as for ``optax.adam``.
    hyper_learning_rate, hyper_optimizer, structures, normalize: as for :func:`fop`.
    max_full_dim, rank, skip_nonfinite, max_scale, gamma, update_every: as for :func:`fop`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = fop_optax.fop_adam(learning_rate=0.05)
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
    >>> print(bool(f(params) < 0.002))   # down from 2.0 (7.75E-04 on one machine)
    True

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return _fop_then(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
                   learning_rate, hyper_learning_rate, hyper_optimizer, structures,
                   normalize, max_full_dim, rank, skip_nonfinite, max_scale, gamma, update_every)


# Default hyper learning rates per rule: 'additive' keeps Baydin et al.'s
# values; the scale-free rules' were chosen by measurement (docs/hd_rules.md).
_SGD_HD_BETA = {'additive': 1e-3, 'multiplicative': 0.1, 'log': 0.05}
_ADAM_HD_BETA = {'additive': 1e-7, 'multiplicative': 0.1, 'log': 0.05}


def _hd(name, learning_rate, hyper_learning_rate, direction, rule, scope, per_parameter,
        skip_nonfinite, defaults, step_clip=None):
  if callable(learning_rate):
    raise TypeError(
        f'{name}: hypergradient descent learns the step size itself: pass the '
        'initial step size as a number, not a schedule')
  if rule not in defaults:
    raise ValueError(f'{name}: rule must be one of {tuple(defaults)}, got {rule!r}')
  _checks.check_number('learning_rate', learning_rate, allow_zero=False, where=name)
  if hyper_learning_rate is None:
    hyper_learning_rate = defaults[rule]
  _checks.check_number('hyper_learning_rate', hyper_learning_rate, allow_zero=True, where=name)
  tx = optax.chain(
      hypergradient.scale_by_hypergradient(
          learning_rate, hyper_learning_rate, direction, rule=rule, scope=scope,
          per_parameter=per_parameter, step_clip=step_clip),
      optax.scale(-1.0),
  )
  return _finish(tx, skip_nonfinite)


_RULES_DOC = """rule: how the step size learns (see :mod:`fop_optax.hypergradient`):
      ``'log'`` (default; scale-free, ``α`` stays within ``α_0·[1e-6, 1e6]``),
      ``'multiplicative'`` (Baydin et al.'s normalised rule, scale-free) or
      ``'additive'`` (Baydin et al.'s ``α_t = α_{t-1} + β·g_t·u_{t-1}``
      exactly; its ``β`` depends on the problem's scale, and a bad one makes
      ``α`` negative or divergent)."""


def sgd_hd(
    learning_rate: float,
    hyper_learning_rate: Optional[float] = None,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    *,
    rule: str = 'log',
    scope: Optional[str] = None,
    per_parameter: Optional[bool] = None,
    skip_nonfinite: bool = True,
    step_clip: Optional[tuple[float, float]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SGD-HD (Baydin et al., 2018): SGD whose step size is learned online.

  ``θ_t = θ_{t-1} − α_t·u_t`` with ``u`` the gradient (or the momentum trace),
  and ``α`` learned from the hypergradient ``−g_t·u_{t-1}`` by ``rule`` (see
  :func:`fop_optax.scale_by_hypergradient`). One ``α`` per leaf by default
  (S-HD), for all parameters (``scope='global'``, Baydin et al.'s code) or
  per parameter (``scope='parameter'``, PP-HD).

  Args:
    learning_rate: initial step size ``α_0`` (a number, not a schedule).
    hyper_learning_rate: ``β``; ``None`` for the rule's default (1e-3 for
      ``'additive'``, as Baydin et al.; 0.05 for ``'log'``, 0.1 for
      ``'multiplicative'``).
    momentum: optional heavy-ball momentum for the direction ``u``.
    nesterov: Nesterov momentum.
    RULES_DOC
    scope: ``'global'``, ``'leaf'`` (default) or ``'parameter'``.
    per_parameter: older spelling of ``scope='parameter'``.
    skip_nonfinite: skip steps with NaN/Inf gradients.
    STEP_CLIP_DOC

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = fop_optax.sgd_hd(learning_rate=0.01)
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
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
    <https://arxiv.org/abs/1703.04782>`_, ICLR 2018
  """
  momentum = _no_zero_momentum(momentum)
  direction = None if momentum is None else optax.trace(momentum, nesterov)
  return _hd('sgd_hd', learning_rate, hyper_learning_rate, direction, rule, scope,
             per_parameter, skip_nonfinite, _SGD_HD_BETA, step_clip)


def adam_hd(
    learning_rate: float,
    hyper_learning_rate: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    rule: str = 'log',
    scope: Optional[str] = None,
    per_parameter: Optional[bool] = None,
    skip_nonfinite: bool = True,
    step_clip: Optional[tuple[float, float]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam-HD (Baydin et al., 2018): Adam whose step size is learned online.

  ``u_t = m̂_t/(√v̂_t + ε)``, ``θ_t = θ_{t-1} − α_t·u_t``, and ``α`` learned
  from the hypergradient ``−g_t·u_{t-1}`` by ``rule``.

  Args:
    learning_rate: initial step size ``α_0`` (a number, not a schedule).
    hyper_learning_rate: ``β``; ``None`` for the rule's default (1e-7 for
      ``'additive'``, Baydin et al.'s value with ``α_0 = 1e-3``; 0.05 for
      ``'log'``, 0.1 for ``'multiplicative'``).
    b1, b2, eps: as for ``optax.adam``.
    RULES_DOC
    scope: ``'global'``, ``'leaf'`` (default) or ``'parameter'``.
    per_parameter: older spelling of ``scope='parameter'``.
    skip_nonfinite: skip steps with NaN/Inf gradients.
    STEP_CLIP_DOC

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = fop_optax.adam_hd(learning_rate=0.01)
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
    >>> print(bool(f(params) < 0.02))   # down from 2.0 (7.78E-03 on one machine)
    True

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
    <https://arxiv.org/abs/1703.04782>`_, ICLR 2018
  """
  return _hd('adam_hd', learning_rate, hyper_learning_rate, optax.scale_by_adam(b1, b2, eps),
             rule, scope, per_parameter, skip_nonfinite, _ADAM_HD_BETA, step_clip)


_STEP_CLIP_DOC = """step_clip: ``rule='log'``'s ``(c_-, c_+)``: one step multiplies ``α`` by
      ``e^{β·c}``, ``c`` in that interval; ``None`` for
      ``hypergradient.DEFAULT_STEP_CLIP = (−10, 0.1)`` (growth of at most
      0.5 % a step at the default ``β``, so ``α`` needs ~460 steps per decade
      from a too-small ``α_0``). ``(−10, 1)``, the default before, grows 10×
      faster and can overshoot the stability edge (see
      :mod:`fop_optax.hypergradient`)."""


for _f in (sgd_hd, adam_hd):
  _f.__doc__ = _f.__doc__.replace('RULES_DOC', _RULES_DOC).replace('STEP_CLIP_DOC', _STEP_CLIP_DOC)
del _f


def lodo(
    learning_rate: optax.ScalarOrSchedule,
    meta_learning_rate: float = 1e-3,
    momentum: Optional[float] = 0.9,
    num_layers: Optional[int] = None,
    block_size: Optional[int] = None,
    *,
    meta_optimizer: Optional[optax.GradientTransformation] = None,
    seed: Optional[int] = None,
    architecture: str = 'network',
    per_leaf: bool = False,
    weight_dtype: Optional[Any] = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """LODO (Liao et al., 2022): a learned preconditioner network on the momentum.

  ``θ_t = θ_{t-1} − α·P(W_t)·m_t`` with ``m_t = β m_{t-1} + (1 − β) g_t`` and
  ``P = EᵀAᵀAE`` a deep block-diagonal linear network trained online by Adam on
  its one-step hypergradient (:func:`fop_optax.scale_by_lodo`).

  Args:
    learning_rate: ``α``, a float or an optax schedule (the reference's
      default is 1.0; its experiments tuned it, e.g. 0.0846 for ResNet-18).
    meta_learning_rate: Adam's learning rate for the network (1e-3).
    momentum: ``β`` (0.9); ``None`` or 0 for none.
    num_layers: ``L``; ``None`` for 16. (``None``, not an int default, so that
      ``optax.inject_hyperparams`` leaves it static.)
    block_size: ``b``; ``None`` for 4.
    meta_optimizer: replaces ``optax.adam(meta_learning_rate, eps=1e-7)``.
    seed: seeds the initialisation and permutations; ``None`` for 0.
    architecture, per_leaf, weight_dtype: see :func:`fop_optax.scale_by_lodo`.
    skip_nonfinite: skip steps with NaN/Inf gradients (see
      :func:`fop_optax.skip_nonfinite`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = fop_optax.lodo(learning_rate=0.05)
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
    >>> print(bool(f(params) < 0.05))   # down from 2.0 (1.70E-02 on one machine)
    True

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Liao et al., `Learning to Optimize Quasi-Newton Methods
    <https://arxiv.org/abs/2210.06171>`_, TMLR 2023
  """
  tx = _scale_by_lodo(
      learning_rate, meta_learning_rate, momentum,
      16 if num_layers is None else num_layers, 4 if block_size is None else block_size,
      meta_optimizer=meta_optimizer, seed=0 if seed is None else seed,
      architecture=architecture, per_leaf=per_leaf, weight_dtype=weight_dtype)
  return _finish(optax.chain(tx, optax.scale_by_learning_rate(learning_rate)), skip_nonfinite)
