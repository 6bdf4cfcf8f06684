"""fop_optax: First-Order Preconditioning and hypergradient descent for optax."""

from fop_optax import curvature
from fop_optax import diagnostics
from fop_optax import hypergradient
from fop_optax import learned
from fop_optax import one_pass
from fop_optax import structures
from fop_optax.learned import LearnedPreconditionerState, scale_by_learned_preconditioner
from fop_optax._lodo import lodo_preconditioner, scale_by_lodo
from fop_optax.one_pass import (OnePassHPOState, OnePassInjectedState, one_pass_hpo,
                                one_pass_hpo_injected)
from fop_optax.qlr import QlrState, adam_qlr, scale_by_qlr
from fop_optax._series_sfn import SeriesSfnState, series_sfn
from fop_optax.nonfinite import NonFiniteLetThroughWarning, SkipNonFiniteState, skip_nonfinite
from fop_optax.structures import FopDimensionNumbers, WithDimensions, resolve_structures
from fop_optax.module_rules import describe, einsum_dimensions, structures_for
from fop_optax.hypergradient import HypergradientState, scale_by_hypergradient
from fop_optax.transform import FopState, scale_by_fop
from fop_optax.alias import adam_hd, fop, fop_adam, lodo, sgd_hd

__version__ = '0.1.0'

__all__ = [
    'FopDimensionNumbers', 'NonFiniteLetThroughWarning', 'WithDimensions', 'describe', 'einsum_dimensions', 'structures_for',
    'FopState', 'HypergradientState', 'LearnedPreconditionerState', 'OnePassHPOState',
    'OnePassInjectedState', 'QlrState', 'SeriesSfnState', 'SkipNonFiniteState', 'adam_hd',
    'adam_qlr', 'curvature', 'diagnostics', 'fop', 'fop_adam', 'hypergradient', 'learned', 'lodo',
    'lodo_preconditioner', 'one_pass', 'one_pass_hpo', 'one_pass_hpo_injected',
    'resolve_structures', 'scale_by_fop', 'scale_by_hypergradient',
    'scale_by_learned_preconditioner', 'scale_by_lodo', 'scale_by_qlr', 'series_sfn', 'sgd_hd',
    'skip_nonfinite', 'structures',
]
