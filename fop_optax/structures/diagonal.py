"""``diagonal``: one learned scale per parameter, ``P = diag(m²)`` (per-parameter rates, as PP-HD)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from fop_optax.structures._base import Layout, Structure, register
from fop_optax.structures.scalar import _project


@register('diagonal')
@dataclasses.dataclass(frozen=True)
class Diagonal(Structure):
  """One learned scale per parameter: ``P = diag(m²)`` (per-parameter rates, as PP-HD).

  ``m`` is leaf-shaped, so under a mesh it follows its leaf's sharding
  (``replicated_state = False``).

  Attributes:
    max_scale: the guard ``B``, as for :class:`~fop_optax.structures.Scalar`.
  """

  max_scale: float | None = None

  elementwise = True
  replicated_state = False

  def init(self, shape, dtype, key):
    del key
    return jnp.ones(shape, dtype)

  def memory(self, shape):
    return math.prod(shape)

  def precondition(self, m, g):
    return (jnp.square(m) * g.astype(m.dtype)).astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    return -2 * learning_rate * m * g.astype(m.dtype) * g_prev.astype(m.dtype)

  def matrix(self, m, shape):
    del shape
    return jnp.square(m)

  def layout(self, shape):
    return Layout((), (), tuple(range(len(shape))), tuple(shape), self.memory(shape))

  def clip(self, m, max_scale=None):
    return _project(self, m, max_scale)
