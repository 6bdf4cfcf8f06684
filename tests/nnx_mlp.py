"""The small Flax NNX regression problem that the ``nnx.Optimizer`` tests share."""

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """4 → 16 (tanh) → 1."""

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.tanh(self.l1(x)))


def target(x):
  """The smooth function the MLP learns."""
  return jnp.sin(x[:, :1]) + x[:, 1:2] ** 2


def problem():
  """``(model, x, y)``: the MLP from ``nnx.Rngs(0)`` and 64 Gaussian inputs with their targets."""
  x = jax.random.normal(jax.random.key(0), (64, 4))
  return MLP(nnx.Rngs(0)), x, target(x)
