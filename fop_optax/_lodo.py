r"""LODO: a learned preconditioner *network*, trained online like FOP.

LODO (Liao et al., 2022) preconditions the momentum average ``m`` of the
gradients with a deep, sparse, linear network. With ``x`` the parameters
flattened into one vector of length ``n``:

* hidden width ``h = 2n + b − (2n mod b)`` (``b`` the block size), the input
  zero-padded to ``h`` by ``E = [Iₙ; 0]``;
* ``L`` layers; layer ``i`` gathers its input with a fixed random permutation
  ``Πᵢ``, then multiplies it by a block-diagonal matrix ``Dᵢ`` of ``h/b``
  blocks of size ``b×b`` (weights ``Wᵢ`` of shape ``(h/b, b, b)``):
  ``A = D_L Π_L ⋯ D_1 Π_1``;
* the preconditioner is ``P = G Gᵀ`` with ``G = EᵀAᵀ``:

  .. math::
    P·m = Eᵀ Aᵀ A E\, m,

  symmetric positive semi-definite by construction (no biases, no
  nonlinearity). Every block starts as a random orthogonal matrix, so
  ``AᵀA = I`` and ``P = I`` at the start: LODO's first step is momentum's.
  The permutations are drawn once (from ``seed``) and never trained.

The weights follow the one-step online hypergradient of
:mod:`fop_optax.learned`, with the momentum as the preconditioner's input: the
step ``θ_t = θ_{t−1} − α P(W_{t−1})·m_{t−1}`` gives

.. math::
  \frac{∂J(θ_t)}{∂W_{t−1}} = −α \Big(\frac{∂ P(W_{t−1}) m_{t−1}}{∂W}\Big)^⊤ g_t ,

one ``jax.vjp`` through the network, and ``W`` is trained by Adam on it. The
momentum is an EMA without bias correction, ``m_t = β m_{t−1} + (1 − β) g_t``.
With one dense layer and no permutation (``AE = M``) this is FOP's
hypergradient ``−α M(m gᵀ + g mᵀ)`` with ``G_{t−1}`` replaced by ``m``.

Options beyond the reference code (which flattens all parameters into one
vector): ``per_leaf=True`` gives every leaf its own network (memory and work
per leaf, nothing mixes across leaves, so a leaf's preconditioner is not
tied to the rest of the model's size); ``architecture='diagonal'``
(``P = diag(w)``) and ``'global'`` (``P = w·I``, one scalar) are the
paper's ablations. Weights are float32 (float64 for float64 parameters, or as
``weight_dtype`` says; the reference used float64); updates keep the
parameters' dtypes. Under a sharding mesh the flattened vector and the weights
are replicated (the network mixes every coordinate with every other).

Cost at ``L = 16``, ``b = 4``: ``L·h·b ≈ 128n`` weights (≈ 384n numbers with
Adam's two moments), ``2·L·h·b ≈ 256n`` multiply-adds and ``2L`` gathers of
length ``h`` for ``P·m``, about four times that per step with the
hypergradient's VJP.

References:
  Liao, Dangovski, Foerster, Soljačić, `Learning to Optimize Quasi-Newton
  Methods <https://arxiv.org/abs/2210.06171>`_, TMLR 2023.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fop_optax import _checks
from fop_optax import _sharding
from fop_optax import learned

__all__ = ['ARCHITECTURES', 'hidden_width', 'lodo_preconditioner', 'scale_by_lodo',
           'preconditioner_matrix']

ARCHITECTURES = ('network', 'diagonal', 'global')
#: Adam's ε of the default meta-optimiser: Keras's ε̂ = 1e-7 (the reference
#: implementation's Adam) once 0.999ᵗ ≪ 1.
META_ADAM_EPS = 1e-7

_NAME = 'scale_by_lodo'


def hidden_width(n: int, block_size: int) -> int:
  """``h = 2n + b − (2n mod b)``: the reference's width (a whole extra block when ``b | 2n``)."""
  return 2 * n + block_size - (2 * n) % block_size


# ----------------------------------------------------------------------------- permutations

_MASK = (1 << 64) - 1


def _splitmix64_int(z: int) -> int:
  z = (z + 0x9E3779B97F4A7C15) & _MASK
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
  return z ^ (z >> 31)


def _splitmix64(z: np.ndarray) -> np.ndarray:
  # uint64 array arithmetic wraps modulo 2⁶⁴, as splitmix64 wants.
  z = z + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def _permutations(h: int, num_layers: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
  """``(perms, inverses)``, each ``(num_layers, h)`` int32: fixed random permutations.

  Sorting splitmix64 hashes of ``(seed, stream, layer, index)``: the same
  permutations on every machine and NumPy/JAX version, so a checkpointed state
  resumes with the network it was trained with (they are not stored in it).
  """
  perms = np.empty((num_layers, h), np.int32)
  for layer in range(num_layers):
    base = _splitmix64_int(_splitmix64_int(_splitmix64_int(seed & _MASK) ^ stream) ^ layer)
    keys = _splitmix64(np.arange(h, dtype=np.uint64) ^ np.uint64(base))
    perms[layer] = np.argsort(keys, kind='stable')
  inverses = np.argsort(perms, axis=1, kind='stable').astype(np.int32)
  perms.setflags(write=False)
  inverses.setflags(write=False)
  return perms, inverses


def _orthogonal_blocks(key, num_blocks: int, b: int, dtype) -> jax.Array:
  """``num_blocks`` random orthogonal ``b×b`` matrices (Gram–Schmidt twice, no LAPACK).

  Batched QR or SVD under ``jax.vmap`` can deadlock XLA:CPU (see
  ``fop_optax._linalg``); ``b`` is small, so an unrolled CGS2 over columns is cheap.
  """
  z = jax.random.normal(key, (num_blocks, b, b), jnp.float32).astype(dtype)
  cols = []
  for j in range(b):
    x = z[:, :, j]
    for _ in range(2):
      for q in cols:
        x = x - jnp.sum(q * x, axis=1, keepdims=True) * q
    x = x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    cols.append(x)
  return jnp.stack(cols, axis=2)


# ----------------------------------------------------------------------------- the network

def _network_init(n: int, num_layers: int, b: int, seed: int, stream: int, dtype):
  h = hidden_width(n, b)
  key = jax.random.fold_in(jax.random.key(seed), stream)
  return [_orthogonal_blocks(jax.random.fold_in(key, i), h // b, b, dtype)
          for i in range(num_layers)]


# The layers' primitives with hand-written VJPs. Autodiff's own are correct but slow on
# XLA:CPU: a gather's transpose is a scatter-add (here: a gather by the inverse
# permutation), and the weight cotangent of h/b tiny products became a batched matmul
# (here: one broadcast outer product per block).
def _block_apply(y, w, b: int):
  """``y_n ↦ y_n W_n`` for each block ``n`` (``y`` flat, length ``h``; ``w`` (h/b, b, b))."""
  y = y.reshape(-1, b)
  # A sum of b column-times-row products: XLA:CPU runs the einsum as a batched matmul.
  return sum(y[:, i:i + 1] * w[:, i, :] for i in range(b)).reshape(-1)


def _block_apply_transposed(y, w, b: int):
  """``y_n ↦ y_n W_nᵀ`` for each block ``n``."""
  y = y.reshape(-1, b)
  return sum(y[:, o:o + 1] * w[:, :, o] for o in range(b)).reshape(-1)


def _outer(y, c, b: int):
  """``∂⟨c, block_apply(y, W)⟩/∂W``: the blockwise outer products ``y_n c_nᵀ``."""
  return y.reshape(-1, b, 1) * c.reshape(-1, 1, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocks(y, w, b):
  return _block_apply(y, w, b)


def _blocks_fwd(y, w, b):
  return _block_apply(y, w, b), (y, w)


def _blocks_bwd(b, res, c):
  y, w = res
  return _block_apply_transposed(c, w, b), _outer(y, c, b)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocks_t(y, w, b):
  return _block_apply_transposed(y, w, b)


def _blocks_t_fwd(y, w, b):
  return _block_apply_transposed(y, w, b), (y, w)


def _blocks_t_bwd(b, res, c):
  y, w = res
  return _block_apply(c, w, b), _outer(c, y, b)


_blocks_t.defvjp(_blocks_t_fwd, _blocks_t_bwd)


def _gather(y, perm, inverse):
  """``y[perm]``, whose transpose is ``y[inverse]`` (a gather, not a scatter-add)."""

  @jax.custom_vjp
  def permute(y):
    return y.at[perm].get(mode='promise_in_bounds', unique_indices=True)

  def fwd(y):
    return permute(y), None

  def bwd(_, c):
    return (c.at[inverse].get(mode='promise_in_bounds', unique_indices=True),)

  permute.defvjp(fwd, bwd)
  return permute(y)


def _network_apply(weights, x, b: int, seed: int, stream: int):
  """``Eᵀ AᵀA E x`` for one flat vector ``x`` of length ``n``."""
  n = x.shape[0]
  h = hidden_width(n, b)
  perms, inverses = _permutations(h, len(weights), seed, stream)
  y = jnp.concatenate([x, jnp.zeros((h - n,), x.dtype)])
  for i, w in enumerate(weights):                       # A = D_L Π_L ⋯ D_1 Π_1
    y = _blocks(_gather(y, perms[i], inverses[i]), w, b)
  for i in reversed(range(len(weights))):               # then Aᵀ
    y = _gather(_blocks_t(y, weights[i], b), inverses[i], perms[i])
  return y[:n]



# ----------------------------------------------------------------------------- the preconditioner

def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
        f'{_NAME}: {name} must be a Python int (it sets array shapes), got {value!r}; with '
        f'optax.inject_hyperparams pass static_args=({name!r},) or leave it at its default')
  if value < minimum:
    raise ValueError(f'{_NAME}: {name} must be >= {minimum}, got {value}')


def _weight_dtype(leaves, weight_dtype):
  if weight_dtype is not None:
    dtype = jnp.dtype(weight_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f'{_NAME}: weight_dtype must be a floating dtype, got {dtype}')
    return dtype
  dtype = jnp.dtype(jnp.float32)
  for p in leaves:
    dtype = jnp.promote_types(dtype, p.dtype)
  return dtype


def lodo_preconditioner(num_layers: int = 16, block_size: int = 4, *, seed: int = 0,
                        architecture: str = 'network', per_leaf: bool = False,
                        weight_dtype: Optional[Any] = None):
  """LODO's preconditioner as ``(init_fn, apply_fn)`` for :func:`fop_optax.scale_by_learned_preconditioner`.

  ``init_fn(params)`` returns ``w``, a list with one entry per *group* of
  leaves (one group holding every leaf, or one per leaf with ``per_leaf``):
  the ``num_layers`` weight arrays ``(h/b, b, b)`` of the network, a length-``n``
  vector of ones (``'diagonal'``) or a scalar 1 (``'global'``); an empty list
  for a zero-size leaf of its own. ``apply_fn(w, u)`` returns ``P(w)·u`` with
  ``u``'s shapes and dtypes. ``P = I`` at ``w = init_fn(params)``.

  Args: see :func:`scale_by_lodo`.
  """
  _check_int('num_layers', num_layers, 1)
  _check_int('block_size', block_size, 1)
  _check_int('seed', seed, 0)
  if architecture not in ARCHITECTURES:
    raise ValueError(f'{_NAME}: architecture must be one of {ARCHITECTURES}, got {architecture!r}')
  if not isinstance(per_leaf, bool):
    raise TypeError(f'{_NAME}: per_leaf must be a bool, got {per_leaf!r}')

  def groups(leaves):
    return [[i] for i in range(len(leaves))] if per_leaf else [list(range(len(leaves)))]

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    dtype = _weight_dtype(leaves, weight_dtype)
    w = []
    for stream, group in enumerate(groups(leaves)):
      n = sum(math.prod(leaves[i].shape) for i in group)
      if n == 0:
        w.append([])
      elif architecture == 'network':
        w.append([_sharding.replicate(x) for x in
                  _network_init(n, num_layers, block_size, seed, stream, dtype)])
      elif architecture == 'diagonal':
        w.append(_sharding.replicate(jnp.ones((n,), dtype)))
      else:
        w.append(jnp.ones((), dtype))
    return w

  def apply_fn(w, u):
    leaves, treedef = jax.tree.flatten(u)
    out = list(leaves)
    for stream, (group, wg) in enumerate(zip(groups(leaves), w)):
      n = sum(leaves[i].size for i in group)
      if n == 0:
        continue
      dtype = jax.tree.leaves(wg)[0].dtype
      x = jnp.concatenate([_sharding.replicate(leaves[i]).reshape(-1).astype(dtype)
                           for i in group])
      if architecture == 'network':
        y = _network_apply(wg, x, block_size, seed, stream)
      else:
        y = wg * x
      offset = 0
      for i in group:
        size = leaves[i].size
        piece = y[offset:offset + size].reshape(leaves[i].shape).astype(leaves[i].dtype)
        out[i] = _sharding.reshard_like(piece, leaves[i])
        offset += size
    return treedef.unflatten(out)

  return init_fn, apply_fn


def scale_by_lodo(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    meta_learning_rate: float = 1e-3,
    momentum: Optional[float] = 0.9,
    num_layers: int = 16,
    block_size: int = 4,
    *,
    meta_optimizer: Optional[optax.GradientTransformation] = None,
    seed: int = 0,
    architecture: str = 'network',
    per_leaf: bool = False,
    weight_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LODO's preconditioning (Liao et al., 2022): returns ``P(W)·m``, ``P = Eᵀ AᵀA E``.

  ``m`` is the EMA ``β m + (1 − β) g`` of the gradients (no bias correction)
  and ``P`` the learned network of this module, trained online by
  ``meta_optimizer`` on the exact one-step hypergradient. Place it before the
  step that applies the learning rate (the alias :func:`fop_optax.lodo` does)::

    optax.chain(fop_optax.scale_by_lodo(0.1), optax.scale_by_learning_rate(0.1))

  The state is :class:`fop_optax.LearnedPreconditionerState`; its
  ``preconditioner_params`` holds the weights (see :func:`lodo_preconditioner`).

  Differences from the reference code, all small: the first call leaves ``W``
  and the meta-optimiser's state untouched (the reference takes a zero
  meta-gradient step there, which moves nothing but advances Adam's count);
  the default meta-optimiser is ``optax.adam(meta_learning_rate, eps=1e-7)``
  with a constant ``ε`` (Keras's ``ε̂ = 1e-7`` is ``ε = 1e-7/√(1 − 0.999ᵗ)``
  in optax's convention, the same once ``t ≫ 1000``); weights are float32
  unless the parameters are float64 (the reference: float64).

  Args:
    learning_rate: ``α`` of the step that follows (a float or a schedule); it
      scales the hypergradient (with Adam as meta-optimiser its scale mostly
      cancels). The reference's default is 1.0.
    meta_learning_rate: Adam's learning rate for the weights (1e-3).
    momentum: ``β`` of the EMA (0.9); ``None`` or 0 for none (the reference's
      no-momentum ablation).
    num_layers: ``L`` (16), layers of the network (its transpose is applied
      after them).
    block_size: ``b`` (4), size of the orthogonal blocks.
    meta_optimizer: replaces ``optax.adam(meta_learning_rate, eps=1e-7)``
      (e.g. ``optax.sgd``, the paper's SGD ablation).
    seed: seeds the orthogonal initialisation and the fixed permutations.
    architecture: ``'network'`` (LODO), ``'diagonal'`` (``P = diag(w)``,
      ``w`` one per parameter, starting at 1) or ``'global'`` (``P = w·I``).
      The ablations' ``P`` is linear in ``w`` and need not stay positive.
    per_leaf: one network (or diagonal, or scalar) per leaf instead of one
      for the whole flattened parameter vector. The reference flattens
      everything; per leaf, memory and the network's reach follow each leaf.
    weight_dtype: dtype of the weights; default float32, float64 when a
      parameter is float64.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, fop_optax
    >>> def f(p): return jnp.sum((p['w'] @ jnp.array([1., 2.]) - jnp.array([1., 0., -1.])) ** 2)
    >>> tx = optax.chain(fop_optax.scale_by_lodo(0.05), optax.sgd(0.05))
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(50):
    ...   params, state = step(params, state)
    >>> print(bool(f(params) < 0.05))   # down from 2.0 (1.70E-02 on one machine)
    True


  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Liao et al., `Learning to Optimize Quasi-Newton Methods
    <https://arxiv.org/abs/2210.06171>`_, TMLR 2023
  """
  init_fn, apply_fn = lodo_preconditioner(
      num_layers, block_size, seed=seed, architecture=architecture, per_leaf=per_leaf,
      weight_dtype=weight_dtype)
  _checks.check_rate('learning_rate', learning_rate, allow_zero=False, where=_NAME)
  if meta_optimizer is None:
    _checks.check_number('meta_learning_rate', meta_learning_rate, allow_zero=True, where=_NAME)
    meta_optimizer = optax.adam(meta_learning_rate, eps=META_ADAM_EPS)
  if momentum is not None:
    beta = _checks._concrete(momentum)  # pylint: disable=protected-access
    if beta is not None and not (np.all(beta >= 0) and np.all(beta < 1)):
      raise ValueError(f'{_NAME}: momentum must be in [0, 1), got {momentum}')
  no_momentum = momentum is None or (isinstance(momentum, numbers.Real) and momentum == 0)
  direction = None if no_momentum else optax.ema(momentum, debias=False)
  return learned.scale_by_learned_preconditioner(
      apply_fn, init_fn, learning_rate, meta_optimizer, direction)


def preconditioner_matrix(apply_fn, w, n: int, dtype=jnp.float32) -> jax.Array:
  """The dense ``P`` (n×n) of a preconditioner acting on one vector of length ``n`` (diagnostics).

  Column ``j`` is ``apply_fn(w, e_j)``; for small ``n`` only (``n`` applications).
  """
  eye = jnp.eye(n, dtype=dtype)
  return jax.lax.map(lambda e: apply_fn(w, e), eye).T
