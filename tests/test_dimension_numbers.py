"""Explicit dimension numbers: ``WithDimensions`` against dense and autodiff oracles.

A leaf is read through ``FopDimensionNumbers(rows, batch)``: its axes are moved to
``(*batch, *rows, *columns)`` and each batch index's slice, viewed as the matrix
``(∏rows, ∏columns)``, is preconditioned by its own ``P = MᵀM``. The oracles below
build that view with numpy (move axes, reshape, multiply, move back) and the
hypergradient with ``jax.grad`` of ``J(θ − η·P(M)·g_prev)`` through a dense ``P``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fop_optax
from fop_optax import structures as S

Dims = S.FopDimensionNumbers

# (inner structure, leaf shape, dims): rows in the middle, a batch axis.
CASES = [
    ('full', S.Full(), (3, 2, 5, 4), Dims(rows=2, batch=0)),
    ('full_two_rows', S.Full(), (2, 3, 4, 5), Dims(rows=(3, 1), batch=(2,))),
    ('full_batch_last', S.Full(), (4, 5, 3), Dims(rows=1, batch=-1)),
    ('low_rank', S.LowRank(rank=2), (3, 2, 7, 4), Dims(rows=2, batch=0)),
    ('low_rank_two_batch', S.LowRank(rank=2), (2, 7, 3, 2), Dims(rows=1, batch=(0, 2))),
    # A scanned conv stack (L, kh, kw, in, out): spatial over the taps, one P per layer.
    ('spatial', S.Spatial(), (3, 2, 2, 3, 4), Dims(rows=(1, 2), batch=0)),
]


def _view(x, dims):
  """numpy: ``x`` as ``(*batch_shape, a, b)`` and the axis order used."""
  rows, batch, cols = S.normalize_dimensions(dims, x.ndim)
  perm = batch + rows + cols
  moved = np.transpose(x, perm)
  bshape = tuple(x.shape[i] for i in batch)
  a = math.prod(x.shape[i] for i in rows)
  return moved.reshape(bshape + (a, -1)), perm, moved.shape


def _unview(y, perm, moved_shape):
  return np.transpose(y.reshape(moved_shape), np.argsort(perm))


def _dense_m(inner, m_b, a):
  """The (a×a) ``M`` of one batch index (jnp, differentiable)."""
  if isinstance(inner, S.LowRank):
    return jnp.eye(a, dtype=m_b.dtype) + m_b[0] @ m_b[1].T
  return m_b


def _dense_p(inner, m_b, a, bound):
  mm = _dense_m(inner, m_b, a)
  p = mm.T @ mm
  if bound is None:
    return p
  lam, q = jnp.linalg.eigh(p)
  return (q * jnp.minimum(lam, bound)) @ q.T


def _random_m(structure, shape, key, scale):
  m = structure.init(shape, jnp.float32, key)
  return m + scale * jax.random.normal(jax.random.fold_in(key, 1), m.shape)


def _apply_oracle(inner, m, g, dims, bound):
  """numpy: ``P_i·G_i`` for every batch index, mapped back to the leaf's shape."""
  view, perm, moved_shape = _view(np.asarray(g, np.float64), dims)
  a = view.shape[-2]
  bshape = view.shape[:-2]
  m = np.asarray(m)
  out = np.empty_like(view)
  for idx in np.ndindex(*bshape):
    p = np.asarray(_dense_p(inner, jnp.asarray(m[idx]), a, bound), np.float64)
    out[idx] = p @ view[idx]
  return _unview(out, perm, moved_shape)


@pytest.mark.parametrize('bound', [None, 1.0], ids=['unguarded', 'guard'])
@pytest.mark.parametrize('name, inner, shape, dims', CASES, ids=[c[0] for c in CASES])
def test_precondition_matches_dense_oracle(name, inner, shape, dims, bound):
  structure = S.WithDimensions(inner, dims).with_bound(bound)
  structure.validate(shape)
  keys = jax.random.split(jax.random.key(0), 2)
  m = _random_m(structure, shape, keys[0], 0.3)
  g = jax.random.normal(keys[1], shape)
  got = structure.precondition(m, g)
  assert got.shape == g.shape
  np.testing.assert_allclose(got, _apply_oracle(inner, m, g, dims, bound), rtol=2e-4, atol=2e-5)
  # One matrix per batch index, (a×a).
  rows, batch, _ = S.normalize_dimensions(dims, len(shape))
  a = math.prod(shape[i] for i in rows)
  assert structure.matrix(m, shape).shape == tuple(shape[i] for i in batch) + (a, a)
  assert structure.layout(shape).matrix == tuple(shape[i] for i in batch) + (a, a)
  # clip_and_precondition applies the projected M.
  m2, out2 = structure.clip_and_precondition(m, 1.0, g)
  np.testing.assert_allclose(out2, structure.precondition(m2, g), rtol=1e-4, atol=1e-5)


def _loss(theta, target):
  return 0.5 * jnp.sum(jnp.square(theta - target) * (1 + jnp.abs(target)))


@pytest.mark.parametrize('bound', [None, 1.0], ids=['unguarded', 'guard'])
@pytest.mark.parametrize('name, inner, shape, dims', CASES, ids=[c[0] for c in CASES])
def test_hypergradient_matches_autodiff(name, inner, shape, dims, bound):
  with jax.enable_x64(True):
    structure = S.WithDimensions(inner, dims).with_bound(bound)
    keys = jax.random.split(jax.random.key(1), 4)
    m = _random_m(structure, shape, keys[0], 0.3).astype(jnp.float64)
    theta = jax.random.normal(keys[1], shape, jnp.float64)
    target = jax.random.normal(keys[2], shape, jnp.float64)
    g_prev = jax.random.normal(keys[3], shape, jnp.float64)
    eta = 0.1
    rows, batch, cols = S.normalize_dimensions(dims, len(shape))
    perm = batch + rows + cols
    inv = tuple(int(i) for i in np.argsort(perm))
    a = math.prod(shape[i] for i in rows)
    bshape = tuple(shape[i] for i in batch)

    def dense_step(m):
      # θ − η·P(M)·g_prev with P built densely per batch index.
      gv = jnp.transpose(g_prev, perm)
      moved = gv.shape
      gv = gv.reshape(bshape + (a, -1))
      flat_m = m.reshape((-1,) + m.shape[len(bshape):])
      flat_g = gv.reshape((-1, a, gv.shape[-1]))
      if isinstance(inner, S.LowRank) and bound is not None:
        # P = I on the complement of span(U, V): a dense eigh has a repeated eigenvalue 1,
        # where its derivative is undefined, so autodiff goes through the plain 2-D
        # LowRank (bounded) on each slice's (a, b) matrix instead (its small eigh).
        flat = dataclasses.replace(inner, row_axes=1, max_scale=bound)
        outs = jnp.stack([flat.precondition(flat_m[i], flat_g[i])
                          for i in range(flat_g.shape[0])])
      else:
        outs = jnp.stack([_dense_p(inner, flat_m[i], a, bound) @ flat_g[i]
                          for i in range(flat_g.shape[0])])
      return theta - eta * jnp.transpose(outs.reshape(moved), inv)

    oracle = jax.grad(lambda m: _loss(dense_step(m), target))(m)
    g = jax.grad(_loss)(dense_step(m), target)
    got = structure.hypergradient(m, g, g_prev, eta)
    assert got.shape == m.shape
    # The guard really clips somewhere (P's eigenvalues exceed 1 in some batch index).
    if bound is not None:
      raw = dataclasses.replace(structure, inner=dataclasses.replace(structure.inner, max_scale=None))
      assert float(raw.max_eigenvalue(m)) > 1.05
    np.testing.assert_allclose(got, oracle, rtol=1e-7, atol=1e-9)


def test_batch_indices_never_mix():
  # A gradient that is nonzero in one batch index leaves every other index's update at 0.
  shape, dims = (3, 2, 6, 4), Dims(rows=2, batch=0)
  structure = S.WithDimensions(S.Full(), dims)
  m = _random_m(structure, shape, jax.random.key(3), 0.3)
  g = jnp.zeros(shape).at[1].set(jax.random.normal(jax.random.key(4), shape[1:]))
  out = structure.precondition(m, g)
  assert np.abs(np.asarray(out[1])).max() > 0
  np.testing.assert_array_equal(out[0], 0)
  np.testing.assert_array_equal(out[2], 0)
  hg = structure.hypergradient(m, g, g, 0.1)
  np.testing.assert_array_equal(hg[0], 0)
  np.testing.assert_array_equal(hg[2], 0)


def test_top_eigen_and_max_eigenvalue_are_the_largest_block():
  shape, dims = (3, 5, 4), Dims(rows=1, batch=0)
  structure = S.WithDimensions(S.Full(), dims)
  m = _random_m(structure, shape, jax.random.key(5), 0.4)
  per_index = [float(jnp.linalg.eigvalsh(m[i].T @ m[i])[-1]) for i in range(3)]
  lam, dlam = structure.top_eigen(m)
  np.testing.assert_allclose(lam, max(per_index), rtol=1e-5)
  np.testing.assert_allclose(structure.max_eigenvalue(m), max(per_index), rtol=1e-5)
  top = int(np.argmax(per_index))
  assert all(np.abs(np.asarray(dlam[i])).max() == 0 for i in range(3) if i != top)
  assert np.abs(np.asarray(dlam[top])).max() > 0


@pytest.mark.parametrize('dims, match', [
    (Dims(rows=3, batch=0), 'out of range'),
    (Dims(rows=1, batch=1), 'twice'),
    (Dims(rows=(), batch=0), 'at least one row axis'),
])
def test_invalid_dimension_numbers(dims, match):
  with pytest.raises(ValueError, match=match):
    S.WithDimensions(S.Full(), dims).validate((3, 4, 5))


def test_with_dimensions_helper_and_labels():
  assert S.with_dimensions(S.Full(), Dims(rows=(0, 1))) == S.Full(row_axes=2)
  assert S.with_dimensions(S.NoPreconditioner(), Dims(rows=1, batch=0)) == S.NoPreconditioner()
  assert isinstance(S.with_dimensions(S.Full(), Dims(rows=1, batch=0)), S.WithDimensions)
  # FopDimensionNumbers as a structures= leaf: dense over the rows (full up to max_full_dim).
  params = {'small': jnp.zeros((3, 8, 4)), 'big': jnp.zeros((2, 64, 4))}
  got = fop_optax.resolve_structures(params, {'small': Dims(1, 0), 'big': Dims(1, 0)})
  assert got['small'] == S.WithDimensions(S.Full(max_scale=1.0), Dims((1,), (0,)))
  assert got['big'] == S.WithDimensions(S.LowRank(rank=8, max_scale=1.0), Dims((1,), (0,)))
  assert 'rows' in repr(S.Spatial())


def test_fop_trains_with_dimension_numbers_and_diagnostics_read_it():
  # A scanned stack (L, in, out): one P per layer through fop(), read back by diagnostics.
  L, din, dout = 3, 6, 5
  params = {'stack': jnp.zeros((L, din, dout)), 'w': jnp.zeros((din, dout))}
  structures = {'stack': S.WithDimensions(S.Full(), Dims(rows=1, batch=0)), 'w': 'auto'}
  tx = fop_optax.fop(0.1, 0.9, hyper_learning_rate=0.05, structures=structures)
  x = jax.random.normal(jax.random.key(0), (32, din))
  ys = jax.random.normal(jax.random.key(1), (L, 32, dout))

  def loss(p):
    pred = jnp.einsum('bi,lio->lbo', x, p['stack'])
    return jnp.mean(jnp.square(pred - ys)) + jnp.mean(jnp.square(x @ p['w'] - ys[0]))

  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda l, g: (l, *tx.update(g, s, p)))(*jax.value_and_grad(loss)(p)))
  losses = []
  for _ in range(20):
    l, updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    losses.append(float(l))
  assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]
  mats = fop_optax.diagnostics.preconditioner_matrices(state, params, structures)
  assert mats['stack'].shape == (L, din, din)
  assert not np.allclose(mats['stack'], np.eye(din))   # it learned
  # Each layer's own P: symmetric, eigenvalues within the guard's bound.
  for i in range(L):
    np.testing.assert_allclose(mats['stack'][i], mats['stack'][i].T, atol=1e-6)
    assert np.linalg.eigvalsh(np.asarray(mats['stack'][i]))[-1] <= 1 + 1e-4
  # spectra pools every layer's eigenvalues (before: a batched P fell through to its raw entries)
  spectrum = np.asarray(fop_optax.diagnostics.spectra(state, params, structures)['stack'])
  blocks = np.sort(np.concatenate([np.linalg.eigvalsh(np.asarray(mats['stack'][i], np.float64))
                                   for i in range(L)]))[::-1]
  assert spectrum.shape == (L * din,)
  np.testing.assert_allclose(spectrum, blocks, atol=1e-5)
