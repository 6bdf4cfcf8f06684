"""``low_rank``: ``M = I + UVᵀ`` with ``U, V`` (a×r), for large dense and attention kernels.

``P = MᵀM`` equals ``I`` outside ``span(U, V)``, so its eigenpairs other than 1
are those of a (2r×2r) matrix on an orthonormal basis ``Q`` of that span: the
guard clips them there (``P̃ = I + Q·min(A, B − 1)·Qᵀ`` for ``A = Qᵀ(P − I)Q``)
with the same two passes over the gradient as ``P·G``, and the hypergradient is
that of ``P̃`` (Daleckii–Krein, :meth:`LowRank._clipped_sx`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fop_optax import _grouping
from fop_optax import _linalg
from fop_optax import _sharding
from fop_optax.structures._base import Layout, Structure, register
from fop_optax.structures._matrix import (
    REFERENCE_ROWS, _contract_cols, _contract_rows, _divided_differences, _expand_rows,
    _orthonormal_columns, _pair, _rows, _snap)

# Low rank keeps its raw M within λ_max(MᵀM) ≤ 2B (LowRank.clip), found by bisection to 2⁻¹⁶.
_STATE_BOUND_FACTOR = 2.0
_BISECTION_STEPS = 16
# The rank a label or the default rule gives low_rank.
DEFAULT_RANK = 8


@register('low_rank')
@dataclasses.dataclass(frozen=True)
class LowRank(Structure):
  """``M = I + UVᵀ`` with ``U, V`` of shape (a×r): O(a·r) memory, O(a·r·b) work.

  ``U`` starts as a random orthonormal basis and ``V`` at zero (so ``P = I``,
  and the hypergradient of ``V`` is nonzero from the first step, like LoRA). ``m``
  stores ``U`` and ``V`` stacked as an array of shape ``(2, a, r)``.

  Attributes:
    rank: ``r``; clipped to ``a``.
    row_axes: as for :class:`Full`.
    normalize: FOP-norm, as for :class:`Full`.
    max_scale: the guard, as for :class:`Full` (``P``'s eigenvalues in
      ``span(U, V)`` above ``B`` clipped; ``P = I`` elsewhere).
  """

  rank: int = 8
  row_axes: int = 1
  normalize: bool = False
  max_scale: float | None = None

  takes_row_axes = True
  needs_rows = True

  @classmethod
  def from_label(cls, **rule_kwargs):
    rank = rule_kwargs.get('rank')
    return cls(rank=DEFAULT_RANK if rank is None else rank,
               normalize=rule_kwargs.get('normalize', False))

  def with_row_axes(self, row_axes):
    return dataclasses.replace(self, row_axes=row_axes)

  def validate(self, shape):
    if self.rank < 1:
      raise ValueError(f'low_rank needs rank >= 1, got {self.rank}')
    if not 1 <= self.row_axes <= len(shape):
      raise ValueError(
          f'{self!r} needs a leaf with at least {self.row_axes} axes, got shape {shape}')

  def init(self, shape, dtype, key):
    a = _rows(shape, self.row_axes)
    r = min(self.rank, a)
    # Gram–Schmidt rather than jnp.linalg.qr: under jax.vmap (one optimiser state per
    # seed) a batched LAPACK QR can deadlock XLA:CPU's thread pool (jax 0.10, 2 cores:
    # its workers wait in ParallelBatchMap for tasks queued behind themselves).
    u = _orthonormal_columns(jax.random.normal(key, (a, r), jnp.float32))
    return jnp.stack([u, jnp.zeros_like(u)]).astype(dtype)

  @staticmethod
  def _m(m, x):   # M·x
    return x + m[0] @ (m[1].T @ x)

  @staticmethod
  def _basis(m):
    """``(Q, T)``: an orthonormal basis ``Q`` (a×k) of a space holding ``span(U, V)``, ``T = Qᵀ[U, V]``.

    ``span(U, V)`` is invariant under ``P = MᵀM`` and ``P = I`` on its complement,
    so ``P``'s eigenpairs other than 1 are those of ``Qᵀ P Q`` (k×k), with
    eigenvectors ``Q·y``. ``Q`` is the Householder QR (LAPACK) of ``[U, V]`` with
    unit-norm columns (``M`` only depends on ``UVᵀ``, so ``U`` and ``V`` can differ in
    scale by orders of magnitude): orthonormal to rounding and spanning every column
    to rounding, also where ``[U, V]`` is rank-deficient (``V = 0`` at the start, or
    of rank one after Adam's sign-like first steps), where its extra columns are
    directions with ``P = I``. ``[U, V] = Q T`` with ``T = R·diag(‖column‖)``, so every
    other small matrix of the guard comes from ``T`` without another pass over the
    (a×2r) factors. ``k = 2r``, or ``Q = I`` (``k = a``) when ``2r ≥ a``.
    (A QR rather than Gram–Schmidt in a loop, whose small products each pay a fixed
    cost per iteration.)
    """
    b = jnp.concatenate([m[0], m[1]], axis=1)
    if b.shape[1] >= b.shape[0]:   # span(U, V) may be everything: take Q = I
      return jnp.eye(b.shape[0], dtype=m.dtype), b
    d = jnp.sqrt(jnp.sum(jnp.square(b), axis=0))
    q, r = _linalg.qr(b / jnp.where(d > 0, d, 1.0))
    return q, r * d

  @staticmethod
  def _core(t, c=1.0):
    """``A = Qᵀ(P − I)Q = c(T_U T_Vᵀ + T_V T_Uᵀ) + c² T_V (UᵀU) T_Vᵀ`` for ``M = I + c·UVᵀ``.

    ``P − I = UVᵀ + VUᵀ + V(UᵀU)Vᵀ`` with ``[U, V] = Q T``; ``UᵀU = T_Uᵀ T_U``. Formed
    without the ``I`` it is added to, so small eigenvalues keep their precision.
    """
    r = t.shape[1] // 2
    tu, tv = t[:, :r], t[:, r:]
    cross = c * (tu @ tv.T)
    a = cross + cross.T + (c * c) * (tv @ ((tu.T @ tu) @ tv.T))
    return 0.5 * (a + a.T)

  def _span(self, m):
    """``(Q, T, μ, W)``: ``P = I + Q (W diag(μ) Wᵀ) Qᵀ`` with ``Q, T`` from :meth:`_basis`.

    ``μ`` (ascending) and ``W`` are the eigenpairs of :meth:`_core`; ``P``'s
    eigenvalues on ``span(Q)`` are ``1 + μ`` with eigenvectors ``Φ = Q W``.
    """
    q, t = self._basis(m)
    mu, w = _linalg.eigh(self._core(t))
    return q, t, mu, w

  def span(self, m, g):
    """``(M, Q, T, μ, W, QᵀG)``: ``M``, its span basis and eigenpairs under the guard, and ``QᵀG`` (``()`` without the guard).

    Kept in the state by :func:`fop_optax.scale_by_fop` for the input ``g`` the
    step preconditioned (the next step's ``G_{t-1}``), so that the next step's
    hypergradient and a step that does not learn reuse the basis and eigenpairs
    this step computed, instead of a QR and an eigensolver each, and the
    hypergradient reuses ``QᵀG_{t-1}`` instead of a pass over ``G_{t-1}``.
    """
    if not self._clips or self._empty(m):
      return ()
    return (m,) + self._span_of(m, g=g)

  def _span_of(self, m, span=(), g=None):
    """The span basis and eigenpairs of ``m`` (and ``QᵀG`` for a given ``g``), from ``span`` when it was made for this very ``m``.

    A ``span`` for another ``m`` (the state's matrices replaced by hand, say) is
    never used: the check is exact equality, and the basis is then recomputed.
    With ``g``, ``span``'s ``QᵀG`` is taken as that of ``g``: a ``span`` must
    come from :meth:`span` (or the step that made it) for this ``g``, as
    :func:`fop_optax.scale_by_fop` passes the previous step's span with the
    gradient that step preconditioned.
    """
    def fresh():
      q, t, mu, w = self._span(m)
      if g is None:
        return q, t, mu, w
      return q, t, mu, w, _contract_rows(q, g.astype(q.dtype), self.row_axes)

    if not span:
      return fresh()
    # Both branches replicated under an explicit mesh, so that their types agree.
    m0, cached = span[0], span[1:5] if g is None else span[1:]
    return _grouping.cond(jnp.array_equal(m0, m),
                          lambda: tuple(_sharding.replicate(x) for x in cached),
                          lambda: tuple(_sharding.replicate(x) for x in fresh()))

  def init_span(self, m, shape):
    """A span of zeros: no solver runs in ``init``.

    Its ``M`` (0) differs from ``init``'s (``U`` orthonormal), so the first step
    decomposes its ``M`` itself; and for ``M = 0`` (``P = I``) the zeros are exact
    (every product with them is what the decomposition of ``P = I`` gives: 0).
    """
    if not self._clips or self._empty(m):
      return ()
    like = jax.ShapeDtypeStruct(tuple(shape), m.dtype)
    return tuple(jnp.zeros(x.shape, x.dtype) for x in jax.eval_shape(self.span, m, like))

  def _eigen(self, m):
    """``(λ, Φ)``: ``P``'s eigenvalues on ``span(Q)`` (ascending) and unit eigenvectors (a×k)."""
    q, _, mu, w = self._span(m)
    return 1 + mu, q @ w

  def _top(self, m):
    """``(λ_max(P), v)``: ``v`` its unit eigenvector in ``span(U, V)``, or 0 where ``λ_max = 1``.

    ``λ_max = max(λ_span)``, and at least 1 whenever ``a > 2r`` (``P = I`` on the complement).
    """
    if self._empty(m):
      return jnp.ones((), m.dtype), jnp.zeros(m.shape[1], m.dtype)
    lam, phi = self._eigen(m)
    has_complement = phi.shape[0] > phi.shape[1]
    grows = lam[-1] > 1 if has_complement else jnp.array(True)
    top = jnp.maximum(lam[-1], 1.0) if has_complement else lam[-1]
    return top, jnp.where(grows, phi[:, -1], jnp.zeros_like(phi[:, -1]))

  def _scale(self, m):
    """``(s, λ, v)``: ``P̃ = s·P`` (``s = 1/λ_max`` with normalize, else 1)."""
    if not self.normalize:
      return 1.0, None, None
    lam, v = self._top(m)
    return 1.0 / lam, lam, v

  def _clipped_core(self, mu, w):
    """``W diag(min(μ, B − 1)) Wᵀ``: the guard's ``P̃ = I + Q (·) Qᵀ``, ``λ(P̃) = min(λ(P), B)``."""
    return (w * jnp.minimum(mu, self.max_scale - 1)) @ w.T

  @property
  def _clips(self):
    return self.max_scale is not None and not self.normalize

  @staticmethod
  def _empty(m):
    return m.shape[1] == 0 or m.shape[2] == 0   # a zero-size leaf

  @staticmethod
  def _factors(m):
    """``L = [U, V]`` and ``R = [V, MᵀU]`` (a×2r) with ``P = I + L Rᵀ``.

    ``MᵀM = (I + VUᵀ)(I + UVᵀ) = I + UVᵀ + V(U + VUᵀU)ᵀ`` and ``MᵀU = U + V(UᵀU)``.
    """
    u, v = m[0], m[1]
    mtu = u + v @ (u.T @ u)
    return jnp.concatenate([u, v], axis=1), jnp.concatenate([v, mtu], axis=1)

  def precondition(self, m, g, span=()):
    x = g.astype(m.dtype)
    rows = self.row_axes
    if self._clips and not self._empty(m):
      q, _, mu, w = self._span_of(m, span)
      return self._clipped_apply(q, mu, w, g)[0]
    s, _, _ = self._scale(m)
    left, right = self._factors(m)
    # P·G = G + L (Rᵀ G): two (a×2r)-wide products, each one pass over G.
    out = s * (x + _expand_rows(left, _contract_rows(right, x, rows), x, rows))
    return out.astype(g.dtype)

  def precondition_and_span(self, m, g, span=()):
    if not self._clips or self._empty(m):
      return super().precondition_and_span(m, g, span)
    q, t, mu, w = self._span_of(m, span)
    out, qg = self._clipped_apply(q, mu, w, g)
    return out, (m, q, t, mu, w, qg)

  def _clipped_apply(self, q, mu, w, g):
    """``(P̃·G, QᵀG)``, ``P̃·G = G + Q (W min(μ, B − 1) Wᵀ)(QᵀG)``: two passes over ``G``, as ``P·G``.

    ``λ_max(P̃) ≤ B`` by construction (``Q`` orthonormal), whatever the rounding in ``Q``.
    """
    x = g.astype(q.dtype)
    qg = _contract_rows(q, x, self.row_axes)
    z = jnp.tensordot(self._clipped_core(mu, w), qg, 1)
    return (x + _expand_rows(q, z, x, self.row_axes)).astype(g.dtype), qg

  def hypergradient(self, m, g, g_prev, learning_rate, span=()):
    gt, gp = g.astype(m.dtype), g_prev.astype(m.dtype)
    rows = self.row_axes
    u, v = m[0], m[1]
    # With H = ∂J/∂M = −η M S, S = G_t G_pᵀ + G_p G_tᵀ (never formed):
    # ∂J/∂U = H V = −η M (S V) and ∂J/∂V = Hᵀ U = −η S (Mᵀ U); with
    # X = [V, MᵀU] both come from S X = G_t (G_pᵀ X) + G_p (G_tᵀ X).
    r = u.shape[1]
    if self._clips and not self._empty(m):
      sx = self._clipped_sx(m, gt, gp, span)   # takes X̃ = QᵀX from the span basis
    else:
      left, x = self._factors(m)
      xgp = _contract_rows(x, gp, rows)
      sx = _contract_cols(gt, xgp, rows) + _contract_cols(gp, _contract_rows(x, gt, rows), rows)
    du, dv = self._m(m, sx[:, :r]), sx[:, r:]
    s, lam, top = self._scale(m)
    if self.normalize:
      # P̃ = P/λ: H = −(η/λ)[M S − (2/λ)⟨C, P⟩ M v vᵀ] (see Full.hypergradient), with
      # ⟨C, P⟩ = ⟨G_t, P G_p⟩ = ⟨G_t, G_p⟩ + ⟨Lᵀ G_t, Rᵀ G_p⟩; the extra term's
      # U-part is (Mv)(vᵀV) and its V-part v((Mv)ᵀU).
      cp = jnp.vdot(gt, gp) + jnp.vdot(_contract_rows(left, gt, rows), xgp)
      mv = self._m(m, top[:, None])[:, 0]
      du = du - (2 * cp / lam) * jnp.outer(mv, top @ v)
      dv = dv - (2 * cp / lam) * jnp.outer(top, mv @ u)
    return -learning_rate * s * jnp.stack([du, dv])

  def _clipped_sx(self, m, gt, gp, span=()):
    """``(Z + Zᵀ) X`` for the guard's ``P̃ = f(P)``, ``f = min(·, B)``, ``Z = ∂⟨C, f(P)⟩/∂P``.

    ``C = G_t G_pᵀ`` (never formed). Daleckii–Krein in ``P``'s eigenbasis
    ``[Φ, Ω]`` (``Φ = QW`` on ``span(Q)``, ``Ω`` the complement where ``P = I``):
    ``Z = C − Δ``, ``Δ = Φ A Φᵀ + Q₁ D Φᵀ + Φ D Q₂ᵀ`` with ``A = (1 − L) ∘ ΦᵀCΦ``
    (``L`` the divided differences of ``f`` on ``1 + μ``), ``D = diag((λ − B)₊/(λ − 1))``
    (one minus the divided difference between ``λ`` and the complement's 1),
    ``Q₁ = (I − ΦΦᵀ) C Φ`` and ``Q₂ = (I − ΦΦᵀ) Cᵀ Φ``. ``X = [V, MᵀU]`` lies in
    ``span(Q)`` (``X = Q X̃``), so ``(I − ΦΦᵀ)X = 0`` and every product with ``G_t``
    or ``G_p`` goes through ``QᵀG_t``, ``QᵀG_p``, ``CQ`` and ``CᵀQ``: four passes, as
    without the guard, and three where ``span`` holds ``QᵀG_p`` (the previous step
    computed it to precondition ``G_p``).
    """
    rows = self.row_axes
    q, t, mu, w, tp = self._span_of(m, span, gp)   # QᵀG_p: the span's, when it is for this M
    lam = 1 + mu
    tt = _contract_rows(q, gt, rows)                                       # QᵀG_t
    cq, ctq = _contract_cols(gt, tp, rows), _contract_cols(gp, tt, rows)   # C Q, Cᵀ Q
    qcq = _pair(tt, tp)                                                    # Qᵀ C Q
    r = t.shape[1] // 2
    tu, tv = t[:, :r], t[:, r:]
    xt = jnp.concatenate([tv, tu + tv @ (tu.T @ tu)], axis=1)              # X̃ = QᵀX
    fx = w.T @ xt                                                          # Φᵀ X
    a = (1 - _divided_differences(lam, self.max_scale)) * (w.T @ qcq @ w)   # on ΦᵀCΦ
    snapped = _snap(lam, self.max_scale)
    d = jnp.where(snapped > self.max_scale,
                  (snapped - self.max_scale) / jnp.where(snapped > 1, snapped - 1, 1.0), 0.0)
    dfx = w @ (d[:, None] * fx)
    # (C + Cᵀ)X − (Δ + Δᵀ)X = (CQ + CᵀQ)(X̃ − W D ΦᵀX) + Q[(QᵀCQ + QᵀCᵀQ) W D ΦᵀX − W (A + Aᵀ) ΦᵀX].
    return (cq + ctq) @ (xt - dfx) + q @ ((qcq + qcq.T) @ dfx - w @ ((a + a.T) @ fx))

  def matrix(self, m, shape):
    mm = self._m(m, jnp.eye(m.shape[1], dtype=m.dtype))
    s, _, _ = self._scale(m)
    p = s * (mm.T @ mm)
    if self._clips and not self._empty(m):
      q, _, mu, w = self._span(m)
      return jnp.eye(q.shape[0], dtype=q.dtype) + q @ self._clipped_core(mu, w) @ q.T
    return p

  def top_eigen(self, m):
    # ∂λ/∂M = 2 M v vᵀ; on U: (2 M v vᵀ) V, on V: (2 M v vᵀ)ᵀ U (v = 0 where λ_max = 1).
    lam, v = self._top(m)
    mv = self._m(m, v[:, None])[:, 0]
    return lam, 2 * jnp.stack([jnp.outer(mv, v @ m[1]), jnp.outer(v, mv @ m[0])])

  def max_eigenvalue(self, m):
    if self.normalize:
      return jnp.ones((), m.dtype)
    top = self._top(m)[0]
    return top if self.max_scale is None else jnp.minimum(top, self.max_scale)

  def layout(self, shape):
    a = _rows(shape, self.row_axes)
    return Layout(tuple(range(self.row_axes)), (), tuple(range(self.row_axes, len(shape))),
                  (a, a), self.memory(shape))

  def memory(self, shape):
    a = _rows(shape, self.row_axes)
    return 2 * a * min(self.rank, a)

  def hyper_step_scale(self, shape):
    # ‖Δ(UVᵀ)‖₂ ≤ lr·√(a·r) for Adam's sign-like steps on the (a×r) factors.
    a = _rows(shape, self.row_axes)
    return min(1.0, REFERENCE_ROWS / math.sqrt(max(a * min(self.rank, a), 1)))

  def clip(self, m, max_scale=None):
    # The applied P is clipped at B (precondition); this keeps the raw M = I + UVᵀ
    # within λ_max(MᵀM) ≤ 2B, so that clipping stays accurate in float32 and an
    # adaptive hyper-optimiser cannot drift UVᵀ far into the clipped region
    # (clipping M's singular values exactly is not possible in rank r).
    max_scale = self._bound(max_scale)
    if self._empty(m) or max_scale is None:
      return m
    return jnp.stack([m[0], self._shrink(self._basis(m)[1], max_scale) * m[1]])

  def clip_and_precondition(self, m, max_scale, g):
    max_scale = self._bound(max_scale)
    if self._empty(m) or not self._clips:
      return super().clip_and_precondition(m, max_scale, g)
    m, q, _, mu, w = self._clip_span(m, max_scale)
    return m, self._clipped_apply(q, mu, w, g)[0]

  def clip_precondition_and_span(self, m, max_scale, g):
    max_scale = self._bound(max_scale)
    if self._empty(m) or not self._clips:
      return super().clip_precondition_and_span(m, max_scale, g)
    m, q, t, mu, w = self._clip_span(m, max_scale)
    out, qg = self._clipped_apply(q, mu, w, g)
    return m, out, (m, q, t, mu, w, qg)

  def _clip_span(self, m, max_scale):
    """``(clip(m), Q, T, μ, W)``: the clipped ``M`` and its span basis and eigenpairs, from one basis.

    Shrinking ``V`` to ``c·V`` leaves ``span(U, V)``, and so ``Q``, as it is, and
    turns ``T = [T_U, T_V]`` into ``[T_U, c·T_V]``. The eigenpairs of the core at
    ``c = 1`` decide whether to shrink and are the result when it does not.
    """
    q, t = self._basis(m)
    bound = _STATE_BOUND_FACTOR * jnp.asarray(max_scale, t.dtype)
    mu1, w1 = _linalg.eigh(self._core(t))

    def shrunk():
      c = self._bisect(t, bound)
      return (c,) + tuple(_linalg.eigh(self._core(t, c)))

    c, mu, w = _grouping.cond(1 + mu1[-1] > bound, shrunk,
                              lambda: (jnp.ones((), t.dtype), mu1, w1))
    r = t.shape[1] // 2
    t = jnp.concatenate([t[:, :r], c * t[:, r:]], axis=1)
    return jnp.stack([m[0], c * m[1]]), q, t, mu, w

  def _shrink(self, t, max_scale):
    """The largest ``c ∈ [0, 1]`` with ``λ_max(M(c)ᵀM(c)) ≤ 2B`` for ``M(c) = I + c·UVᵀ`` (1 within it).

    ``‖M(c)‖₂²`` is convex in ``c`` with value 1 at ``c = 0``, so such ``c`` form an
    interval ``[0, c*]`` and bisection (``_BISECTION_STEPS``) keeps its feasible end.
    """
    bound = _STATE_BOUND_FACTOR * jnp.asarray(max_scale, t.dtype)
    over = 1 + _linalg.eigvalsh(self._core(t, jnp.ones((), t.dtype)))[-1] > bound
    return _grouping.cond(over, lambda: self._bisect(t, bound), lambda: jnp.ones((), t.dtype))

  def _bisect(self, t, bound):
    """Bisection for the shrink factor ``c`` (called where ``c = 1`` is over the bound)."""
    def lam(c):   # λ_max(M(c)ᵀM(c)) on span(Q); 1 on the complement
      return 1 + _linalg.eigvalsh(self._core(t, c))[-1]

    def body(_, lo_hi):
      lo, hi = lo_hi
      mid = 0.5 * (lo + hi)
      ok = lam(mid) <= bound
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, body,
                              (jnp.zeros((), t.dtype), jnp.ones((), t.dtype)))
    return lo
