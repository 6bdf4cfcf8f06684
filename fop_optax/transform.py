"""First-order preconditioning and hypergradient descent as optax transformations.

References:
  Moskovitz et al., `First-Order Preconditioning via Hypergradient Descent
  <https://arxiv.org/abs/1910.08461>`_, 2019.

  Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
  <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.

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
from fop_optax import _grouping
from fop_optax import _sharding
from fop_optax import online
from fop_optax import structures as structures_lib

__all__ = ['FopState', 'scale_by_fop']


class FopState(NamedTuple):
  """State of :func:`scale_by_fop`.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    preconditioners: tree with the params' structure holding each leaf's
      learned ``M`` (Flax ``Variable`` wrappers dropped, so that frameworks do
      not copy a parameter's sharding onto it: it is replicated)
      (the (a×a) matrix for ``full``/``spatial``; ``(2, a, r)`` stacked
      ``U, V`` for ``low_rank``; leaf-shaped for ``diagonal``; a scalar for
      ``scalar``; a scalar placeholder for ``none``). Float32, or float64
      for float64 parameters.
    last_gradient: params-shaped tree of the previous gradient ``G_{t-1}``, in
      the parameters' dtype.
    hyper_state: state of the hyper-optimiser that trains the preconditioners.
    spans: tree with the preconditioners' structure holding, per leaf, what the
      last step decomposed of its ``M`` and computed of its input ``G_{t-1}``
      for the next step to reuse (``Structure.span``: for ``low_rank`` under the
      guard ``(M, Q, T, μ, W, QᵀG_{t-1})``, its span basis and eigenpairs and
      the basis' product with the input, which the next hypergradient needs;
      ``()`` for the other structures). A span
      is used only for the very ``M`` it was made for (exact equality), so
      matrices replaced by hand are never paired with a stale one. ``()``
      (the default, e.g. a state built by hand): nothing to reuse.
  """

  count: jax.Array
  preconditioners: optax.Params
  last_gradient: optax.Updates
  hyper_state: optax.OptState
  spans: Any = ()


DEFAULT_MAX_SCALE = structures_lib.DEFAULT_MAX_SCALE


def _check_number(name: str, value: Any, *, allow_zero: bool) -> None:
  # Concrete numbers and arrays only: tracers (inject_hyperparams) pass.
  _checks.check_number(name, value, allow_zero=allow_zero)


def _matrix_dtype(leaf_dtype, matrix_dtype) -> jnp.dtype:
  if matrix_dtype is not None:
    return jnp.dtype(matrix_dtype)
  # float32 for bf16/f16/f32 leaves; float64 leaves keep their precision.
  return jnp.promote_types(jnp.float32, leaf_dtype)


def _replicate_matrices(structs, ms, leaves):
  """Pins FOP's matrices (or spans) to replicated under a mesh (auto or explicit axes).

  ``leaves``: the parameter-shaped leaves they belong to, whose types carry an
  explicit mesh where the matrices' own may not. Leaf-shaped ``diagonal``
  scales are left to follow their leaf.
  """
  return [jax.tree.map(lambda x: _sharding.replicate(x, leaf), m) if s.replicated_state else m
          for s, m, leaf in zip(structs, ms, leaves)]


def _group_keys(structs, columns) -> list:
  """Per leaf, what leaves must share to run as one group: structure and every array's type.

  ``jax.typeof`` is shape, dtype and (under explicit mesh axes) sharding, so only
  leaves that stack without a resharding are grouped (:func:`fop_optax._grouping.group_map`).
  """
  keys = []
  for i, (s, row) in enumerate(zip(structs, zip(*columns))):
    try:
      hash(s)
    except TypeError:   # a traced bound (optax.inject_hyperparams): the leaf runs alone
      s = ('unhashable structure', i)
    keys.append((s, jax.tree.structure(row), tuple(jax.typeof(x) for x in jax.tree.leaves(row))))
  return keys


def _check_tree_matches(name: str, updates, reference) -> None:
  """Raises if ``updates`` is not shaped like ``reference``, a params-shaped state field."""
  expected, got = jax.tree.structure(reference), jax.tree.structure(updates)
  if expected != got:
    raise ValueError(
        f'{name}: the updates tree does not match the tree the state was '
        f'initialised with.\n  init: {expected}\n  update: {got}')
  for path, u, ref in zip(structures_lib.leaf_paths(updates), jax.tree.leaves(updates),
                          jax.tree.leaves(reference)):
    if u.shape != ref.shape:
      raise ValueError(
          f'{name}: update {path} has shape {u.shape} but the state was '
          f'initialised for shape {ref.shape}')


def scale_by_fop(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    hyper_learning_rate: float = 1e-4,
    hyper_optimizer: Optional[optax.GradientTransformation] = None,
    structures: Any = None,
    *,
    max_full_dim: Optional[int] = None,
    rank: Optional[int] = None,
    normalize: bool = False,
    matrix_dtype: Optional[Any] = None,
    seed: Optional[int] = None,
    max_scale: Optional[float] = DEFAULT_MAX_SCALE,
    gamma: Optional[tuple[optax.ScalarOrSchedule, float]] = None,
    update_every: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""First-order preconditioning: replaces each gradient ``g`` by ``P·g``, ``P = MᵀM``.

  Each leaf's gradient is viewed as a matrix ``G`` (see :mod:`fop_optax.structures`)
  and preconditioned by a learned positive semi-definite ``P = MᵀM`` that starts
  at the identity. The update that follows (e.g. ``optax.sgd(η, momentum)``)
  takes ``θ_t = θ_{t-1} − η·P·G_{t-1}``, so the loss at step ``t`` is a function
  of ``M_{t-1}`` with gradient (chain rule, exact):

  .. math::
    \frac{∂J(θ_t)}{∂M_{t-1}} = −η\, M_{t-1}\,(G_t G_{t-1}^⊤ + G_{t-1} G_t^⊤).

  On each call the transformation forms this hypergradient from the incoming
  gradient ``G_t`` and the stored ``G_{t-1}``, lets ``hyper_optimizer`` update
  ``M``, then returns ``P_t·G_t`` and stores ``G_t``. No extra forward pass is
  needed. On the first call there is no previous step: ``M`` and the
  hyper-optimiser's state are left untouched, so the first update is exactly
  the base optimiser's. With momentum the online hypergradient is the same
  formula (only the newest term of the velocity depends on ``M_{t-1}``).

  Place it *before* the step that applies the learning rate::

    optax.chain(fop_optax.scale_by_fop(0.05), optax.sgd(0.05, momentum=0.9))

  Non-finite gradients are not filtered here: a NaN in ``G_t`` makes that
  step's update and ``M`` NaN. The aliases (:func:`fop_optax.fop`, ...) skip
  such steps; wrap this transformation in :func:`fop_optax.skip_nonfinite` to
  do the same by hand.

  Leaves that share a structure, shapes, dtypes and sharding (the layers of a
  Transformer) are processed as one group: stacked inside ``update``, their linear
  algebra runs once per group (``jax.vmap``), with each skip (the guard's
  certificate, the reuse of a span) decided for the group; the state keeps one
  entry per leaf. Reverse-mode derivatives through ``update`` are available,
  forward mode (``jax.jvp``) is not for grouped leaves.

  Parameters must be real floating point: a complex leaf is rejected at
  ``init`` (split it into real and imaginary parts). Updates keep the
  parameters' dtypes. The state's matrices have the parameters' tree structure
  but not their shapes, so a function given to ``optax.tree.map_params``
  reaches them too: make it shape-aware.

  Args:
    learning_rate: ``η`` of the step that follows (a float or an optax
      schedule, evaluated at the previous step's count). With an adaptive
      hyper-optimiser such as Adam its scale cancels; with SGD it does not.
    hyper_learning_rate: learning rate of the default hyper-optimiser
      ``optax.adam(hyper_learning_rate)``; ignored if ``hyper_optimizer`` is given.
      The default's step on each ``M`` is scaled by
      ``Structure.hyper_step_scale``: ``min(1, 9/a)`` for an (a×a) full or
      spatial ``M``, ``min(1, 9/√(a·r))`` for low rank, 1 otherwise. Adam moves
      every entry by about its learning rate, so without it a wide layer's ``P``
      would change up to ``a/9`` times faster than the 3×3 spatial matrices
      the paper tuned 1e-4 on (and run away on wide dense layers); 3×3 conv
      kernels, scalar and diagonal forms are unchanged.
    hyper_optimizer: any optax transformation used to train the ``M`` matrices (its
      ``params`` are the ``M`` matrices; it sees the hypergradients as gradients).
    structures: which preconditioner each leaf gets: ``None`` for the default
      rule, a label (``'auto'``, ``'none'``, ``'scalar'``, ``'diagonal'``,
      ``'full'``, ``'spatial'``, ``'low_rank'``) or a
      :class:`~fop_optax.structures.Structure` for all leaves, a pytree prefix
      of the params with such leaves, or a callable ``params -> such a tree``.
    max_full_dim: default rule: a dense kernel ``(in, out)`` gets a full
      ``in×in`` matrix when ``in <= max_full_dim`` (default 32), a low-rank
      one otherwise. ``None`` (not an int default) so that
      ``optax.inject_hyperparams`` leaves it static.
    rank: rank of the low-rank form (default 8).
    normalize: FOP-norm for structures chosen by the default rule or by label:
      ``P`` is divided by its spectral norm ``‖P‖₂`` (the paper's Theorem 1), so
      no direction's step is ever lengthened; FOP-norm only rotates and shortens.
    matrix_dtype: dtype of the ``M`` matrices; default float32 (float64 for float64 leaves).
    seed: seeds the random orthonormal ``U`` that low-rank preconditioners start from
      (default 0).
    max_scale: the guard ``B`` (default 1): the largest eigenvalue of every
      ``P`` that is applied is at most ``B``, so no direction's step is ever
      more than ``B`` times the base optimiser's. ``full``/``spatial``/``low_rank``
      clip ``P``'s eigenvalues at ``B`` where ``P`` is applied and learn through
      the clip exactly; ``scalar``/``diagonal`` project ``m²`` onto ``[0, B]``
      after each hyper step (see :mod:`fop_optax.structures`). At the default
      ``B = 1`` your learning rate is the largest step FOP takes along any
      direction: FOP only rotates and shortens it. Must be ``>= 1`` (``P``
      starts at ``I``); ``None`` disables it (the paper's unbounded FOP).
    gamma: ``(δ, p_∞)``: the normalisation of the paper's Theorem 1,
      ``P̃ = P/γ(t)`` with ``γ(t) = δ(t)·‖P‖₂ + (1 − δ(t))·p_∞``, ``δ`` a float in
      ``[0, 1]`` or an optax schedule (e.g. decaying from 1 to 0: FOP-norm first,
      a fixed scale ``1/p_∞`` later), ``p_∞ > 0``. The hypergradient includes
      ``γ``'s dependence on ``M`` (``∂‖P‖₂/∂M = 2Mvvᵀ``). Replaces ``normalize``.
      The guard is kept: with ``max_scale = B`` (default 1) ``P`` is clipped first,
      ``P̃ = min(P, B)/γ(t)`` with ``‖·‖₂`` that of the clipped ``P`` (``min(λ_max, B)``),
      so no direction's step is ever more than ``B/γ`` times the base optimiser's;
      ``max_scale=None`` gives the paper's form, ``P/γ(t)`` of the unbounded ``P``
      (``λ_max(P̃) = λ/γ ≤ 1/δ``). ``None``: off.
    update_every: ``k``: the hypergradient and the hyper step run on every
      ``k``-th call only (calls ``k, 2k, ...``; default 1, every call). On the
      others ``M`` is kept and only ``P·G`` is applied (and ``G`` stored), so
      the hypergradient's cost (two thirds of FOP's arithmetic for low rank) is
      paid once in ``k`` steps; each hyper step still uses two consecutive
      gradients, so it is the same exact one-step hypergradient. The
      hyper-optimiser then takes ``k`` times fewer steps: ``P`` moves about
      ``k`` times slower at the same ``hyper_learning_rate``. The choice is a
      ``lax.cond`` inside the step (under ``jax.vmap`` both branches run).
      The first call never takes a hyper step and does none of its work.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = optax.chain(fop_optax.scale_by_fop(learning_rate=0.05),   # P·g ...
    ...                  optax.sgd(0.05, momentum=0.9))                 # ... then the step
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(50):
    ...   params, state = step(params, state)
    >>> print(bool(f(params) < 0.03))   # down from 2.0 (9.96E-03 on one machine)
    True
    >>> print(fop_optax.diagnostics.find_fop_state(state).preconditioners['w'].shape)  # M: 3×3
    (3, 3)


  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`FopState`.

  References:
    Moskovitz et al., `First-Order Preconditioning via Hypergradient Descent
    <https://arxiv.org/abs/1910.08461>`_, 2019
  """
  _checks.check_rate('learning_rate', learning_rate, allow_zero=False)
  _check_number('hyper_learning_rate', hyper_learning_rate, allow_zero=True)
  if max_scale is not None:
    _check_number('max_scale', max_scale, allow_zero=False)
    if isinstance(max_scale, numbers.Real) and max_scale < 1:
      raise ValueError(
          f'max_scale must be >= 1 (P starts at the identity, whose largest eigenvalue is 1), '
          f'got {max_scale}')
  # The default hyper step is calibrated per leaf (Structure.hyper_step_scale);
  # a hyper_optimizer given by the user is applied as it is.
  calibrate = hyper_optimizer is None
  if calibrate:
    hyper_optimizer = optax.adam(hyper_learning_rate)
  if gamma is not None:
    delta, p_inf = gamma
    if normalize:
      raise ValueError('gamma replaces normalize: pass one of them')
    if not callable(delta) and not 0 <= delta <= 1:
      raise ValueError(f'gamma: δ must be in [0, 1] (or a schedule), got {delta}')
    if not p_inf > 0:
      raise ValueError(f'gamma: p_∞ must be > 0, got {p_inf}')
  _checks.check_int('update_every', update_every, allow_none=True, where='scale_by_fop')
  every = 1 if update_every is None else int(update_every)
  rule = dict(max_full_dim=max_full_dim, rank=rank, normalize=normalize, max_scale=max_scale)

  def gamma_at(count, lam):
    delta, p_inf = gamma
    d = delta(count) if callable(delta) else delta
    return d * lam + (1 - d) * p_inf, d

  def resolve(tree):
    return structures_lib.resolve_structures(tree, structures, **rule)

  def init_fn(params):
    structs = jax.tree.leaves(resolve(params))
    key = jax.random.key(0 if seed is None else seed)
    ms = [s.init(tuple(p.shape), _matrix_dtype(p.dtype, matrix_dtype), jax.random.fold_in(key, i))
          for i, (s, p) in enumerate(zip(structs, jax.tree.leaves(params)))]
    # (init may run eagerly: only a mesh the matrices' own types carry is used here;
    # update pins them with the gradients' mesh.)
    ms = _replicate_matrices(structs, ms, ms)
    m_def = structures_lib.unwrapped_treedef(params)
    preconditioners = m_def.unflatten(ms)
    return FopState(
        count=jnp.zeros([], jnp.int32),
        preconditioners=preconditioners,
        # Params-shaped (and so sharded like the params), also for leaves whose
        # structure does not need it, so that the tree needs no placeholders.
        last_gradient=optax.tree.zeros_like(params),
        hyper_state=hyper_optimizer.init(preconditioners),
        spans=m_def.unflatten(_replicate_matrices(
            structs, [s.init_span(m, tuple(p.shape)) if gamma is None else ()
                     for s, m, p in zip(structs, ms, jax.tree.leaves(params))],
            ms)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_tree_matches('scale_by_fop', updates, state.last_gradient)
    structs = jax.tree.leaves(resolve(updates))
    eta = _checks.previous_step_rate(learning_rate, state.count)

    # Leaves are processed as aligned lists: the matrices' tree has the params'
    # structure minus Flax Variable wrappers (see unwrapped_treedef).
    m_def = jax.tree.structure(state.preconditioners)
    gs = jax.tree.leaves(updates)
    # What the last step decomposed of each M (Structure.span), reused by this step's
    # hypergradient and by a step that does not learn. A state built without spans
    # (FopState's default ()) keeps none: the state's structure never changes.
    keep_spans = not (isinstance(state.spans, tuple) and len(state.spans) == 0)
    spans_in = (_replicate_matrices(structs, m_def.flatten_up_to(state.spans), gs)
                if keep_spans else [()] * len(gs))

    def span_kw(span):   # only a structure with a non-empty span takes the argument
      return {'span': span} if span else {}

    def applied_top(s, m):
      """``(λ, ∂λ/∂M)`` of the ``P`` that γ normalises: ``min(λ_max(MᵀM), B)`` under a bound ``B``.

      At the bound up to rounding (where the projection leaves it) ``λ`` counts as unclipped,
      as in the guard's own derivative (``structures._matrix._KINK_RTOL``).
      """
      lam, dlam = s.top_eigen(m)
      bound = s.max_scale
      if bound is None:
        return lam, dlam
      over = lam > bound * (1 + structures_lib._KINK_RTOL)
      return jnp.minimum(lam, bound).astype(lam.dtype), jnp.where(over, 0.0, dlam).astype(dlam.dtype)

    def hypergradient(s, m, span, g, gp):
      if gamma is None or not s.preconditions:
        return s.hypergradient(m, g, gp, eta, **span_kw(span))
      # J ≈ −η⟨C, P̃/γ⟩ (P̃ the clipped P under a bound): ∂J/∂M = −(η/γ) ∂⟨C, P̃⟩/∂M
      # + (η δ ⟨C, P̃⟩/γ²) ∂λ/∂M, ⟨C, P̃⟩ = ⟨G_t, P̃ G_p⟩, λ = λ_max(P̃).
      lam, dlam = applied_top(s, m)
      gam, d = gamma_at(jnp.maximum(state.count - 1, 0), lam)
      cp = jnp.vdot(g.astype(m.dtype), s.precondition(m, gp).astype(m.dtype))
      return s.hypergradient(m, g, gp, eta / gam) + (eta * d * cp / gam ** 2) * dlam

    def precondition(s, m, span, g):
      if gamma is None or not s.preconditions:
        return s.precondition(m, g, **span_kw(span))
      gam, _ = gamma_at(state.count, applied_top(s, m)[0])
      return (s.precondition(m, g) / gam.astype(m.dtype)).astype(g.dtype)

    def precondition_and_span(s, m, span, g):
      """``(P·g, span of (m, g))``: a step that keeps ``m`` stores the span of its new input."""
      if gamma is None and keep_spans and s.preconditions:
        return s.precondition_and_span(m, g, **span_kw(span))
      return precondition(s, m, span, g), span

    def project_and_precondition(s, m, g):
      # The projection of the hyper step and the preconditioning with its result
      # share their work (low rank: one span basis); each structure's own bound
      # (set from max_scale by resolve_structures, or given).
      bound = s.max_scale   # set from max_scale by resolve_structures, or the structure's own
      if bound is None:
        return m, precondition(s, m, (), g), (s.span(m, g) if keep_spans else ())
      if gamma is not None:   # a structure's own bound under γ: P̃ = clipped P / γ
        m = s.clip(m, bound)
        return m, precondition(s, m, (), g), ()
      if keep_spans:
        return s.clip_precondition_and_span(m, bound, g)
      return s.clip_and_precondition(m, bound, g) + ((),)

    def per_leaf(fn, *columns):
      """``[fn(structure, *row) for each leaf]``: leaves sharing a structure and their arrays'
      types run as one group (:func:`fop_optax._grouping.group_map`)."""
      return _grouping.group_map(lambda i, *row: fn(structs[i], *row),
                                 _group_keys(structs, columns), *columns)

    # The online step (fop_optax.online) with FOP's closed-form hypergradient,
    # the default Adam's per-leaf calibration and the guard as its projection.
    # w = (M's tree, their spans' list): the hyper step moves the M's only; the spans
    # stay as they came (for the previous M's), and the spans to keep come out of
    # apply and project_and_apply beside P·G, made for the M's and inputs they used.
    def hypergradients(w, last_gradient, gradient):
      ms, spans = w
      return m_def.unflatten(_replicate_matrices(structs, per_leaf(
          lambda s, m, span, g, gp: hypergradient(s, m, span, g, gp).astype(m.dtype),
          jax.tree.leaves(ms), spans, jax.tree.leaves(gradient),
          jax.tree.leaves(last_gradient)), gs))

    def calibrate_step(hyper_updates):
      return m_def.unflatten([
          u * s.hyper_step_scale(tuple(g.shape))
          for s, u, g in zip(structs, jax.tree.leaves(hyper_updates), gs)])

    optax_step = online.optax_hyper_step(hyper_optimizer, calibrate_step if calibrate else None)

    def hyper_step(hypergrads, hyper_state, w):
      ms, spans = w
      ms, hyper_state = optax_step(hypergrads, hyper_state, ms)
      return (ms, spans), hyper_state

    # The outputs of both branches are (P·G per leaf, the spans to keep): a step that
    # does not learn keeps the M's and stores the span of their new input.
    def apply(w, inputs):
      ms, spans = w
      pairs = per_leaf(precondition_and_span, jax.tree.leaves(ms), spans, inputs)
      return ([out for out, _ in pairs],
              _replicate_matrices(structs, [span for _, span in pairs], gs))

    def project_and_apply(w, inputs):
      ms, spans_before = w
      triples = per_leaf(project_and_precondition, jax.tree.leaves(ms), inputs)
      return ((m_def.unflatten(_replicate_matrices(structs, [m for m, _, _ in triples], gs)),
               spans_before),
              ([out for _, out, _ in triples],
               _replicate_matrices(structs, [span for _, _, span in triples], gs)))

    # The first call has no previous step to learn from; with update_every = k only
    # calls k, 2k, ... learn. lax.cond: the skipped calls do none of the work.
    (preconditioners, _), hyper_state, (outs, spans) = online.online_step(
        state.count, (state.preconditioners, spans_in), state.hyper_state,
        state.last_gradient, updates, gs,
        hypergradient=hypergradients, hyper_step=hyper_step,
        apply=apply, project_and_apply=project_and_apply, every=every)
    preconditioners = m_def.unflatten(
        _replicate_matrices(structs, jax.tree.leaves(preconditioners), gs))
    new_updates = jax.tree.structure(updates).unflatten(outs)
    return new_updates, FopState(
        count=numerics.safe_increment(state.count),
        preconditioners=preconditioners,
        last_gradient=optax.tree.cast_like(updates, state.last_gradient),
        hyper_state=hyper_state,
        # (both branches of the online step leave them replicated: spans_in and
        # project_and_apply's are pinned with the gradients' mesh)
        spans=m_def.unflatten(spans) if keep_spans else (),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
