r"""Series saddle-free Newton: ``(|H| + λI)⁻¹g`` from Hessian-vector products.

Oldewage, Clarke and Hernández-Lobato approximate the saddle-free Newton
direction, with ``|H| = (H²)^{1/2}`` the Hessian with its eigenvalues' signs
dropped, by a truncated series that needs only Hessian-vector products. With
a scale ``V > λ_max(H²)/2``, ``X = I − H²/V`` and ``a = λ/√V``,

.. math::
  (|H| + λI)^{-1} g = V^{-1/2} \big(\sqrt{I − X} + aI\big)^{-1} g
    = V^{-1/2} \sum_{k≥0} d_k X^k g,

the Taylor series of ``1/(√(1 − x) + a)``. ``d_k`` is computed as the Cauchy
quotient of the series of ``√(1 − x) = Σ b_k x^k`` (``b_0 = 1``,
``b_k = b_{k−1}(k − 3/2)/k``) by ``1 + a``: ``d_0 = 1/(1 + a)``,
``d_k = −Σ_{j=1..k} b_j d_{k−j}/(1 + a)``. This equals the reference's
recurrence ``d_k = (d_{k−1} + b_k)/(1 − a²)`` in exact arithmetic, but the
recurrence amplifies rounding by ``(1 − a²)^{-k}`` and is singular at
``a = 1``; the quotient stays accurate for every ``a ≥ 0``. ``K`` terms cost
``K − 1`` products with ``H²``, i.e. ``2(K − 1)`` Hessian-vector products.

The last ``2r + 1`` partial sums are extrapolated by Wynn's vector
ε-algorithm (Samelson inverse ``v⁻¹ = v/(vᵀv)``), which for ``r = 1`` is
``S₁ + [(S₂ − S₁)⁻¹ − (S₁ − S₀)⁻¹]⁻¹``; where it is not finite (e.g. the
series has converged exactly) the last partial sum is used.

Scale: ``scale='bound'`` is the reference's rule,
``V_t = max(V_{t−1}, ‖H²g‖/‖g‖)`` from ``V_0``, free (it reuses the first
product ``H²g``) but only a *lower* bound on ``λ_max(H²)``: the series
diverges where ``λ_max(H²) ≥ 2V``. ``scale='power_iteration'`` runs
``power_iterations`` warm-started power iterations on ``H²`` per step
(``2·power_iterations`` more HVPs) and takes ``V_t = scale_margin·v̂ᵀH²v̂``
(the Rayleigh quotient; ``V_{t−1}`` where it is 0), not kept non-decreasing:
an estimate of ``λ_max(H²)`` itself rather than a lower bound, so it is the
safe scale where ``‖H²g‖/‖g‖`` underestimates the top eigenvalue.

Step: with ``u`` the (accelerated) series, the previous step ``δ`` and a
buffer ``b ≈ Cδ`` of the curvature ``C`` the series implies (``Cu = g``),
the adaptive step size and momentum solve the K-FAC-style 2×2 system

.. math::
  \begin{pmatrix} uᵀg & δᵀg \\ δᵀg & δᵀb \end{pmatrix}
  \begin{pmatrix} α \\ μ \end{pmatrix} = \begin{pmatrix} gᵀu \\ gᵀδ \end{pmatrix}

(``δᵀb`` replaced by 1 where it is 0), ``Δ = αu + μδ``, ``θ ← θ − Δ``,
``b ← μb + αg``. Its first column equals its right-hand side, so in exact
arithmetic its solution is ``α = 1, μ = 0`` whenever the matrix is regular:
the series is taken to be the model's exact minimiser. (The reference
multiplies ``δᵀb`` by the previous ``α``, which changes nothing here.)
``adaptive=False`` uses a fixed ``learning_rate`` and ``momentum`` instead.
Damping: ``f' = f(θ − Δ)`` on the same batch, the model's prediction
``M = ½[α μ]A[α μ]ᵀ − [α μ]·rhs``, ``ρ = (f' − f)/M``;
``λ ← damping_factor·λ`` if ``ρ > 3/4``, ``λ/damping_factor`` if
``ρ < 1/4``, ``λ ≥ min_damping``
(:func:`fop_optax._damping.levenberg_marquardt`, shared with
:func:`fop_optax.scale_by_qlr`). A step the model did not predict is a failure
whatever ``ρ`` says: where ``M ≥ 0`` (the model predicts no decrease, e.g. a
series that diverged because ``V ≤ λ_max(H²)/2`` and ``uᵀg ≤ 0``), where
``f' > f``, or where ``f'`` is not finite, ``λ ← λ/damping_factor``; ``ρ`` is
then reported as the plain ratio, or ``−∞`` where that is undefined (``M = 0``,
non-finite ``f'``). A null step (``M = 0`` and ``f' = f``, e.g. ``g = 0``) keeps
``λ`` and reports ``ρ = 1`` (see ``CHANGELOG.md``, 0.2.0, for the rule before).

References:
  Oldewage, Clarke and Hernández-Lobato, `Series of Hessian-Vector Products
  for Tractable Saddle-Free Newton Optimisation of Neural Networks
  <https://arxiv.org/abs/2310.14901>`_, TMLR 2024.

  Wynn, On a device for computing the e_m(S_n) transformation, 1956;
  Wynn, Acceleration techniques for iterated vector and matrix problems, 1962.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fop_optax import _checks
from fop_optax import _damping
from fop_optax import curvature as curvature_lib
from fop_optax import nonfinite

__all__ = [
    'SeriesSfnState', 'damped_coefficients', 'damped_coefficients_recurrence',
    'quasi_damped_coefficients', 'series_sfn', 'wynn_epsilon', 'SCALES', 'SERIES',
]

SCALES = ('bound', 'power_iteration')
SERIES = ('damped', 'quasi_damped')


class SeriesSfnState(NamedTuple):
  """State of :func:`series_sfn`.

  Attributes:
    count: steps taken (int32).
    damping: ``λ`` for the next step.
    scale: ``V`` (non-decreasing with ``scale='bound'``).
    step_size: the last ``α``.
    momentum: the last ``μ``.
    rho: the last reduction ratio ``ρ`` (1 before the first step and after
      a null step; ``−∞`` where undefined: ``M = 0`` or ``f'`` not finite).
    last_update: ``δ``, the last step ``Δ`` (params-shaped; ``θ ← θ − Δ``).
    curvature_buffer: ``b ≈ Cδ`` (params-shaped).
    power_vector: the power iteration's warm start (params-shaped), or
      ``None`` with ``scale='bound'``.
  """

  count: jax.Array
  damping: jax.Array
  scale: jax.Array
  step_size: jax.Array
  momentum: jax.Array
  rho: jax.Array
  last_update: Any
  curvature_buffer: Any
  power_vector: Any


# ------------------------------------------------------------------ coefficients

def _sqrt_series(num_terms: int) -> np.ndarray:
  """``b_k``: Taylor coefficients of ``√(1 − x)``."""
  b = np.ones(num_terms)
  for k in range(1, num_terms):
    b[k] = b[k - 1] * (k - 1.5) / k
  return b


def damped_coefficients(a, num_terms: int) -> jax.Array:
  """``d_k`` of ``1/(√(1 − x) + a) = Σ d_k x^k`` by the stable Cauchy quotient.

  Forward substitution of ``(1 + a)·d_k + Σ_{j=1..k} b_j d_{k−j} = [k = 0]``
  in one ``lax.fori_loop`` (so a long series traces once).
  """
  a = jnp.asarray(a)
  b = jnp.asarray(_sqrt_series(num_terms), a.dtype)
  inv = 1 / (1 + a)
  d = jnp.zeros(num_terms, a.dtype).at[0].set(inv)
  lags = jnp.arange(1, num_terms)

  def body(k, d):
    index = k - lags
    acc = jnp.sum(jnp.where(index >= 0, b[1:] * d[jnp.maximum(index, 0)], 0))
    return d.at[k].set(-acc * inv)

  return jax.lax.fori_loop(1, num_terms, body, d)


def damped_coefficients_recurrence(a, num_terms: int) -> jax.Array:
  """The reference's recurrence ``d_k = (d_{k−1} + b_k)/(1 − a²)`` (unstable; for tests)."""
  a = jnp.asarray(a)
  b = _sqrt_series(num_terms)
  q = 1 / (1 - a * a)
  d = [1 / (1 + a)]
  for k in range(1, num_terms):
    d.append(q * (d[-1] + b[k]))
  return jnp.stack(d)


def quasi_damped_coefficients(num_terms: int, dtype=jnp.float32) -> jax.Array:
  """``c_k`` of ``(1 − x)^{−1/2} = Σ c_k x^k``: ``c_k = c_{k−1}(2k − 1)/(2k)``."""
  c = np.ones(num_terms)
  for k in range(1, num_terms):
    c[k] = c[k - 1] * (2 * k - 1) / (2 * k)
  return jnp.asarray(c, dtype)


# ------------------------------------------------------------------ acceleration

def wynn_epsilon(sums: Sequence[Any], dtype=None):
  """Wynn's vector ε-algorithm on ``2r + 1`` partial sums (pytrees); returns ``ε_{2r}``.

  ``ε_{−1} = 0``, ``ε_0^{(n)} = S_n``,
  ``ε_{k+1}^{(n)} = ε_{k−1}^{(n+1)} + (ε_k^{(n+1)} − ε_k^{(n)})⁻¹`` with the
  Samelson inverse ``v⁻¹ = v/(vᵀv)`` (a global dot product over the tree):
  the vector form of the Shanks transformation. The result may be non-finite
  (e.g. two equal sums); the caller decides what to do then.
  """
  sums = list(sums)
  if len(sums) % 2 != 1:
    raise ValueError(f'wynn_epsilon: needs an odd number (2r + 1) of sums, got {len(sums)}')
  dtype = curvature_lib.scalar_dtype(sums[0]) if dtype is None else dtype

  def inverse(v):
    nrm = curvature_lib.tree_vdot(v, v, dtype)
    return jax.tree.map(lambda x: (x / nrm.astype(x.dtype)), v)

  previous = [None] * (len(sums) + 1)  # ε_{−1}: zeros
  current = sums
  for _ in range(len(sums) - 1):
    nxt = []
    for n in range(len(current) - 1):
      diff = jax.tree.map(jnp.subtract, current[n + 1], current[n])
      inv = inverse(diff)
      base = previous[n + 1]
      nxt.append(inv if base is None else jax.tree.map(jnp.add, base, inv))
    previous, current = current, nxt
  return current[0]


def series_sfn(
    num_terms: int = 20,
    acceleration_order: int = 1,
    *,
    initial_damping: float = 1.0,
    damping_factor: Optional[float] = 0.9,
    min_damping: float = 1e-8,
    initial_scale: float = 100.0,
    scale: str = 'bound',
    power_iterations: int = 2,
    scale_margin: float = 1.0,
    series: str = 'damped',
    adaptive: bool = True,
    learning_rate: float = 1.0,
    momentum: float = 0.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Series saddle-free Newton (Oldewage et al., "OursAdaptive" by default).

  Terminal: it emits the final update ``−Δ``. ``update(updates, state, params,
  *, value=None, grad=None, value_fn)`` (optax's names): ``value_fn(params) ->
  scalar`` is the loss on the batch the gradient came from (its HVPs make the
  series); ``value`` is ``f(params)``, computed with ``value_fn`` when not
  given and the damping adapts; ``grad`` is ``∇f(params)``, the model's linear
  term (``uᵀ∇f``, ``Δᵀ∇f``), taken from the linearisation the HVPs already
  make when not given. The series is applied to ``updates`` (the gradient, or
  what a chain before this made of it), whose products also stand in for the
  curvature terms (``uᵀHu ≈ uᵀ·updates``); with ``updates`` the plain
  gradient both readings agree.

  Args:
    num_terms: ``K``, terms of the series (``2(K − 1)`` HVPs per step).
    acceleration_order: ``r`` of Wynn's ε-algorithm on the last ``2r + 1``
      partial sums (``K ≥ 2r + 1``); 0 for none.
    initial_damping: ``λ_0``.
    damping_factor: the damping's factor (0.9): ``λ ← damping_factor·λ`` on
      a success (``ρ > 3/4``), ``λ/damping_factor`` on a failure (``ρ < 1/4``,
      ``M ≥ 0``, ``f' > f`` or non-finite ``f'``); ``None`` keeps ``λ`` fixed
      and skips the extra forward pass.
    min_damping: lower bound on ``λ``.
    initial_scale: ``V_0`` (100).
    scale: ``'bound'`` (the reference's ``max(V, ‖H²g‖/‖g‖)``) or
      ``'power_iteration'`` (see the module docstring).
    power_iterations: products with ``H²`` per step for
      ``'power_iteration'``.
    scale_margin: ``V = scale_margin·(estimate)`` for ``'power_iteration'``.
    series: ``'damped'`` (``(|H| + λI)⁻¹g``) or ``'quasi_damped'``
      (``(H² + λI)^{−1/2}g``).
    adaptive: adaptive step size and momentum; ``False`` uses
      ``learning_rate`` and ``momentum``.
    learning_rate, momentum: the fixed ``α``, ``μ`` when ``adaptive=False``.
    skip_nonfinite: wrap in :func:`fop_optax.skip_nonfinite`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(x): return jnp.sum(jnp.array([1., 10.]) * x ** 2)
    >>> tx = fop_optax.series_sfn(num_terms=10)
    >>> params = jnp.array([1., 2.])
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   value, grad = jax.value_and_grad(f)(params)
    ...   updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
    ...   params = optax.apply_updates(params, updates)
    ...   print('f: {:.2E}'.format(f(params)))
    f: 3.88E-01
    f: 8.54E-02
    f: 2.35E-02

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SeriesSfnState` (inside a ``SkipNonFiniteState`` by default).
  """
  where = 'series_sfn'
  for name, value, low in (('num_terms', num_terms, 1),
                           ('acceleration_order', acceleration_order, 0),
                           ('power_iterations', power_iterations, 1)):
    _checks.check_int(name, value, minimum=low, where=where)
  if num_terms < 2 * acceleration_order + 1:
    raise ValueError(
        f'{where}: acceleration_order={acceleration_order} needs num_terms >= '
        f'{2 * acceleration_order + 1} (2r + 1 partial sums), got {num_terms}')
  if scale not in SCALES:
    raise ValueError(f'{where}: scale must be one of {SCALES}, got {scale!r}')
  if series not in SERIES:
    raise ValueError(f'{where}: series must be one of {SERIES}, got {series!r}')
  _checks.check_number('initial_damping', initial_damping, allow_zero=True, where=where)
  _checks.check_number('min_damping', min_damping, allow_zero=True, where=where)
  _checks.check_number('initial_scale', initial_scale, allow_zero=False, where=where)
  _checks.check_number('scale_margin', scale_margin, allow_zero=False, where=where)
  _checks.check_number('learning_rate', learning_rate, allow_zero=True, where=where)
  _checks.check_number('momentum', momentum, allow_zero=True, where=where)
  if damping_factor is not None:
    _checks.check_number('damping_factor', damping_factor, allow_zero=False, where=where)
    if isinstance(damping_factor, numbers.Real) and not 0 < damping_factor < 1:
      raise ValueError(f'{where}: damping_factor must be in (0, 1) or None, got {damping_factor}')
  window = 2 * acceleration_order + 1 if acceleration_order else 1

  def init_fn(params):
    dtype = curvature_lib.scalar_dtype(params)
    zeros = optax.tree.zeros_like(params)
    return SeriesSfnState(
        count=jnp.zeros([], jnp.int32),
        damping=jnp.asarray(initial_damping, dtype),
        scale=jnp.asarray(initial_scale, dtype),
        step_size=jnp.zeros([], dtype),
        momentum=jnp.zeros([], dtype),
        rho=jnp.ones([], dtype),
        last_update=zeros,
        curvature_buffer=optax.tree.zeros_like(params),
        power_vector=optax.tree.zeros_like(params) if scale == 'power_iteration' else None,
    )

  def update_fn(updates, state, params=None, *, value=None, grad=None, value_fn=None,
                **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f'{where}: update() needs params (the Hessian is taken at them)')
    _checks.require_closures(
        where, {'value_fn': value_fn},
        'value_fn(params) -> the loss on the batch the gradient came from (its Hessian-vector '
        'products make the series), as in tx.update(grads, state, params, value=loss, '
        'grad=grads, value_fn=loss_fn)')
    g = updates
    dtype = curvature_lib.scalar_dtype(params)
    vdot = lambda a, b: curvature_lib.tree_vdot(a, b, dtype)
    gradient, hvp = curvature_lib.hvp_fn(value_fn, params)
    if grad is not None:
      gradient = grad

    def h2(v):
      return hvp(hvp(v))

    damping = state.damping.astype(dtype)
    old_scale = state.scale.astype(dtype)
    power_vector = state.power_vector
    g_norm = jnp.sqrt(vdot(g, g))
    if num_terms > 1:
      h2g = h2(g)
    if scale == 'bound':
      if num_terms > 1:
        estimate = jnp.sqrt(vdot(h2g, h2g)) / jnp.where(g_norm > 0, g_norm, 1)
        new_scale = jnp.maximum(old_scale, jnp.where(jnp.isfinite(estimate), estimate, 0))
      else:
        new_scale = old_scale
    else:
      started = vdot(power_vector, power_vector) > 0
      v = optax.tree.where(started, power_vector, g)

      def normalise(v):
        n = jnp.sqrt(vdot(v, v))
        return jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1).astype(x.dtype), v)

      v = normalise(v)
      estimate = jnp.zeros([], dtype)
      for _ in range(power_iterations):
        w = h2(v)
        estimate = vdot(v, w)
        v = normalise(w)
      power_vector = jax.tree.map(lambda x, p: x.astype(p.dtype), v, params)
      estimate = jnp.where(jnp.isfinite(estimate), estimate, 0)
      # Not kept non-decreasing: after a steep region the top of H² falls, and a
      # V stuck high slows the series along every direction (the reference's
      # power mode also starts afresh each step).
      new_scale = jnp.where(estimate > 0, scale_margin * estimate, old_scale)

    if series == 'damped':
      eff_scale = new_scale
      coefficients = damped_coefficients(damping / jnp.sqrt(new_scale), num_terms)
      decay = jnp.zeros([], dtype)
    else:
      eff_scale = new_scale + damping
      coefficients = quasi_damped_coefficients(num_terms, dtype)
      decay = damping
    coefficients = coefficients.astype(dtype)

    def next_term(v, h2v):
      return jax.tree.map(lambda x, y: x - ((decay * x + y) / eff_scale).astype(x.dtype), v, h2v)

    def shift(buffer, s):
      return jax.tree.map(lambda b, x: jnp.concatenate([b[1:], x[None]], axis=0), buffer, s)

    partial_sum = jax.tree.map(lambda x: coefficients[0].astype(x.dtype) * x, g)
    buffer = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (window,) + x.shape), partial_sum)
    if num_terms > 1:
      v = next_term(g, h2g)
      partial_sum = jax.tree.map(lambda s, x: s + coefficients[1].astype(x.dtype) * x,
                                 partial_sum, v)
      buffer = shift(buffer, partial_sum)

      def body(carry, coefficient):
        v, s, buf = carry
        v = next_term(v, h2(v))
        s = jax.tree.map(lambda a, x: a + coefficient.astype(x.dtype) * x, s, v)
        return (v, s, shift(buf, s)), None

      if num_terms > 2:
        (v, partial_sum, buffer), _ = jax.lax.scan(
            body, (v, partial_sum, buffer), coefficients[2:])
    if acceleration_order:
      sums = [jax.tree.map(lambda b, i=i: b[i], buffer) for i in range(window)]
      accelerated = wynn_epsilon(sums, dtype)
      ok = nonfinite._all_finite(accelerated)
      partial_sum = optax.tree.where(ok, accelerated, partial_sum)
    root = jnp.sqrt(eff_scale)
    u = jax.tree.map(lambda x, p: (x / root.astype(x.dtype)).astype(p.dtype), partial_sum, params)

    delta = state.last_update
    # The quadratic model in (α, μ): curvature terms from the series' input
    # (uᵀHu ≈ uᵀg, ΔᵀHu ≈ Δᵀg, ΔᵀHΔ ≈ Δᵀb), linear terms from the gradient.
    ug = vdot(u, g)
    dg = vdot(delta, g)
    db = vdot(delta, state.curvature_buffer)
    u_grad = vdot(u, gradient)
    d_grad = vdot(delta, gradient)
    if adaptive:
      db_solve = jnp.where(db == 0, 1, db)
      det = ug * db_solve - dg * dg
      ok = (det != 0) & jnp.isfinite(det)
      safe = jnp.where(ok, det, 1)
      alpha = jnp.where(ok, (u_grad * db_solve - dg * d_grad) / safe, 1)
      mu = jnp.where(ok, (ug * d_grad - dg * u_grad) / safe, 0)
    else:
      db_solve = db
      alpha = jnp.asarray(learning_rate, dtype)
      mu = jnp.asarray(momentum, dtype)
    alpha = alpha.astype(dtype)
    mu = mu.astype(dtype)
    step = jax.tree.map(lambda x, y, p: (alpha * x + mu * y).astype(p.dtype), u, delta, params)
    new_updates = jax.tree.map(jnp.negative, step)
    buffer_b = jax.tree.map(lambda b, x, p: (mu * b + alpha * x).astype(p.dtype),
                            state.curvature_buffer, g, params)

    if damping_factor is None:
      rho = state.rho
      new_damping = state.damping
    else:
      if value is None:
        value = value_fn(params)
      value = jnp.asarray(value).astype(dtype)
      new_value = jnp.asarray(value_fn(optax.apply_updates(params, new_updates))).astype(dtype)
      predicted = (0.5 * (alpha * alpha * ug + 2 * alpha * mu * dg + mu * mu * db_solve)
                   - alpha * u_grad - mu * d_grad)
      rho, new_damping = _damping.levenberg_marquardt(
          damping, new_value - value, predicted, decrease=damping_factor,
          increase=1 / damping_factor, min_damping=min_damping)
    return new_updates, SeriesSfnState(
        count=optax.safe_increment(state.count),
        damping=jnp.asarray(new_damping).astype(state.damping.dtype),
        scale=new_scale.astype(state.scale.dtype),
        step_size=alpha.astype(state.step_size.dtype),
        momentum=mu.astype(state.momentum.dtype),
        rho=jnp.asarray(rho).astype(state.rho.dtype),
        last_update=step,
        curvature_buffer=buffer_b,
        power_vector=power_vector,
    )

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return nonfinite.for_alias(tx, skip_nonfinite)
