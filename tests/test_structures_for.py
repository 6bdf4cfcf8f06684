"""The module-aware rule on Gemma-shaped ``nnx.Einsum`` attention and an ``nnx.scan`` stack.

Flax's Gemma example writes attention with einsums: the query kernel ``(N, D, H)``
('BTD,NDH->BTNH'), a stacked key/value kernel ``(2, K, D, H)`` ('BSD,CKDH->CBSKH')
and the output kernel ``(N, H, D)`` ('BTNH,NHD->BTD'). The shape-only rule read
their leading axes (heads, the K/V stack) as conv taps, and the layer axis of a
scanned ``(L, in, out)`` stack as a 1-D convolution. ``structures_for`` reads the
layers instead: ``P`` over ``D`` for the query and for each of K and V separately,
over ``N·H`` for the output, and one ``P`` per layer of the stack.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fop_optax
from fop_optax import structures as S
from fop_optax.module_rules import einsum_dimensions

N, K, D, H, L, IN, OUT = 4, 2, 32, 8, 3, 12, 10
Dims = S.FopDimensionNumbers


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q_einsum = nnx.Einsum('BTD,NDH->BTNH', (N, D, H), rngs=rngs)
    self.kv_einsum = nnx.Einsum('BSD,CKDH->CBSKH', (2, K, D, H), rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum('BTNH,NHD->BTD', (N, H, D), rngs=rngs)


class Model(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(50, D, rngs=rngs)
    self.attn = Attention(rngs)
    self.norm = nnx.RMSNorm(D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(r):
      return nnx.Linear(IN, OUT, rngs=r)

    self.layers = make(rngs)   # kernel (L, IN, OUT), as under nnx.scan


GEMMA_LEAVES = ('attn/q_einsum/kernel', 'attn/kv_einsum/kernel', 'attn/attn_vec_einsum/kernel',
                'layers/kernel')


def _by_name(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, S.Structure))[0]
  return {'/'.join(S.leaf_names(p)): v for p, v in flat}


def _random_grads(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_einsum_rule():
  assert einsum_dimensions('BTD,NDH->BTNH') == Dims((1,), ())
  assert einsum_dimensions('BSD,CKDH->CBSKH') == Dims((2,), (0,))   # C: a stack, one P each
  assert einsum_dimensions('BTNH,NHD->BTD') == Dims((0, 1), ())
  assert einsum_dimensions('BNTD,NDH->BNTH') == Dims((1,), (0,))    # per-head weights
  assert einsum_dimensions('BD,DF->BF') == Dims((0,), ())
  assert einsum_dimensions('BD,D->BD') is None                      # nothing contracted
  assert einsum_dimensions('...D,DF->...F') is None


def test_gemma_shapes_get_the_required_matrices():
  model = Model(nnx.Rngs(0))
  structures = fop_optax.structures_for(model)
  got = _by_name(structures)
  assert got['embed/embedding'] == S.NoPreconditioner()
  assert got['norm/scale'] == S.NoPreconditioner()
  assert got['layers/bias'] == S.NoPreconditioner()
  assert got['attn/attn_vec_einsum/kernel'] == S.Full(row_axes=2)
  assert got['attn/q_einsum/kernel'] == S.WithDimensions(S.Full(), Dims((1,), ()))
  assert got['attn/kv_einsum/kernel'] == S.WithDimensions(S.Full(), Dims((2,), (0,)))
  assert got['layers/kernel'] == S.WithDimensions(S.Full(), Dims((1,), (0,)))

  params = nnx.state(model, nnx.Param)
  tx = fop_optax.fop(0.1, structures=structures)
  with warnings.catch_warnings():
    warnings.simplefilter('error')   # the module-aware rule leaves nothing ambiguous
    state = tx.init(params)
    mats = _by_name(fop_optax.diagnostics.preconditioner_matrices(state, params, structures))
  assert mats['attn/q_einsum/kernel'].shape == (D, D)
  assert mats['attn/kv_einsum/kernel'].shape == (2, D, D)      # one P for K, one for V
  assert mats['attn/attn_vec_einsum/kernel'].shape == (N * H, N * H)
  assert mats['layers/kernel'].shape == (L, IN, IN)            # one P per layer
  assert mats['embed/embedding'] is None


def test_matches_the_tree_nnx_optimizer_hands_over():
  model = Model(nnx.Rngs(0))
  tx = fop_optax.fop(0.1, hyper_learning_rate=0.01, structures=fop_optax.structures_for(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.randint(jax.random.key(0), (4, 5), 0, 50)

  def loss_fn(m):
    e = m.norm(m.embed(x))
    q = m.attn.q_einsum(e)
    kv = m.attn.kv_einsum(e)
    out = m.attn.attn_vec_einsum(q * kv[0][:, :, :1] + kv[1][:, :, :1].sum())
    return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(m.layers.kernel))

  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(np.asarray, before)
  for _ in range(2):
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)
  after = nnx.state(model, nnx.Param)
  assert not np.allclose(np.asarray(after['attn']['kv_einsum']['kernel'][...]),
                         before['attn']['kv_einsum']['kernel'][...])


@pytest.mark.parametrize('leaf, axis', [('attn/kv_einsum/kernel', 0), ('layers/kernel', 0)])
def test_stack_indices_and_layers_never_mix(leaf, axis):
  # Learn P away from I on full gradients, then take a step on a gradient that is
  # nonzero in stack index / layer 0 only: every other index's update is exactly 0.
  model = Model(nnx.Rngs(0))
  structures = fop_optax.structures_for(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  structures = nnx.to_pure_dict(structures)
  tx = fop_optax.fop(0.1, momentum=None, hyper_learning_rate=0.05, structures=structures)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(4):
    _, state = update(_random_grads(params, jax.random.key(i)), state, params)
  mats = _by_name(fop_optax.diagnostics.preconditioner_matrices(state, params, structures))
  p = np.asarray(mats[leaf])
  assert not np.allclose(p[0], np.eye(p.shape[-1]), atol=1e-3)   # P has moved off I
  assert not np.allclose(p[0], p[1], atol=1e-4)                  # each index its own P

  grads = jax.tree.map(jnp.zeros_like, params)
  keys = leaf.split('/')
  node = grads
  for k in keys[:-1]:
    node = node[k]
  g = np.zeros(node[keys[-1]].shape, np.float32)
  g[0] = np.asarray(jax.random.normal(jax.random.key(9), g.shape[1:]))
  node[keys[-1]] = jnp.asarray(g)
  updates, _ = update(grads, state, params)
  u = np.asarray(_by_name(updates)[leaf])
  assert np.abs(u[0]).max() > 0
  np.testing.assert_array_equal(u[1:], 0)
  # ... and index 0 was preconditioned (not the plain -lr·g).
  assert not np.allclose(u[0], -0.1 * g[0], atol=1e-4)


def test_default_rule_never_mixes_heads_stacks_or_layers():
  model = Model(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  with pytest.warns(UserWarning, match='structures_for') as record:
    resolved = _by_name(fop_optax.resolve_structures(params))
  message = str(record[0].message)
  for name in GEMMA_LEAVES:
    assert resolved[name] == S.NoPreconditioner(), name
    assert name in message
  with pytest.warns(UserWarning, match='structures_for'):
    state = fop_optax.fop(0.1).init(params)
    mats = _by_name(fop_optax.diagnostics.preconditioner_matrices(state, params))
  assert all(mats[name] is None for name in GEMMA_LEAVES)
  # Without names, the shape rule is unchanged (a (4, 32, 8) leaf is a 1-D conv's view).
  assert fop_optax.resolve_structures((jnp.zeros((N, D, H)),), max_scale=None) == (S.Spatial(),)


class ConvStack(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(r):
      return nnx.Conv(3, 4, (3, 3), rngs=r)

    self.blocks = make(rngs)   # kernel (L, 3, 3, 3, 4)
    self.conv = nnx.Conv(4, 4, (3, 3), rngs=rngs)


def test_scanned_convs_and_plain_layers():
  got = _by_name(fop_optax.structures_for(ConvStack(nnx.Rngs(0))))
  assert got['blocks/kernel'] == S.WithDimensions(S.Spatial(), Dims((1, 2), (0,)))
  assert got['conv/kernel'] == S.Spatial()
  params = nnx.state(ConvStack(nnx.Rngs(0)), nnx.Param)
  structures = fop_optax.structures_for(ConvStack(nnx.Rngs(0)))
  state = fop_optax.fop(0.1, structures=structures).init(params)
  mats = _by_name(fop_optax.diagnostics.preconditioner_matrices(state, params, structures))
  assert mats['blocks/kernel'].shape == (L, 9, 9)


def test_agrees_with_the_default_rule_on_a_transformer_block():
  from tests.test_flax_defaults import Block
  model = Block(nnx.Rngs(0), d=32, conv=True)
  params = nnx.state(model, nnx.Param)
  assert (_by_name(fop_optax.resolve_structures(params, fop_optax.structures_for(model)))
          == _by_name(fop_optax.resolve_structures(params)))


def test_einsum_layer_with_call_time_equation():
  class Lookalike(nnx.Module):   # Gemma's own Einsum: the equation comes with the call
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (N, D, H)))

  class M(nnx.Module):
    def __init__(self, rngs):
      self.q = Lookalike(rngs)

  got = _by_name(fop_optax.structures_for(M(nnx.Rngs(0)), einsum_strs={'q': 'BTD,NDH->BTNH'}))
  assert got['q/w'] == S.WithDimensions(S.Full(), Dims((1,), ()))


def test_leaf_role_without_private_helpers():
  params = {'attn': {n: {'kernel': jnp.zeros((8, 2, 4))} for n in ('query', 'key', 'value', 'out')}}
  assert S.leaf_role(('attn', 'query', 'kernel'), params=params) == 'attention_input'
  assert S.leaf_role(('attn', 'out', 'kernel'), params=params) == 'attention_output'
  assert S.find_attention_blocks(params) == {('attn',)}
  assert S.leaf_role(('attn', 'q', 'kernel'), shape=(8, 2, 4)) == 'ambiguous'
  assert S.leaf_role(('layers', '0', 'conv', 'kernel'), shape=(3, 3, 2, 4)) == 'other'
  assert S.leaf_role(('layers', 'conv', 'kernel'), shape=(3, 3, 2, 4)) == 'ambiguous'


def test_describe(capsys):
  model = Model(nnx.Rngs(0))
  lines = fop_optax.describe(model, print_table=True)
  printed = capsys.readouterr().out
  by = {d.path: d for d in lines}
  assert len(lines) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  kv = by['attn/kv_einsum/kernel']
  assert kv.shape == (2, K, D, H) and kv.rows == (2,) and kv.batch == (0,)
  assert kv.columns == (1, 3) and kv.matrix == (2, D, D) and kv.floats == 2 * D * D
  assert kv.layer == 'Einsum' and kv.role == 'einsum'
  assert by['layers/kernel'].matrix == (L, IN, IN)
  assert by['embed/embedding'].matrix is None and by['embed/embedding'].floats == 0
  assert 'attn/kv_einsum/kernel' in printed and 'total:' in printed
  assert f'total: {sum(d.floats for d in lines)} floats' in printed
  # A plain tree: the default rule, with its roles.
  params = {'conv': {'kernel': jnp.zeros((3, 3, 4, 8))}, 'dense': {'kernel': jnp.zeros((64, 8))},
            'dense2': {'bias': jnp.zeros((8,))}}
  by = {d.path: d for d in fop_optax.describe(params)}
  assert by['conv/kernel'].structure == S.Spatial(max_scale=1.0)
  assert by['conv/kernel'].rows == (0, 1) and by['conv/kernel'].matrix == (9, 9)
  assert by['dense/kernel'].floats == 2 * 64 * 8 and by['dense2/bias'].role == 'norm_or_bias'
  assert str(by['conv/kernel']).startswith('conv/kernel: (3, 3, 4, 8) other')


class GemmaEinsum(nnx.Module):
  """The einsum layer of Flax's Gemma example: ``einsum_str`` attribute, one Param ``w``."""

  def __init__(self, einsum_str, shape, *, rngs):
    self.einsum_str = einsum_str
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape))


class GemmaLike(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.Dict(
        qkv_einsum=GemmaEinsum('BTD,SNDH->SBTNH', (3, N, D, H), rngs=rngs),
        attn_vec_einsum=GemmaEinsum('BTNH,NHD->BTD', (N, H, D), rngs=rngs))
    # Gemma's feed-forward keeps its stacked (gate, up) kernel as a plain Param.
    self.mlp = nnx.Dict(gating_einsum=nnx.Param(jnp.zeros((2, D, 16))))


def test_gemma_example_lookalikes():
  model = GemmaLike(nnx.Rngs(0))
  got = _by_name(fop_optax.structures_for(model))
  assert got['attn/qkv_einsum/w'] == S.WithDimensions(S.Full(), Dims((2,), (0,)))   # Q, K, V apart
  assert got['attn/attn_vec_einsum/w'] == S.Full(row_axes=2)
  assert got['mlp/gating_einsum'] == 'auto'   # no layer to read: the default rule ...
  params = nnx.state(model, nnx.Param)
  with pytest.warns(UserWarning, match='mlp/gating_einsum'):
    resolved = _by_name(fop_optax.resolve_structures(params, fop_optax.structures_for(model)))
  assert resolved['mlp/gating_einsum'] == S.NoPreconditioner()   # ... never mixes gate and up
