"""Read-only views of FOP state for logging and plots.

All functions take an optimiser state (FOP's own, or any state that contains
one, e.g. from :func:`fop_optax.fop` or an ``optax.chain``), the parameters (or
anything with their shapes, such as gradients) and the same ``structures`` and
rule keywords given to :func:`fop_optax.scale_by_fop` (``max_scale`` included:
the default is the transformation's default, 1), so that each leaf's ``M`` is
read the way the transformation reads it and the ``P`` reported is the one
applied. Nothing is modified.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fop_optax import structures as structures_lib
from fop_optax.transform import FopState

__all__ = ['find_fop_state', 'preconditioner_matrices', 'spectra',
           'rotation_angles']


def find_fop_state(opt_state: optax.OptState) -> FopState:
  """Returns the (single) :class:`FopState` inside ``opt_state``."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, FopState))
           if isinstance(s, FopState)]
  if len(found) != 1:
    raise ValueError(f'expected exactly one FopState in the optimiser state, found {len(found)}')
  return found[0]


def _per_leaf(fn, opt_state, params, structures, rule_kwargs):
  """Applies ``fn(structure, leaf, m)`` per preconditioned leaf.

  Returns a tree shaped like the state's preconditioners (``None`` where a
  leaf is not preconditioned).
  """
  state = find_fop_state(opt_state)
  structs = jax.tree.leaves(structures_lib.resolve_structures(params, structures, **rule_kwargs))
  results = [
      fn(s, p, m) if s.preconditions else None
      for s, p, m in zip(structs, jax.tree.leaves(params),
                         jax.tree.leaves(state.preconditioners))]
  return jax.tree.structure(state.preconditioners).unflatten(results)


def preconditioner_matrices(opt_state, params, structures=None, **rule_kwargs) -> Any:
  """Each leaf's ``P``: (a×a) for full/spatial/low-rank (FOP-norm scaling
  included), leaf-shaped ``m²`` for diagonal, a scalar for scalar, ``None``
  for unpreconditioned leaves."""
  return _per_leaf(lambda s, p, m: s.matrix(m, tuple(p.shape)),
                   opt_state, params, structures, rule_kwargs)


def spectra(opt_state, params, structures=None, **rule_kwargs) -> Any:
  """Each leaf's eigenvalues of ``P``, in descending order (a 1-D array).

  A leaf with batch axes (:class:`fop_optax.WithDimensions`) has one ``P`` per
  batch index: their eigenvalues are pooled into the one array. Each
  structure computes its own (:meth:`fop_optax.structures.Structure.spectrum`).
  """
  return _per_leaf(lambda s, p, m: s.spectrum(m, tuple(p.shape)),
                   opt_state, params, structures, rule_kwargs)


def rotation_angles(opt_state, grads, structures=None, **rule_kwargs) -> Any:
  """Each leaf's angle, in degrees, between a gradient ``g`` and ``P·g``.

  The paper's appendix reports it stays well below 90°, i.e. ``P·g`` is a
  descent direction. Pass the gradients the state's ``P`` is applied to.
  """
  def angle(s, g, m):
    pg = s.precondition(m, g).astype(m.dtype)
    g = g.astype(m.dtype)
    cos = jnp.vdot(g, pg) / jnp.maximum(jnp.linalg.norm(g) * jnp.linalg.norm(pg),
                                        jnp.finfo(m.dtype).tiny)
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
  return _per_leaf(angle, opt_state, grads, structures, rule_kwargs)
