"""``spatial``: a dense ``M`` over the taps of a conv kernel ``(*spatial, in, out)``."""

from __future__ import annotations

import dataclasses

from fop_optax.structures._base import register
from fop_optax.structures.full import Full


@register('spatial')
@dataclasses.dataclass(frozen=True)
class Spatial(Full):
  """Dense ``M`` over the spatial taps of a conv kernel ``(*spatial, in, out)``.

  For a ``k×k`` kernel ``a = k²``: one small matrix per layer, shared across the
  input and output channels (81 numbers for 3×3), as in the paper's conv nets.
  """

  row_axes: int = dataclasses.field(default=-1, repr=False)

  takes_row_axes = False   # its rows are all but the last two axes, whatever row_axes says

  def with_row_axes(self, row_axes):
    # Over a slice whose rows were moved to the front: Full over those rows.
    return Full(row_axes=row_axes, normalize=self.normalize, max_scale=self.max_scale)

  def _row_axes(self, shape):
    return len(shape) - 2

  def __repr__(self):
    return (f'Spatial(rows=taps (all but the last two axes), normalize={self.normalize}, '
            f'max_scale={self.max_scale})')

  def validate(self, shape):
    if len(shape) < 3:
      raise ValueError(
          f'spatial FOP needs a conv kernel of shape (*spatial, in, out) with rank '
          f'>= 3, got shape {shape}; use full/low_rank/diagonal for it instead')
