"""``none``: ``P = I``, the leaf passes through unchanged."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fop_optax.structures._base import Layout, Structure, register


@register('none')
@dataclasses.dataclass(frozen=True)
class NoPreconditioner(Structure):
  """``P = I``: the leaf passes through unchanged.

  Its ``m`` is a scalar placeholder (not a zero-size array, which Orbax
  refuses to checkpoint).
  """

  preconditions = False

  def init(self, shape, dtype, key):
    del shape, key
    return jnp.zeros((), dtype)

  def memory(self, shape):
    del shape
    return 1   # the scalar placeholder (Layout.floats counts it as 0 learned floats)

  def precondition(self, m, g):
    del m
    return g

  def hypergradient(self, m, g, g_prev, learning_rate):
    del g, g_prev, learning_rate
    return jnp.zeros_like(m)

  def matrix(self, m, shape):
    del m
    return jnp.ones(shape)

  def max_eigenvalue(self, m):
    return jnp.ones((), m.dtype)

  def top_eigen(self, m):
    return jnp.ones((), m.dtype), jnp.zeros_like(m)

  def layout(self, shape):
    return Layout((), (), tuple(range(len(shape))), None, 0)   # m: a scalar placeholder
