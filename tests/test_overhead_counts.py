"""benchmarks/overhead.py's pass counter, on programs whose passes are known."""

import jax
import jax.numpy as jnp
import optax

from benchmarks import overhead

SHAPE = (512, 96)   # no other array in these programs has this many elements
SIZE = SHAPE[0] * SHAPE[1]


def _passes(fn, *args):
  return overhead.hlo_passes(jax.jit(fn).lower(*args).compile().as_text(), SIZE)


def test_a_fused_elementwise_op_reads_each_operand_and_writes_once():
  x, y = jnp.ones(SHAPE), jnp.ones(SHAPE)
  assert _passes(lambda x, y: 2.0 * x + y, x, y) == 3


def test_the_work_inside_a_conditional_counts():
  # The conditional's result is a tuple (its shape holds spaces and /*index*/
  # comments): a parser that only reads array-shaped results never sees the
  # conditional and counts nothing for its branches.
  x, y = jnp.ones(SHAPE), jnp.ones(SHAPE)

  def fn(p, x, y):
    return jax.lax.cond(p, lambda: (2.0 * x + y, jnp.sum(y[:3])),
                        lambda: (x - y, jnp.sum(x[:3])))

  inside = _passes(fn, jnp.array(True), x, y)
  # Each branch reads both operands and writes one result; whatever copies XLA adds
  # around the conditional can only add to that.
  assert inside >= 3


def test_the_costlier_branch_is_the_one_counted():
  x, y = jnp.ones(SHAPE), jnp.ones(SHAPE)

  def cheap(p, x, y):   # both branches one elementwise op
    return jax.lax.cond(p, lambda: (x + y, 0.0), lambda: (x - y, 1.0))

  def costly(p, x, y):  # one branch also makes an unfusable product's read
    return jax.lax.cond(p, lambda: (x + y, jnp.sum(x @ y.T[:, :4])), lambda: (x - y, 1.0))

  p = jnp.array(True)
  assert _passes(costly, p, x, y) >= _passes(cheap, p, x, y) + 1


def test_momentum_update_is_six_passes():
  """optax's momentum with params and state donated: new trace (3) and new params (3)."""
  params = {'w': jnp.ones(SHAPE)}
  tx = optax.sgd(0.1, momentum=0.9)
  state = tx.init(params)
  text = overhead._make_update(tx).lower(params, state, params).compile().as_text()
  assert overhead.hlo_passes(text, SIZE) == 6
