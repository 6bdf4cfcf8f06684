"""The structure protocol: what every structure provides, and the name registry.

A *structure* says how one parameter leaf is preconditioned. It is a frozen
dataclass (hashable, comparable, usable as a static pytree leaf) subclassing
:class:`Structure`, and it provides, for a leaf of ``shape`` with learned state
``m`` and gradients ``g`` (now) and ``g_prev`` (the previous step's):

*Its state*

* ``init(shape, dtype, key)``: ``m`` with ``P = I`` (FOP's first step is the
  base optimiser's).
* ``memory(shape)``: floats in ``m`` (the size of ``init``'s array).

*The step*

* ``precondition(m, g)``: ``P·g``, with ``g``'s shape and dtype.
* ``hypergradient(m, g, g_prev, learning_rate)``: ``∂J(θ_t)/∂m`` for
  ``θ_t = θ_{t-1} − η·P(m)·g_prev`` and ``g = ∇J(θ_t)`` (exact, one step).
* ``hyper_step_scale(shape)``: factor on the default (Adam) hyper step.

*The bound (the guard)*

* ``max_scale``: the guard ``B`` on ``λ_max(P)`` (``None``: none). It travels
  one way: set once, by ``with_bound`` during resolution (a value given
  explicitly is kept), and read back by ``clip``.
* ``with_bound(B)``: this structure with ``max_scale = B`` unless it has one.
* ``clip(m, max_scale=None)``: the projection after each hyper step; the bound
  defaults to ``self.max_scale`` (``clip(m, B)`` still takes one explicitly).
* ``clip_and_precondition(m, max_scale, g)``: ``(clip(m), precondition(clipped
  m, g))`` sharing their work; ``max_scale=None``: the own bound.

*Its spectrum*

* ``matrix(m, shape)``: ``P`` for diagnostics (``(*batch, a, a)``, or
  leaf-shaped when ``elementwise``).
* ``spectrum(m, shape)``: ``P``'s eigenvalues, descending, 1-D (what
  :func:`fop_optax.diagnostics.spectra` reports).
* ``max_eigenvalue(m)``: ``λ_max`` of the ``P`` applied.
* ``top_eigen(m)``: ``(λ_max(MᵀM), ∂λ/∂m)`` of the raw ``M`` (for ``gamma``).

*Its layout*

* ``validate(shape)``: raises ``ValueError`` for a leaf it cannot serve.
* ``layout(shape)``: a :class:`Layout` (rows, batch, columns, ``P``'s shape,
  floats) for :func:`fop_optax.describe`.
* ``with_row_axes(k)``: the structure reading its rows as a slice's first ``k``
  axes (what :class:`~fop_optax.structures.WithDimensions` applies per slice).
* ``from_label(**rule_kwargs)``: the instance a label (``'full'``, ...) stands
  for, given ``max_full_dim``, ``rank``, ``normalize``.

*Flags* (class attributes, read instead of ``isinstance`` checks)

* ``preconditions``: ``False`` only for ``none`` (``P = I``; no diagnostics,
  no ``gamma`` normalisation).
* ``elementwise``: ``P`` is ``m²`` entrywise (``scalar``, ``diagonal``):
  ``matrix`` is leaf-shaped and its entries are the eigenvalues.
* ``replicated_state``: ``m`` is pinned replicated under a mesh (``False``
  for ``diagonal``, whose leaf-shaped ``m`` follows its leaf's sharding).
* ``takes_row_axes``: the rows are the leaf's first ``row_axes`` axes, so
  ``with_row_axes(k)`` on a whole leaf is the same view as dimension numbers
  ``rows=range(k)`` (``full``, ``low_rank``).
* ``needs_rows``: a matrix structure, which needs at least one row axis.

The defaults below serve a structure that only defines ``init``,
``precondition``, ``hypergradient`` and ``matrix``: ``memory`` evaluates
``init`` abstractly, ``spectrum`` takes the eigenvalues of a square ``matrix``
(the entries otherwise), ``with_bound`` fills a dataclass field ``max_scale``
if the structure has one, ``clip`` leaves ``m`` as it is. A structure that
wants the guard declares ``max_scale: float | None = None`` as a field and reads
its bound in ``clip`` through ``self._bound(max_scale)``; ``with_bound`` leaves
one without the field as it is (``max_scale`` stays ``None``: no bound).

A *stack of equal-shaped leaves* is one batched leaf: ``jnp.stack(leaves)``
preconditioned by :class:`~fop_optax.structures.WithDimensions` with
``batch=0`` (one ``P`` per leaf, the rows shifted by one) equals the structure
applied to each leaf; :func:`~fop_optax.structures.stacked` builds it.

A new structure is one file and one line: decorate the class with
``@register('name')`` and the label ``'name'`` is accepted wherever a structure
is (``structures=`` of :func:`fop_optax.fop`, :func:`fop_optax.describe`, the
diagnostics). A :class:`Structure` instance needs no registration at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from fop_optax import _linalg

__all__ = ['Structure', 'Layout', 'register', 'registered', 'structure_names']

Shape = tuple[int, ...]


class Layout(NamedTuple):
  """How a structure reads a leaf (:meth:`Structure.layout`), for reports.

  Attributes:
    rows: the axes ``P`` acts on.
    batch: axes with one ``P`` per index.
    columns: the axes sharing ``P``.
    matrix: the shape of ``P`` as :meth:`Structure.matrix` returns it
      (``(*batch, a, a)``; leaf-shaped for ``diagonal``; ``()`` for
      ``scalar``); ``None`` for ``none``.
    floats: the number of floats in the learned ``m``.
  """

  rows: tuple[int, ...]
  batch: tuple[int, ...]
  columns: tuple[int, ...]
  matrix: tuple[int, ...] | None
  floats: int


def _state_floats(structure: 'Structure', shape: Shape) -> int:
  out = jax.eval_shape(lambda: structure.init(tuple(shape), jnp.float32, jax.random.key(0)))
  return math.prod(out.shape)


class Structure:
  """Base class: how one leaf is preconditioned. Subclasses are frozen dataclasses.

  Every method is pure and shape-static, so it can run inside ``jax.jit``.
  ``m`` is the learned parameter of the preconditioner (the state's entry for
  the leaf), ``g`` and ``g_prev`` the leaf's current and previous gradient.
  The protocol is listed in :mod:`fop_optax.structures._base`.
  """

  name: ClassVar[str]
  # Protocol flags (see the module docstring); subclasses override as class attributes.
  preconditions: ClassVar[bool] = True
  elementwise: ClassVar[bool] = False
  replicated_state: ClassVar[bool] = True
  takes_row_axes: ClassVar[bool] = False
  needs_rows: ClassVar[bool] = False
  # The guard B; a subclass that applies it declares a dataclass field ``max_scale``.
  max_scale = None

  # --- the layout -------------------------------------------------------------------------

  @classmethod
  def from_label(cls, **rule_kwargs) -> 'Structure':
    """The instance a label stands for; ``rule_kwargs``: ``max_full_dim``, ``rank``, ``normalize``.

    The default ignores them (``cls()``).
    """
    del rule_kwargs
    return cls()

  def validate(self, shape: Shape) -> None:
    """Raises ``ValueError`` if the structure cannot serve a leaf of ``shape``."""

  def layout(self, shape: Shape) -> Layout:
    """How this structure reads a leaf of ``shape``: its axes, ``P``'s shape and ``m``'s size."""
    return Layout((), (), tuple(range(len(shape))), None, self.memory(shape))

  def with_row_axes(self, row_axes: int) -> 'Structure':
    """This structure reading its rows as the first ``row_axes`` axes of a leaf (slice).

    :class:`~fop_optax.structures.WithDimensions` applies it to each slice with
    its rows moved to the front. The default ignores the rows (``self``).
    """
    del row_axes
    return self

  # --- the state --------------------------------------------------------------------------

  def init(self, shape: Shape, dtype: Any, key: jax.Array) -> jax.Array:
    """Returns ``m`` such that ``P = I``."""
    raise NotImplementedError

  def memory(self, shape: Shape) -> int:
    """Floats in the state ``m`` of a leaf of ``shape`` (the size of :meth:`init`'s array)."""
    return _state_floats(self, shape)

  # --- the step ---------------------------------------------------------------------------

  def precondition(self, m: jax.Array, g: jax.Array) -> jax.Array:
    """Returns ``P·g`` with ``g``'s shape and dtype."""
    raise NotImplementedError

  def hypergradient(self, m: jax.Array, g: jax.Array, g_prev: jax.Array,
                    learning_rate: jax.Array) -> jax.Array:
    """Returns ``∂J(θ_t)/∂m`` for ``θ_t = θ_{t-1} − η·P(m)·g_prev``, ``g = ∇J(θ_t)``."""
    raise NotImplementedError

  def hyper_step_scale(self, shape: Shape) -> float:
    """Factor on the default (Adam) hyper step of this leaf's ``m``.

    Adam moves every entry of ``m`` by about its learning rate per step, and the
    entries of a hypergradient share their signs, so a dense (a×a) ``M`` can move
    by up to ``lr·a`` in spectral norm per step: a 64×64 ``P`` would change 7×
    faster than the 3×3 spatial ones the paper tuned Adam(1e-4) on. Structures
    with such coherent entries return the factor that brings them back to that
    rate; 1 for the others.
    """
    del shape
    return 1.0

  # --- the bound --------------------------------------------------------------------------

  def _bound(self, max_scale: float | None) -> float | None:
    """The bound a projection uses: ``max_scale`` if given, else this structure's own."""
    return self.max_scale if max_scale is None else max_scale

  def with_bound(self, max_scale: float | None) -> 'Structure':
    """This structure with the guard ``max_scale``, unless it has its own.

    The one place the transformation's ``max_scale`` reaches a structure
    (:func:`~fop_optax.structures.resolve_structures` calls it for every leaf):
    a structure that applies the guard declares a dataclass field ``max_scale``
    (default ``None``), filled here when unset; one given explicitly is kept.
    ``full``/``spatial``/``low_rank`` clip ``P``'s eigenvalues at it where
    ``P`` is applied, ``scalar``/``diagonal`` project ``m²`` onto ``[0, B]``
    (:meth:`clip`). A structure without the field is returned as it is.
    """
    if (self.max_scale is None and dataclasses.is_dataclass(self)
        and any(f.name == 'max_scale' for f in dataclasses.fields(self))):
      return dataclasses.replace(self, max_scale=max_scale)
    return self

  def clip(self, m: jax.Array, max_scale: float | None = None) -> jax.Array:
    """Projects ``m`` so that ``P`` respects the bound (default: ``self.max_scale``).

    Applied to the state after each hyper step (projected hypergradient descent).
    ``scalar``/``diagonal`` project ``m²`` onto ``[0, B]``; ``full``/``spatial``
    clip ``M``'s singular values at ``√B``; ``low_rank`` keeps its raw
    ``λ_max`` within ``2·B`` (the applied ``P`` is clipped at ``B`` by
    :meth:`precondition`). With no bound (both ``None``), and in this default,
    ``m`` is returned unchanged.
    """
    del max_scale
    return m

  def clip_and_precondition(self, m: jax.Array, max_scale: float | None,
                            g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(clip(m, max_scale), precondition(clipped m, g))``, sharing what both need.

    The hyper step's projection and the step's preconditioning act on the same
    new ``M``; ``low_rank`` computes its span basis once for both.
    ``max_scale=None``: this structure's own bound.
    """
    m = self.clip(m, max_scale)
    return m, self.precondition(m, g)

  # --- what a step decomposes, kept for the next -------------------------------------------

  def span(self, m: jax.Array, g: jax.Array) -> tuple:
    """What this structure decomposes of ``m``, and of the input ``g`` it preconditions, to reuse on the next step: ``()`` here.

    A structure whose step factors ``P(m)`` (``low_rank``'s span basis and
    eigenpairs under the guard, and their product with ``g``) returns those
    arrays, with ``m`` itself first so that a reuse can check it is for the same
    ``m``. :func:`fop_optax.scale_by_fop` keeps the tuple of the ``(m, g)`` each
    step applied in its state (``FopState.spans``) and passes it back as
    ``span=`` to :meth:`precondition` and :meth:`precondition_and_span` (with
    the next input) and to :meth:`hypergradient` (with ``g`` as its ``g_prev``),
    only to a structure whose ``span`` is non-empty, so other structures need
    not take the argument.
    """
    del m, g
    return ()

  def init_span(self, m: jax.Array, shape: Shape) -> tuple:
    """The span ``init`` stores for the initial ``m`` and a leaf of this ``shape``: :meth:`span` of zeros here.

    A structure may return a placeholder of the same shapes instead (``low_rank``:
    zeros, so that ``init`` runs no solver), provided its ``m`` differs from the
    initial ``m`` or the placeholder is exact for it.
    """
    return self.span(m, jnp.zeros(shape, m.dtype))

  def precondition_and_span(self, m: jax.Array, g: jax.Array,
                            span: tuple = ()) -> tuple[jax.Array, tuple]:
    """``(precondition(m, g), span(m, g))``, from ``span`` (made for this ``m``) where it holds what is needed.

    A step that does not learn keeps ``m`` and applies it to a new ``g``: what it
    stores for the next step comes from here (``()`` in this default).
    """
    del span
    return self.precondition(m, g), self.span(m, g)

  def clip_precondition_and_span(self, m: jax.Array, max_scale: float | None,
                                 g: jax.Array) -> tuple[jax.Array, jax.Array, tuple]:
    """:meth:`clip_and_precondition` and the :meth:`span` of the clipped ``m`` and ``g``."""
    m, out = self.clip_and_precondition(m, max_scale, g)
    return m, out, self.span(m, g)

  # --- the spectrum -----------------------------------------------------------------------

  def matrix(self, m: jax.Array, shape: Shape) -> jax.Array:
    """Returns ``P`` for diagnostics: dense (a×a), or elementwise for diagonal forms."""
    raise NotImplementedError

  def spectrum(self, m: jax.Array, shape: Shape) -> jax.Array:
    """``P``'s eigenvalues in descending order (a 1-D array), as the diagnostics report them.

    The eigenvalues of :meth:`matrix`, one symmetric (a×a) block per batch index
    pooled, when it is square; its entries for an :attr:`elementwise` structure
    (and any other non-square ``matrix``).
    """
    mat = self.matrix(m, shape)
    if not self.elementwise and mat.ndim >= 2 and mat.shape[-1] == mat.shape[-2]:
      flat = mat.reshape((-1,) + mat.shape[-2:])
      values = jnp.ravel(jax.vmap(_linalg.eigvalsh)(flat))
    else:
      values = jnp.ravel(mat)
    return jnp.sort(values)[::-1]

  def top_eigen(self, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(λ, ∂λ/∂m)``: ``λ = λ_max(MᵀM)`` of the raw ``M`` (no FOP-norm, no guard) and its gradient.

    Where ``λ_max`` is not simple the gradient is a subgradient. Used by the
    time-dependent normalisation of :func:`fop_optax.scale_by_fop`'s ``gamma``.
    """
    lam = jnp.max(jnp.square(m))
    return lam, jax.grad(lambda x: jnp.max(jnp.square(x)))(m)

  def max_eigenvalue(self, m: jax.Array) -> jax.Array:
    """``λ_max`` of the ``P`` this structure applies (after FOP-norm and the guard)."""
    return jnp.max(jnp.square(m)) if m.ndim else jnp.square(m)


# The labels a structure can be named by: name -> class (``as_structure`` reads it).
_REGISTRY: dict[str, type[Structure]] = {}

_S = TypeVar('_S', bound=type)


def register(name: str) -> Callable[[_S], _S]:
  """Class decorator: the label ``name`` stands for this :class:`Structure` subclass.

  The class's ``name`` is set to ``name``; :meth:`Structure.from_label` builds
  the instance a label stands for. Registering a name twice raises, unless it
  is the same class again (a module reloaded).
  """
  def decorate(cls: _S) -> _S:
    if not (isinstance(cls, type) and issubclass(cls, Structure)):
      raise TypeError(f'register({name!r}) needs a Structure subclass, got {cls!r}')
    if name == 'auto':
      raise ValueError("'auto' names the default rule, not a structure")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
      raise ValueError(f'structure name {name!r} is already registered to {old!r}')
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return decorate


def registered() -> dict[str, type[Structure]]:
  """A copy of the registry: label -> :class:`Structure` subclass."""
  return dict(_REGISTRY)


def structure_names() -> tuple[str, ...]:
  """Every label ``structures=`` accepts: ``'auto'`` (the default rule) and the registered names."""
  return ('auto',) + tuple(_REGISTRY)
