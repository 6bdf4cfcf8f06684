"""``scalar``: one learned scale per leaf, ``P = m²·I`` (a layer-wise learning rate, as S-HD)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fop_optax.structures._base import Layout, Structure, register


def _project(structure: Structure, m, max_scale):
  """``m`` with ``m² ∈ [0, B]``: the guard's projection for the elementwise structures."""
  max_scale = structure._bound(max_scale)
  if max_scale is None:
    return m
  bound = jnp.sqrt(jnp.asarray(max_scale, m.dtype))
  return jnp.clip(m, -bound, bound)


@register('scalar')
@dataclasses.dataclass(frozen=True)
class Scalar(Structure):
  """One learned scale per leaf: ``P = m²·I`` (a layer-wise learning rate, as S-HD).

  Attributes:
    max_scale: the guard ``B``: ``m²`` is projected onto ``[0, B]`` after each
      hyper step. ``None``: unbounded. Set from :func:`fop_optax.scale_by_fop`'s
      ``max_scale`` unless given here.
  """

  max_scale: float | None = None

  elementwise = True

  def init(self, shape, dtype, key):
    del shape, key
    return jnp.ones((), dtype)

  def memory(self, shape):
    del shape
    return 1

  def precondition(self, m, g):
    return (jnp.square(m) * g.astype(m.dtype)).astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    # ∂/∂m of −η m² ⟨g, g_prev⟩.
    inner = jnp.vdot(g.astype(m.dtype), g_prev.astype(m.dtype))
    return -2 * learning_rate * m * inner

  def matrix(self, m, shape):
    return jnp.square(m) * jnp.ones(shape, m.dtype)

  def layout(self, shape):
    return Layout((), (), tuple(range(len(shape))), (), self.memory(shape))

  def clip(self, m, max_scale=None):
    return _project(self, m, max_scale)
