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

from fop_optax import nonfinite
from fop_optax import transform

__all__ = ['fop', 'fop_adam', 'sgd_hd', 'adam_hd']


def _no_zero_momentum(momentum):
  # optax.sgd keeps a trace for momentum=0.0; None skips it. Arrays (e.g. from
  # inject_hyperparams) are passed through as they are.
  if isinstance(momentum, numbers.Real) and momentum == 0:
    return None
  return momentum


def _finish(tx, skip_nonfinite: bool):
  return nonfinite.skip_nonfinite(tx) if skip_nonfinite else tx


def _fop_then(base, learning_rate, hyper_learning_rate, hyper_optimizer, structures,
              normalize, max_full_dim, rank, skip_nonfinite, max_scale):
  """FOP's preconditioning followed by ``base`` (which applies the learning rate)."""
  fop_tx = transform.scale_by_fop(
      learning_rate, hyper_learning_rate, hyper_optimizer, structures,
      normalize=normalize, max_full_dim=max_full_dim, rank=rank, max_scale=max_scale)
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
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum on FOP-preconditioned gradients (the paper's main set-up).

  ``θ_t = θ_{t-1} − η·v_t``, ``v_t = α·v_{t-1} + P_t·g_t``, with ``P = MᵀM`` learned
  online by hypergradient descent (:func:`fop_optax.scale_by_fop`).

  Args:
    learning_rate: ``η``, a float or an optax schedule (shared by the SGD step
      and the hypergradient).
    momentum: ``α``; ``None`` or ``0`` for plain SGD.
    nesterov: Nesterov momentum.
    hyper_learning_rate: Adam learning rate for the ``M``s (the paper used 1e-4).
    hyper_optimizer: replaces ``optax.adam(hyper_learning_rate)``.
    structures: per-leaf structures, see :func:`fop_optax.scale_by_fop`.
    normalize: FOP-norm (``P`` only rotates).
    max_full_dim: default rule's size limit for full matrices (default 64).
    rank: rank of low-rank preconditioners (default 8).
    skip_nonfinite: skip steps with NaN/Inf gradients (see
      :func:`fop_optax.skip_nonfinite`).
    max_scale: the guard's bound on ``λ_max(P)``, see
      :func:`fop_optax.scale_by_fop`; ``None`` disables it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return _fop_then(optax.sgd(learning_rate, _no_zero_momentum(momentum), nesterov),
                   learning_rate, hyper_learning_rate, hyper_optimizer, structures,
                   normalize, max_full_dim, rank, skip_nonfinite, max_scale)


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
) -> optax.GradientTransformationExtraArgs:
  """Adam on FOP-preconditioned gradients: ``optax.adam`` fed ``P·g``.

  The hypergradient is FOP's online one (it treats the Adam step as
  ``−η·P·g``); with the default Adam hyper-optimiser ``η``'s scale cancels.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: as for ``optax.adam``.
    hyper_learning_rate, hyper_optimizer, structures, normalize, max_full_dim,
      rank, skip_nonfinite, max_scale: as for :func:`fop`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return _fop_then(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
                   learning_rate, hyper_learning_rate, hyper_optimizer, structures,
                   normalize, max_full_dim, rank, skip_nonfinite, max_scale)


def _check_float_rate(learning_rate) -> None:
  if callable(learning_rate):
    raise TypeError(
        'hypergradient descent learns the step size itself: pass the initial '
        'step size as a number, not a schedule')


def sgd_hd(
    learning_rate: float,
    hyper_learning_rate: float = 1e-3,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    *,
    per_parameter: bool = False,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """SGD-HD (Baydin et al., 2018): SGD whose step size is learned online.

  ``α_t = α_{t-1} + β·g_t·u_{t-1}``, ``θ_t = θ_{t-1} − α_t·u_t`` with ``u`` the
  gradient (or the momentum trace). One ``α`` per leaf (S-HD), or per
  parameter with ``per_parameter=True`` (PP-HD).

  Args:
    learning_rate: initial step size ``α_0``.
    hyper_learning_rate: ``β``.
    momentum: optional heavy-ball momentum for the direction ``u``.
    nesterov: Nesterov momentum.
    per_parameter: one step size per parameter.
    skip_nonfinite: skip steps with NaN/Inf gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  _check_float_rate(learning_rate)
  momentum = _no_zero_momentum(momentum)
  direction = None if momentum is None else optax.trace(momentum, nesterov)
  tx = optax.chain(
      transform.scale_by_hypergradient(
          learning_rate, hyper_learning_rate, direction, per_parameter=per_parameter),
      optax.scale(-1.0),
  )
  return _finish(tx, skip_nonfinite)


def adam_hd(
    learning_rate: float,
    hyper_learning_rate: float = 1e-7,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    per_parameter: bool = False,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Adam-HD (Baydin et al., 2018): Adam whose step size is learned online.

  ``u_t = m̂_t/(√v̂_t + ε)`` and ``α_t = α_{t-1} + β·g_t·u_{t-1}``.

  Args:
    learning_rate: initial step size ``α_0``.
    hyper_learning_rate: ``β`` (Baydin et al. used 1e-7 with ``α_0 = 1e-3``).
    b1, b2, eps: as for ``optax.adam``.
    per_parameter: one step size per parameter.
    skip_nonfinite: skip steps with NaN/Inf gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  _check_float_rate(learning_rate)
  tx = optax.chain(
      transform.scale_by_hypergradient(
          learning_rate, hyper_learning_rate, optax.scale_by_adam(b1, b2, eps),
          per_parameter=per_parameter),
      optax.scale(-1.0),
  )
  return _finish(tx, skip_nonfinite)
