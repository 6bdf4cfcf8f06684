"""``full``: a dense learned ``M`` (a×a) acting on the rows of a leaf's matrix view.

``P = MᵀM``; FOP-norm divides it by ``λ_max``; the guard clips its eigenvalues
at ``B`` where it is applied, ``P̃ = Q min(Λ, B) Qᵀ``, and the hypergradient is
that of ``P̃`` (Daleckii–Krein, :mod:`fop_optax.structures._matrix`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fop_optax import _grouping
from fop_optax import _linalg
from fop_optax.structures._base import Layout, Structure, register
from fop_optax.structures._matrix import (
    REFERENCE_ROWS, Shape, _apply_left, _clipped_derivative, _exceeds, _gram, _rows,
    _spectral_clip, _top_eigenpair)


@register('full')
@dataclasses.dataclass(frozen=True)
class Full(Structure):
  """A dense learned ``M`` (a×a) acting on the rows of the leaf's matrix view.

  Attributes:
    row_axes: how many leading axes form the rows; 1 gives ``a = in`` for a
      dense kernel ``(in, out)``, and ``a = n`` (one column) for a vector.
    normalize: FOP-norm: use ``P/‖P‖₂`` instead of ``P``.
    max_scale: the guard ``B``: ``P``'s eigenvalues above ``B`` are clipped to
      ``B`` where it is applied (``P̃ = Q min(Λ, B) Qᵀ``; the hypergradient is
      that of ``P̃``, exactly). ``None``: unbounded. Set from
      :func:`fop_optax.scale_by_fop`'s ``max_scale`` unless given here.
  """

  row_axes: int = 1
  normalize: bool = False
  max_scale: float | None = None

  takes_row_axes = True
  needs_rows = True

  @classmethod
  def from_label(cls, **rule_kwargs):
    return cls(normalize=rule_kwargs.get('normalize', False))

  def with_row_axes(self, row_axes):
    return dataclasses.replace(self, row_axes=row_axes)

  def _row_axes(self, shape: Shape) -> int:
    return self.row_axes

  def validate(self, shape):
    if not 1 <= self._row_axes(shape) <= len(shape):
      raise ValueError(
          f'{self!r} needs a leaf with at least {self.row_axes} axes, got shape {shape}')

  def init(self, shape, dtype, key):
    del key
    return jnp.eye(_rows(shape, self._row_axes(shape)), dtype=dtype)

  def _p(self, m):
    p = m.T @ m
    if m.shape[0] == 0:   # a zero-size leaf: nothing to normalise or clip
      return p
    if self.normalize:
      return p / _linalg.eigvalsh(p)[-1]
    if self.max_scale is None:
      return p
    return _spectral_clip(p, self.max_scale)

  def precondition(self, m, g):
    # One product per leaf: P (a×a) is formed first (a ≤ max_full_dim, or k²).
    out = _apply_left(self._p(m), g.astype(m.dtype), self._row_axes(g.shape))
    return out.astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    # One product per leaf for C = G_t G_pᵀ; the rest is a×a.
    c = _gram(g.astype(m.dtype), g_prev.astype(m.dtype), self._row_axes(g.shape))
    if self.normalize and m.shape[0] > 0:
      # P̃ = P/λ, λ = λ_max(P) = vᵀPv with ∂λ/∂M = 2 M v vᵀ (v its unit
      # eigenvector; a subgradient where λ_max is not simple), so
      # ∂J/∂M = −(η/λ) [M(C + Cᵀ) − (2/λ)⟨C, P⟩ M v vᵀ].
      p = m.T @ m
      lam, v = _top_eigenpair(p)
      grad = (m @ (c + c.T) - (2 * jnp.vdot(c, p) / lam) * jnp.outer(m @ v, v)) / lam
    elif self.max_scale is not None and m.shape[0] > 0:
      # P̃ = f(P) with f = min(·, B) on the eigenvalues: ∂⟨C, f(P)⟩/∂P = Z =
      # Q (L ∘ QᵀCQ) Qᵀ with L the divided differences of f (Daleckii–Krein), so
      # ∂J/∂M = −η M (Z + Zᵀ); Z = C when no eigenvalue exceeds B.
      z = _clipped_derivative(m.T @ m, c, self.max_scale)
      grad = m @ (z + z.T)
    else:
      grad = m @ (c + c.T)
    return -learning_rate * grad

  def matrix(self, m, shape):
    del shape
    return self._p(m)

  def max_eigenvalue(self, m):
    if m.shape[0] == 0:
      return jnp.ones((), m.dtype)
    return _linalg.eigvalsh(self._p(m))[-1]

  def top_eigen(self, m):
    if m.shape[0] == 0:
      return jnp.ones((), m.dtype), jnp.zeros_like(m)
    lam, v = _top_eigenpair(m.T @ m)   # ∂(vᵀMᵀMv)/∂M = 2 M v vᵀ
    return lam, 2 * jnp.outer(m @ v, v)

  def hyper_step_scale(self, shape):
    # ‖ΔM‖₂ ≤ lr·a for Adam's sign-like steps; the paper's 3×3 kernels have a = 9.
    return min(1.0, REFERENCE_ROWS / max(_rows(shape, self._row_axes(shape)), 1))

  def layout(self, shape):
    k = self._row_axes(tuple(shape))
    a = _rows(shape, k)
    return Layout(tuple(range(k)), (), tuple(range(k, len(shape))), (a, a), self.memory(shape))

  def memory(self, shape):
    return _rows(shape, self._row_axes(tuple(shape))) ** 2

  def clip(self, m, max_scale=None):
    # Projected hypergradient descent: M's singular values are clipped at √B
    # (M ← M Q diag(min(1, √(B/λ))) Qᵀ for MᵀM = QΛQᵀ), so P = MᵀM keeps its
    # eigenvectors and every eigenvalue below B, and a direction at the bound can
    # come back down. FOP-norm's P̃ = P/λ_max is scale-invariant: there M is only
    # rescaled as a whole to keep λ_max(MᵀM) ≤ B, leaving P̃ unchanged.
    max_scale = self._bound(max_scale)
    if m.shape[0] == 0 or max_scale is None:
      return m
    p = m.T @ m
    bound = jnp.asarray(max_scale, p.dtype)

    def project(p):
      lam, q = _linalg.eigh(p)
      if self.normalize:
        return jnp.eye(p.shape[0], dtype=p.dtype) * jnp.sqrt(bound / lam[-1])
      return (q * jnp.sqrt(jnp.minimum(1.0, bound / jnp.maximum(lam, bound)))) @ q.T

    return m @ _grouping.cond(_exceeds(p, bound), project,
                              lambda p: jnp.eye(p.shape[0], dtype=p.dtype), p).astype(m.dtype)
