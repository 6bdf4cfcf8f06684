"""The structure protocol: a structure defined outside the package works everywhere.

``BlockDiagonal`` below is written against :class:`fop_optax.structures.Structure`
only (no edit to the package): ``P = blockdiag(M_iᵀM_i)`` over the rows of a
leaf, in blocks of ``block`` rows. It is used through ``structures=`` of
:func:`fop_optax.fop` (as an instance and by its registered label),
:func:`fop_optax.describe` and :func:`fop_optax.diagnostics.spectra`, and its
hypergradient is checked against ``jax.grad`` of ``J(θ − η·P(m)·g_prev)``.
The other tests check the protocol of the built-in structures: the flags,
``memory``, ``spectrum``, the one way ``max_scale`` travels, and that a stack of
equal-shaped leaves is one batched leaf (:func:`fop_optax.structures.stacked`).
"""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S


@S.register('test_block_diagonal')
@dataclasses.dataclass(frozen=True)
class BlockDiagonal(S.Structure):
  """``P = blockdiag(M_1ᵀM_1, ..., M_kᵀM_k)``: ``m`` of shape ``(a/block, block, block)``.

  The rows are the leaf's first axis. The guard is a projection (as for
  ``scalar``/``diagonal``): ``clip`` caps each ``M_i``'s singular values at ``√B``,
  so the ``P`` applied is the raw one and its hypergradient is
  ``−η M_i (C_i + C_iᵀ)`` with ``C_i = G_{t,i} G_{p,i}ᵀ`` (block ``i``'s rows).
  """

  block: int = 2
  max_scale: float | None = None   # filled by with_bound (the base class's default)

  def validate(self, shape):
    if len(shape) < 1 or shape[0] % self.block:
      raise ValueError(f'{self!r}: the first axis of {shape} is not a multiple of {self.block}')

  def _blocks(self, x):   # (a, ...) -> (a/block, block, columns)
    return x.reshape(x.shape[0] // self.block, self.block, -1)

  def init(self, shape, dtype, key):
    del key
    return jnp.tile(jnp.eye(self.block, dtype=dtype), (shape[0] // self.block, 1, 1))

  def _p(self, m):
    return jnp.einsum('kij,kil->kjl', m, m)   # M_iᵀ M_i

  def precondition(self, m, g):
    x = self._blocks(g.astype(m.dtype))
    return jnp.einsum('kjl,klc->kjc', self._p(m), x).reshape(g.shape).astype(g.dtype)

  def hypergradient(self, m, g, g_prev, learning_rate):
    gt, gp = self._blocks(g.astype(m.dtype)), self._blocks(g_prev.astype(m.dtype))
    c = jnp.einsum('kic,kjc->kij', gt, gp)
    return -learning_rate * jnp.einsum('kij,kjl->kil', m, c + jnp.swapaxes(c, 1, 2))

  def matrix(self, m, shape):
    p = self._p(m)
    k, b = p.shape[0], self.block
    return jnp.einsum('kl,kij->kilj', jnp.eye(k, dtype=p.dtype), p).reshape(k * b, k * b)

  def clip(self, m, max_scale=None):
    bound = self._bound(max_scale)
    if bound is None:
      return m
    lam, q = jnp.linalg.eigh(self._p(m))
    scale = jnp.sqrt(jnp.minimum(1.0, bound / jnp.maximum(lam, bound)))
    return jnp.einsum('kij,kjl,kl,kml->kim', m, q, scale, q)

  def max_eigenvalue(self, m):
    return jnp.max(jnp.linalg.eigvalsh(self._p(m)))

  def top_eigen(self, m):
    f = lambda x: jnp.max(jnp.linalg.eigvalsh(self._p(x)))
    return jax.value_and_grad(f)(m)

  def layout(self, shape):
    a = shape[0]
    return S.Layout((0,), (), tuple(range(1, len(shape))), (a, a), self.memory(shape))


PARAMS = {'w': jnp.linspace(-0.5, 0.5, 30).reshape(6, 5), 'b': jnp.zeros(5)}


def loss(params, x):
  h = jnp.tanh(x @ params['w'].T + 0.1)   # (n, 6)
  return jnp.mean(jnp.square(h @ jnp.ones((6, 5)) + params['b'] - 1.0))


def batch(i):
  return jax.random.normal(jax.random.key(i), (16, 5))


def train(structures, steps=6, **kw):
  tx = fop_optax.fop(0.3, hyper_learning_rate=3e-2, structures=structures, **kw)
  params, state = PARAMS, tx.init(PARAMS)
  losses = []
  for i in range(steps):
    value, grads = jax.value_and_grad(loss)(params, batch(0))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(value))
  return params, state, losses


# --- a structure defined outside the package ------------------------------------------------


def _random_state(structure, shape, key):
  m = structure.init(shape, jnp.float32, key)
  return m + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), m.shape, m.dtype)


@pytest.mark.parametrize('structure', [
    BlockDiagonal(2), BlockDiagonal(3), S.Full(), S.LowRank(rank=2), S.Diagonal(), S.Scalar(),
    S.WithDimensions(BlockDiagonal(2), S.FopDimensionNumbers(rows=1, batch=0)),
], ids=repr)
def test_hypergradient_is_the_gradient_of_the_next_loss(structure):
  """``hypergradient(m, ∇J(θ_t), g_prev, η) = ∂J(θ_prev − η·P(m)·g_prev)/∂m``."""
  shape = (6, 5) if not isinstance(structure, S.WithDimensions) else (3, 6, 5)
  key = jax.random.key(3)
  x = jax.random.normal(key, (8,) + shape[-1:])
  j = lambda theta: jnp.sum(jnp.square(jnp.tanh(jnp.einsum('...ac,nc->...na', theta, x)) - 0.3))
  theta_prev = 0.4 * jax.random.normal(jax.random.fold_in(key, 2), shape)
  g_prev = jax.grad(j)(theta_prev)
  m = _random_state(structure, shape, jax.random.fold_in(key, 3))
  eta = 0.1
  step = lambda m: theta_prev - eta * structure.precondition(m, g_prev)
  expected = jax.grad(lambda m: j(step(m)))(m)
  got = structure.hypergradient(m, jax.grad(j)(step(m)), g_prev, eta)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize('spec', [BlockDiagonal(2), 'test_block_diagonal'])
def test_external_structure_through_fop_describe_and_spectra(spec):
  structures = {'w': spec, 'b': 'none'}
  params, state, losses = train(structures)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]

  resolved = fop_optax.resolve_structures(PARAMS, structures)
  assert resolved['w'] == BlockDiagonal(2, max_scale=1.0)   # the guard reached it, one way
  m = fop_optax.diagnostics.find_fop_state(state).preconditioners['w']
  assert m.shape == (3, 2, 2)
  assert float(jnp.max(jnp.abs(m - BlockDiagonal(2).init((6, 5), jnp.float32, None)))) > 1e-4

  p = BlockDiagonal(2).matrix(m, (6, 5))
  mats = fop_optax.diagnostics.preconditioner_matrices(state, params, structures)
  np.testing.assert_allclose(mats['w'], p)
  assert mats['b'] is None
  spectra = fop_optax.diagnostics.spectra(state, params, structures)
  expected = np.sort(np.linalg.eigvalsh(np.asarray(p, np.float64)))[::-1]
  np.testing.assert_allclose(spectra['w'], expected, rtol=1e-5, atol=1e-6)
  assert spectra['w'][0] <= 1.0 + 1e-5   # the guard (clip after each hyper step) holds
  angles = fop_optax.diagnostics.rotation_angles(state, jax.grad(loss)(params, batch(9)),
                                                 structures)
  assert 0 <= float(angles['w']) < 90

  (bias, w) = fop_optax.describe(params, structures)   # leaves in key order: b, w
  assert w.path == 'w' and w.structure == BlockDiagonal(2, max_scale=1.0)
  assert (w.rows, w.columns, w.matrix, w.floats) == ((0,), (1,), (6, 6), 12)
  assert 'BlockDiagonal(block=2, max_scale=1.0)' in str(w)
  assert bias.structure == S.NoPreconditioner() and bias.floats == 0


def test_registry():
  assert S.registered()['test_block_diagonal'] is BlockDiagonal
  assert BlockDiagonal.name == 'test_block_diagonal'
  assert 'test_block_diagonal' in S.structure_names()
  assert S.STRUCTURE_NAMES == ('auto', 'none', 'scalar', 'diagonal', 'full', 'spatial',
                               'low_rank')
  for name in S.STRUCTURE_NAMES[1:]:
    assert S.registered()[name].name == name
  assert S.as_structure('test_block_diagonal', (6, 5)) == BlockDiagonal()
  assert S.as_structure('low_rank', (40, 5), rank=3, normalize=True) == S.LowRank(3, normalize=True)
  assert S.as_structure('spatial', (3, 3, 2, 2), normalize=True) == S.Spatial(normalize=True)
  assert S.register('test_block_diagonal')(BlockDiagonal) is BlockDiagonal   # same class again

  @dataclasses.dataclass(frozen=True)
  class Other(BlockDiagonal):
    pass
  with pytest.raises(ValueError, match='already registered'):
    S.register('test_block_diagonal')(Other)
  with pytest.raises(ValueError, match='default rule'):
    S.register('auto')(Other)
  with pytest.raises(TypeError):
    S.register('not_a_structure')(int)
  with pytest.raises(ValueError, match='test_block_diagonal'):   # listed among the labels
    S.as_structure('no_such_structure', (6, 5))


# --- the protocol of the built-in structures ------------------------------------------------

BUILTINS = [
    (S.NoPreconditioner(), (4, 3)), (S.Scalar(), (4, 3)), (S.Diagonal(), (4, 3)),
    (S.Full(), (4, 3)), (S.Full(row_axes=2), (2, 3, 5)), (S.Spatial(), (3, 3, 2, 4)),
    (S.LowRank(rank=2), (6, 3)), (S.LowRank(rank=9), (4, 3)),
    (S.WithDimensions(S.Full(), S.FopDimensionNumbers(rows=1, batch=0)), (3, 4, 5)),
    (S.WithDimensions(S.LowRank(2), S.FopDimensionNumbers(rows=(1, 2), batch=3)), (2, 3, 4, 2)),
    (S.WithDimensions(S.Diagonal(), S.FopDimensionNumbers(rows=1, batch=0)), (4, 4)),
    (BlockDiagonal(2), (4, 3)),
]


@pytest.mark.parametrize('structure,shape', BUILTINS, ids=lambda x: repr(x))
def test_memory_is_the_size_of_the_state(structure, shape):
  m = structure.init(shape, jnp.float32, jax.random.key(0))
  assert structure.memory(shape) == m.size
  floats = structure.layout(shape).floats
  assert floats == (0 if not structure.preconditions else m.size)


def test_flags():
  assert [s.preconditions for s in (S.NoPreconditioner(), S.Scalar(), S.Full())] == [
      False, True, True]
  assert [s.elementwise for s in (S.Scalar(), S.Diagonal(), S.Full(), S.LowRank())] == [
      True, True, False, False]
  assert [s.replicated_state for s in (S.Diagonal(), S.Scalar(), S.Full(), S.LowRank())] == [
      False, True, True, True]
  assert (S.Full().takes_row_axes, S.LowRank().takes_row_axes, S.Spatial().takes_row_axes,
          S.Diagonal().takes_row_axes) == (True, True, False, False)
  dims = S.FopDimensionNumbers(rows=1, batch=0)
  assert S.WithDimensions(S.Diagonal(), dims).elementwise
  assert not S.WithDimensions(S.Full(), dims).elementwise
  assert S.WithDimensions(S.Full(max_scale=2.0), dims).max_scale == 2.0
  assert S.Spatial(max_scale=2.0).with_row_axes(2) == S.Full(row_axes=2, max_scale=2.0)
  assert S.Scalar().with_row_axes(3) == S.Scalar()
  assert BlockDiagonal().max_scale is None and BlockDiagonal().with_row_axes(1) == BlockDiagonal()


def test_max_scale_travels_one_way():
  """Set once, as a field, by with_bound during resolution; clip's bound defaults to it."""
  params = {'a': jnp.ones((3, 2)), 'b': jnp.ones((3, 2)), 'c': jnp.ones((3, 2)),
            'd': jnp.ones((4, 3)), 'e': jnp.ones((3, 2))}
  specs = {'a': 'scalar', 'b': 'diagonal', 'c': 'full', 'd': S.LowRank(2, max_scale=3.0),
           'e': 'none'}
  got = S.resolve_structures(params, specs, max_scale=2.0)
  assert got == {'a': S.Scalar(max_scale=2.0), 'b': S.Diagonal(max_scale=2.0),
                 'c': S.Full(max_scale=2.0), 'd': S.LowRank(2, max_scale=3.0),
                 'e': S.NoPreconditioner()}
  assert S.resolve_structures(params, specs, max_scale=None)['a'] == S.Scalar()
  m = jnp.array([[3.0, 0.5], [0.0, 0.1]])
  for s in (got['a'], got['b'], got['c']):
    np.testing.assert_array_equal(s.clip(m), s.clip(m, 2.0))
    np.testing.assert_array_equal(s.clip(m, None), s.clip(m, 2.0))
    assert s.max_eigenvalue(s.clip(m)) <= 2.0 * (1 + 1e-5)
  for s in (S.Scalar(), S.Diagonal(), S.Full()):   # no bound anywhere: unchanged
    np.testing.assert_array_equal(s.clip(m), m)
  lr = got['d']
  ml = _random_state(lr, (4, 3), jax.random.key(1)) * 4
  np.testing.assert_array_equal(lr.clip(ml), lr.clip(ml, 3.0))
  g = jnp.ones((4, 3))
  for a, b in zip(lr.clip_and_precondition(ml, None, g), lr.clip_and_precondition(ml, 3.0, g)):
    np.testing.assert_array_equal(a, b)


def test_spectrum_is_what_the_diagnostics_report():
  key = jax.random.key(2)
  for structure, shape in BUILTINS[1:]:
    m = _random_state(structure, shape, key)
    got = structure.spectrum(m, shape)
    mat = np.asarray(structure.matrix(m, shape), np.float64)
    if structure.elementwise:
      expected = np.sort(mat.ravel())[::-1]
    else:
      flat = mat.reshape((-1,) + mat.shape[-2:])
      expected = np.sort(np.linalg.eigvalsh(0.5 * (flat + np.swapaxes(flat, 1, 2))).ravel())[::-1]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=repr(structure))
  # A diagonal P along dimension numbers on a square leaf: its entries, not eigenvalues of them.
  s = S.WithDimensions(S.Diagonal(), S.FopDimensionNumbers(rows=1, batch=0))
  m = jnp.arange(16.0).reshape(4, 4) / 8
  np.testing.assert_allclose(s.spectrum(m, (4, 4)), np.sort(np.ravel(m) ** 2)[::-1])


def test_no_isinstance_on_structure_classes_outside_the_structure_files():
  classes = ('NoPreconditioner', 'Scalar', 'Diagonal', 'Full', 'Spatial', 'LowRank')
  from fop_optax import diagnostics, module_rules
  from fop_optax.structures import rule
  for module in (diagnostics, module_rules, rule):
    source = inspect.getsource(module)
    for line in source.splitlines():
      if 'isinstance(' in line:
        assert not any(c in line for c in classes), (module.__name__, line)


# --- a stack of equal-shaped leaves is one batched leaf -------------------------------------

STACKABLE = [
    (S.Full(), (4, 3)), (S.Full(row_axes=2, normalize=True), (2, 3, 5)),
    (S.Spatial(), (3, 3, 2, 4)), (S.LowRank(rank=2), (6, 3)), (S.Diagonal(), (4, 3)),
    (S.Scalar(), (4, 3)), (S.NoPreconditioner(), (4, 3)), (BlockDiagonal(2), (4, 3)),
]


@pytest.mark.parametrize('inner,shape', STACKABLE, ids=lambda x: repr(x))
@pytest.mark.parametrize('bound', [None, 1.0])
def test_stack_of_leaves_is_one_batched_leaf(inner, shape, bound):
  """``stacked(inner)`` on ``jnp.stack(leaves)`` equals ``inner`` on each leaf."""
  inner = inner.with_bound(bound)
  n = 3
  stack = S.stacked(inner, shape)
  assert isinstance(stack, S.WithDimensions) and stack.dims.batch == (0,)
  stack.validate((n,) + shape)
  key = jax.random.key(4)
  ms = [_random_state(inner, shape, jax.random.fold_in(key, i)) for i in range(n)]
  gs = [jax.random.normal(jax.random.fold_in(key, 10 + i), shape) for i in range(n)]
  gps = [jax.random.normal(jax.random.fold_in(key, 20 + i), shape) for i in range(n)]
  m, g, gp = jnp.stack(ms), jnp.stack(gs), jnp.stack(gps)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  keys = jax.random.split(key, n)
  close(stack.init((n,) + shape, jnp.float32, key),
        jnp.stack([inner.init(shape, jnp.float32, k) for k in keys]))
  assert stack.memory((n,) + shape) == n * inner.memory(shape)
  close(stack.precondition(m, g), jnp.stack([inner.precondition(*a) for a in zip(ms, gs)]))
  close(stack.hypergradient(m, g, gp, 0.1),
        jnp.stack([inner.hypergradient(a, b, c, 0.1) for a, b, c in zip(ms, gs, gps)]))
  close(stack.clip(m), jnp.stack([inner.clip(a) for a in ms]))
  clipped, out = stack.clip_and_precondition(m, None, g)
  per_leaf = [inner.clip_and_precondition(a, None, b) for a, b in zip(ms, gs)]
  close(clipped, jnp.stack([c for c, _ in per_leaf]))
  close(out, jnp.stack([o for _, o in per_leaf]))
  if inner.preconditions:
    close(stack.matrix(m, (n,) + shape), jnp.stack([inner.matrix(a, shape) for a in ms]))
    close(stack.spectrum(m, (n,) + shape),
          jnp.sort(jnp.concatenate([inner.spectrum(a, shape) for a in ms]))[::-1])
    close(stack.max_eigenvalue(m), max(inner.max_eigenvalue(a) for a in ms))
  layout, one = stack.layout((n,) + shape), inner.layout(shape)
  assert layout.batch == (0,) and layout.floats == n * one.floats
  assert layout.rows == tuple(r + 1 for r in one.rows)


def test_stacked_needs_leading_rows():
  @dataclasses.dataclass(frozen=True)
  class LastAxis(BlockDiagonal):
    def layout(self, shape):
      return S.Layout((len(shape) - 1,), (), tuple(range(len(shape) - 1)), None, 0)
  with pytest.raises(ValueError, match='leading'):
    S.stacked(LastAxis(), (4, 3))


def test_old_names_are_still_offered():
  names = """Any Callable ClassVar Collection DEFAULT_MAX_FULL_DIM DEFAULT_MAX_SCALE DEFAULT_RANK
      Diagonal FopDimensionNumbers Full Layout LowRank MAX_SPATIAL_TAPS NoPreconditioner
      REFERENCE_ROWS ROLES STRUCTURE_NAMES Scalar Shape Spatial Structure WithDimensions
      _ATTENTION_INPUTS _ATTENTION_LIKE_SUFFIXES _ATTENTION_OUTPUT _BISECTION_STEPS _BY_NAME
      _KINK_RTOL _NORM_OR_BIAS_NAMES _STACK_NAMES _STATE_BOUND_FACTOR _VARIABLE_ATTRS
      _apply_left _attention_blocks _axes _batched _clipped_derivative _contract_cols
      _contract_rows _dense _divided_differences _exceeds _expand_rows _gram
      _inverse _is_variable _labels _orthonormal_columns _pair _path_str _rows
      _scale_rows _snap _spectral_clip _state_floats _top_eigenpair as_matrix
      as_structure check_leaf_dtype default_structure find_attention_blocks leaf_names
      leaf_paths leaf_role normalize_dimensions resolve_structures suspect_node
      unwrapped_treedef with_dimensions""".split()
  # were module imports (the mesh helpers _explicit_mesh, _replicated, _spec moved to
  # fop_optax._sharding, shared with LODO and the transform)
  typing_names = {'Any', 'Callable', 'ClassVar', 'Collection'}
  missing = [n for n in names if n not in typing_names and not hasattr(S, n)]
  assert not missing
  assert set(S.__all__) <= set(dir(S))
  assert math.prod(S.Layout((0,), (), (1,), (2, 2), 4).matrix) == 4
