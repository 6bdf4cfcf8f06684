"""How a parameter leaf becomes a matrix, and which preconditioner it gets.

FOP (Moskovitz et al., 2019) preconditions a leaf's gradient ``g`` with a
learned positive semi-definite ``P = MᵀM``. To do so the leaf is *viewed* as a
matrix ``G`` of shape ``(a, b)``: its leading ``row_axes`` axes become the rows
(the side ``P`` acts on), the remaining axes the columns. A *structure* says
which view and which parametrisation of ``M`` a leaf gets, and owns the three
pieces of maths that depend on it:

* ``init``: an ``M`` with ``P = I`` (so FOP's first step is the base optimiser's),
* ``precondition``: ``P·G`` mapped back to the leaf's shape,
* ``hypergradient``: the exact gradient of ``J(θ_t)`` with respect to the ``M``
  that produced ``θ_t = θ_{t-1} − η·P·G_{t-1}``:

  .. math::
    \\frac{∂J(θ_t)}{∂M_{t-1}} = −η\\, M_{t-1} (G_t G_{t-1}^⊤ + G_{t-1} G_t^⊤).

Structures:

============  =========================  ===============  ====================
name          leaf view / M              memory of M      typical leaf
============  =========================  ===============  ====================
``none``      no preconditioning         0                biases, norms,
                                                          embedding tables
``scalar``    ``P = m²``, one per leaf   1                S-HD style
``diagonal``  ``P = diag(m²)``           leaf size        PP-HD style
``full``      dense ``M`` (a×a)          a²               small dense and
                                                          attention kernels
``spatial``   dense ``M`` over k×k       (k²)²            conv kernels
``low_rank``  ``M = I + UVᵀ`` (a×r)      2·a·r            large dense and
                                                          attention kernels
============  =========================  ===============  ====================

``full``, ``spatial`` and ``low_rank`` accept ``normalize=True`` (FOP-norm): ``P``
is divided by its spectral norm, ``P̃ = P/‖P‖₂``, the normalisation of the
paper's convergence argument (Theorem 1, ``γ(t) = ‖P‖₂`` at ``δ = 1``). Every
eigenvalue of ``P̃`` is then at most 1: FOP-norm can shorten the step along
some directions and rotate it, but never lengthen it along any direction.
(An earlier version divided by the mean eigenvalue ``tr(P)/a``, which let a
single direction grow without bound while the mean stayed at 1.)

The guard (``max_scale = B`` of :func:`fop_optax.scale_by_fop`, default 1)
bounds the *largest* eigenvalue of every ``P`` that is applied, so no direction's
step is ever more than ``B`` times the base optimiser's. ``full``/``spatial`` and
``low_rank`` clip ``P``'s eigenvalues at ``B`` where ``P`` is applied,
``P̃ = Q min(Λ, B) Qᵀ`` (exactly: the (a×a) eigenvalues, skipped when a
Cholesky factorisation of ``B(1 + 10⁻⁵)·I − P`` proves ``λ_max ≤ B`` up to
rounding, as it does after the projection of each hyper step, so a step costs
one eigensolver per matrix at most; for ``low_rank`` the (2r×2r)
eigenvalues of ``P`` on ``span(U, V)``, where ``P = I`` on the complement: with
``Q`` a Householder basis of ``[U, V]``, ``P̃ = I + Q·min(A, B − 1)·Qᵀ`` for
``A = Qᵀ(P − I)Q``, applied with the same two passes over the gradient as ``P``), and
their hypergradient is that of ``P̃`` (divided differences of ``min(·, B)``,
Daleckii–Krein), so a clipped direction receives no push to grow further while
the others keep learning. ``scalar``/``diagonal`` project ``m²`` onto ``[0, B]``.
At ``B = 1`` FOP can shorten the step along some directions and rotate it, never
lengthen it.

The default rule (:func:`default_structure`) follows what a leaf *is*, read
from its path (its own name, the last entry; for an attention kernel also its
layer's name and that layer's siblings; a Flax NNX ``Variable``'s trailing
``.value`` is dropped) and its shape, as :func:`leaf_role` reports it. Below,
"dense over ``k`` axes" means rows = the leaf's first ``k`` axes, ``a`` their
product: ``full`` (``Full(row_axes=k)``) when ``a ≤ max_full_dim`` (default
32), else ``low_rank`` (``LowRank(rank, row_axes=k)``).

=====================================  ====================================  =========================
leaf                                   role                                  default structure
=====================================  ====================================  =========================
0-d, 1-d or empty                      any                                   ``none``
named ``bias`` or ``scale``            ``'norm_or_bias'`` (LayerNorm,        ``none``
(any rank)                             RMSNorm, BatchNorm, LinearGeneral
                                       biases ``(heads, head_dim)``)
name ends in ``embedding``             ``'embedding'`` (``nnx.Embed``        ``none``
                                       table ``(vocab, features)``)
``kernel`` of ``query``/``key``/       ``'attention_input'``                 dense over 1 axis (the
``value`` in an attention block        ``(in, heads, head_dim)``             input features)
``kernel`` of ``out`` in an            ``'attention_output'``                dense over ``ndim − 1``
attention block                        ``(heads, head_dim, out)``            axes (heads × head_dim)
other rank ≥ 3 under an attention-     ``'ambiguous'`` (``nnx.Einsum``       ``none``, and one warning
like or stacked-layers node            heads, a K/V stack, an ``nnx.scan``   per resolution naming the
(:func:`suspect_node`)                 layer axis)                           leaves
other 2-d ``(in, out)``                ``'other'`` (``nnx.Linear``)          dense over 1 axis
other rank ≥ 3 ``(*lead, in, out)``    ``'other'``: a conv kernel when       ``spatial`` (one
with ``∏ lead ≤ MAX_SPATIAL_TAPS``     its leading axes are few taps         ``∏lead × ∏lead`` M)
other rank ≥ 3, ``∏ lead`` larger      ``'other'`` (e.g. an unnamed          dense over ``ndim − 2``
                                       ``(in, heads, head_dim)`` kernel)     axes
=====================================  ====================================  =========================

An *attention block* is a node of the tree with children named ``query``,
``key``, ``value`` and ``out`` (Flax's ``nnx.MultiHeadAttention`` and linen's
``MultiHeadDotProductAttention``); a lone ``out`` layer (say a UNet's last
conv) is not one. Why these choices:

* Embedding tables get ``none``: a preconditioner over the vocabulary axis
  (what the shape-only rule gave a ``(vocab, features)`` table) mixes rows, so
  rows of tokens that were never in a batch would move. A feature-axis
  preconditioner (``G·P``) would keep rows apart but acts on the side none of
  these structures act on (they all multiply the rows, ``P·G``); ``none``
  leaves each row to its own gradient, as the base optimiser does.
* ``spatial`` is for genuine convolution kernels: its matrix is over the
  kernel taps, e.g. 9×9 for 3×3. ``MAX_SPATIAL_TAPS`` (64) admits 1-D kernels
  of up to 64 taps, 2-D up to 8×8 (7×7 stems, 8×8 patch embeddings) and 3-D
  up to 4×4×4; a kernel whose leading axes hold more than 64 "taps" is far more
  likely features (an attention or ``LinearGeneral`` kernel) and a full
  ``(∏lead)²`` matrix could be huge (512² for ``in = 512``), so it is treated
  as a dense kernel over its leading axes. For a rank-3 leaf both views have
  the same rows, its first axis (``spatial`` over a 1-D kernel's taps is
  ``Full(row_axes=1)``); they differ only in that more than 64 rows get a
  low-rank ``M`` (with the default ``max_full_dim``).
* Attention kernels are dense kernels whose input is one axis (``query``/
  ``key``/``value``: ``in``) or two (``out``: ``heads × head_dim``), so FOP
  preconditions the same side it preconditions for ``nnx.Linear``.

* A rank ≥ 3 leaf under an *attention-like* node (a path element ``attn``,
  ``attention``, or ending in ``attn``, ``attention`` or ``einsum``; the leaf's
  own name counts, e.g. Gemma's ``gating_einsum``) or a
  *stacked-layers* node (an element ``layers``, ``scan``, ``stack`` or ``blocks``
  with no integer index after it: ``layers/0/...`` is a list of separate
  layers, ``layers/...`` one stacked by ``nnx.scan``), other than the
  query/key/value/out kernels of an attention block, gets ``none``: its leading
  axes are likely heads (``nnx.Einsum``'s ``(heads, embed, head_dim)``), a
  key/value stack ``(2, kv_heads, embed, head_dim)`` or layers ``(L, in, out)``,
  which the shape rule would read as conv taps, i.e. a ``P`` mixing heads,
  keys with values, or layers. Leaving them to the base optimiser is safe; one
  warning per resolution names them and points to
  :func:`fop_optax.structures_for`, which reads the layers themselves.

Explicit dimension numbers (:class:`FopDimensionNumbers`, like
``optax.contrib.MuonDimensionNumbers``) read a leaf through any axes:
``rows`` (the contracted input axes ``P`` acts on), ``batch`` (one ``P`` per
index) and the remaining columns. :class:`WithDimensions` applies any structure
that way (transposing the rows to the front and ``jax.vmap``-ing over the batch
axes), and a bare ``FopDimensionNumbers`` given as a leaf's structure means dense
over those rows (``full`` up to ``max_full_dim`` rows, else ``low_rank``).
:func:`fop_optax.structures_for` builds them from a Flax NNX model, and
:func:`fop_optax.describe` reports how each leaf is read.

Any ``LinearGeneral`` layout the names do not reveal (say ``(h, d, out)``
outside an attention block, where the shape-only rule would take ``h`` alone
as the rows) is set per leaf, as for any override: ``Full(row_axes=2)`` or
``LowRank(rank, row_axes=2)``. Plain dicts, tuples and ``jax.ShapeDtypeStruct``
leaves without these names get the shape-only rows of the table.

The package
-----------

One file per structure (``none.py``, ``scalar.py``, ``diagonal.py``,
``full.py``, ``spatial.py``, ``low_rank.py``), each a :class:`Structure`
subclass with one line of registration (``@register('full')``), which is what
makes its label usable; ``_base.py`` holds the protocol every structure
provides (its state, ``P·G``, its hypergradient, the bound, its spectrum, its
memory, its layout: listed in its docstring), :class:`Layout` and the registry;
``_matrix.py`` the shared linear algebra (einsums over a leaf's own axes, the
spectral clip and its divided differences); ``dimensions.py`` the dimension
numbers, :class:`WithDimensions` (which also serves a stack of equal-shaped
leaves as one batched leaf: :func:`stacked`); ``rule.py`` the default rule and
resolution. Code outside these files reads a structure only through the
protocol (``preconditions``, ``elementwise``, ``replicated_state``,
``max_scale``, ``spectrum``, ...), so a structure defined anywhere, registered
or passed as an instance, works with :func:`fop_optax.fop`,
:func:`fop_optax.describe` and :mod:`fop_optax.diagnostics` unchanged.
"""

from __future__ import annotations

from fop_optax.structures._base import (Layout, Structure, _REGISTRY, _state_floats, register,
                                        registered, structure_names)
from fop_optax.structures._matrix import (
    REFERENCE_ROWS, Shape, _KINK_RTOL, _apply_left, _clipped_derivative, _contract_cols,
    _contract_rows, _divided_differences, _exceeds, _expand_rows, _gram, _labels,
    _orthonormal_columns, _pair, _rows, _scale_rows, _snap, _spectral_clip,
    _top_eigenpair, as_matrix)
from fop_optax.structures.none import NoPreconditioner
from fop_optax.structures.scalar import Scalar
from fop_optax.structures.diagonal import Diagonal
from fop_optax.structures.full import Full
from fop_optax.structures.spatial import Spatial
from fop_optax.structures.low_rank import (_BISECTION_STEPS, _STATE_BOUND_FACTOR, DEFAULT_RANK,
                                           LowRank)
from fop_optax.structures.dimensions import (FopDimensionNumbers, WithDimensions, _axes,
                                             _batched, _inverse, normalize_dimensions, stacked,
                                             with_dimensions)
from fop_optax.structures.rule import (
    _ATTENTION_INPUTS, _ATTENTION_LIKE_SUFFIXES, _ATTENTION_OUTPUT, _BY_NAME, _NORM_OR_BIAS_NAMES,
    _STACK_NAMES, _VARIABLE_ATTRS, DEFAULT_MAX_FULL_DIM, DEFAULT_MAX_SCALE, MAX_SPATIAL_TAPS,
    ROLES, STRUCTURE_NAMES, _attention_blocks, _dense, _is_variable, _path_str, as_structure,
    check_leaf_dtype, default_structure, find_attention_blocks, leaf_names, leaf_paths,
    leaf_role, resolve_structures, suspect_node, unwrapped_treedef)

__all__ = [
    'Structure', 'NoPreconditioner', 'Scalar', 'Diagonal', 'Full', 'Spatial',
    'LowRank', 'default_structure', 'resolve_structures', 'as_structure',
    'leaf_role', 'leaf_names', 'STRUCTURE_NAMES', 'ROLES', 'MAX_SPATIAL_TAPS',
    'FopDimensionNumbers', 'WithDimensions', 'with_dimensions', 'Layout',
    'normalize_dimensions', 'find_attention_blocks', 'suspect_node',
    'register', 'registered', 'structure_names', 'stacked',
]
