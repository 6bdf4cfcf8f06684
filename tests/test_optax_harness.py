"""optax's own optimiser checks, unchanged, run on our aliases.

The checks are the installed optax's ``optax/_src/alias_test.py`` (``AliasTest``)
and ``optax/contrib/_common_test.py`` (``ContribTest``). Nothing of them is
copied: each generated absltest method is opened up to its original test
function and the parameter grid it was generated with (targets, dtypes, ...),
the optimiser in that grid is replaced by ours, and the function runs on an
instance of optax's own test class with the module's optimiser lookup
(``_get_opt`` / ``_get_opt_factory``) pointed at ``fop_optax``.

Complex-parameter cases are skipped: our transformations reject complex leaves
at ``init`` (see the README's API section).
"""

import functools
import inspect
import unittest

import jax.numpy as jnp
import pytest

import fop_optax

alias_test = pytest.importorskip('optax._src.alias_test')  # needs scipy and scikit-learn
common_test = pytest.importorskip('optax.contrib._common_test')

# The aliases as a new user would call them: default hyper-parameters, the learning
# rates optax's harnesses use for the matching optax optimiser (sgd 1e-3 with
# momentum), and for Adam with FOP 1e-2 (at 1e-3 Adam cannot cover the parabola's
# distance of 11 in alias_test's 10,000 steps); adam_hd starts at 1e-3 and learns.
OURS = {
    'fop': (fop_optax.fop, {'learning_rate': 1e-3}),
    'fop_normalize': (functools.partial(fop_optax.fop, normalize=True), {'learning_rate': 1e-3}),
    'fop_adam': (fop_optax.fop_adam, {'learning_rate': 1e-2}),
    'sgd_hd': (fop_optax.sgd_hd, {'learning_rate': 1e-3}),
    'sgd_hd_momentum': (fop_optax.sgd_hd, {'learning_rate': 1e-3, 'momentum': 0.9}),
    'adam_hd': (fop_optax.adam_hd, {'learning_rate': 1e-3}),
}
_OPT_KEYS = ('opt_name', 'opt_kwargs', 'wrapper_name', 'wrapper_kwargs')


def _resolved(factory):
  """``factory`` with its signature's string annotations evaluated.

  alias.py uses ``from __future__ import annotations``, so ``inspect.signature``
  shows ``'optax.ScalarOrSchedule'`` as a string and optax's schedule check would
  skip ``fop``/``fop_adam`` as not accepting schedules. The function is unchanged.
  """
  @functools.wraps(factory)
  def wrapped(*args, **kwargs):
    return factory(*args, **kwargs)
  wrapped.__signature__ = inspect.signature(factory, eval_str=True)
  return wrapped


OURS = {name: (_resolved(f), kwargs) for name, (f, kwargs) in OURS.items()}


def _harness_cases(test_class, first_opt_name):
  """(method base name, original function, the grid minus the optimiser) of each check."""
  cases = {}
  for name in sorted(dir(test_class)):
    method = getattr(test_class, name)
    if not name.startswith('test') or not callable(method) or method.__closure__ is None:
      continue
    cells = dict(zip(method.__code__.co_freevars, method.__closure__))
    if 'testcase_params' not in cells or 'test_method' not in cells:
      continue
    params = cells['testcase_params'].cell_contents
    if not isinstance(params, dict) or params.get('opt_name') != first_opt_name:
      continue  # not parametrised by the optimiser list, or another optimiser's copy
    if params.get('wrapper_name') is not None:
      continue
    rest = {k: v for k, v in params.items() if k not in _OPT_KEYS}
    base = name.rstrip('0123456789')
    key = (base, repr(sorted((k, getattr(v, '__name__', repr(v))) for k, v in rest.items())))
    cases[key] = (base, cells['test_method'].cell_contents, rest,
                  'wrapper_name' in params)
  return list(cases.values())


HARNESSES = {
    'alias_test': (alias_test, alias_test.AliasTest,
                   _harness_cases(alias_test.AliasTest, alias_test._OPTIMIZERS_UNDER_TEST[0]['opt_name'])),
    'contrib_common_test': (common_test, common_test.ContribTest,
                            _harness_cases(common_test.ContribTest,
                                           common_test._MAIN_OPTIMIZERS_UNDER_TEST[0]['opt_name'])),
}


def _case_id(rest):
  return '-'.join(f'{getattr(v, "__name__", v)}' for v in rest.values())


CASES = [
    pytest.param(harness, base, fn, rest, has_wrapper, opt,
                 id=f'{harness}-{base}-{_case_id(rest)}-{opt}'.replace('--', '-'))
    for harness, (_, _, cases) in HARNESSES.items()
    for base, fn, rest, has_wrapper in cases
    for opt in OURS
]


def test_harness_found_the_checks():
  """Guards against a silent no-op if optax's harness changes shape."""
  names = {(h, c[0]) for h, (_, _, cases) in HARNESSES.items() for c in cases}
  for check in ('test_optimization', 'test_optimizers_accept_extra_args',
                'test_optimizers_can_be_wrapped_in_inject_hyperparams', 'test_preserve_dtype',
                'test_state_shape_dtype_shard_stability', 'test_gradient_accumulation'):
    assert ('alias_test', check) in names
  for check in ('test_optimizers', 'test_optimizers_accept_extra_args',
                'test_optimizers_can_be_wrapped_in_inject_hyperparams', 'test_preserve_dtype',
                'test_state_shape_dtype_shard_stability', 'test_gradient_accumulation',
                'test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such'):
    assert ('contrib_common_test', check) in names


@pytest.mark.parametrize('harness,base,fn,rest,has_wrapper,opt', CASES)
def test_optax_check(monkeypatch, harness, base, fn, rest, has_wrapper, opt):
  module, test_class, _ = HARNESSES[harness]
  if any(isinstance(v, (str, type)) and jnp.issubdtype(jnp.dtype(v), jnp.complexfloating)
         for k, v in rest.items() if k in ('dtype', 'params_dtype')):
    pytest.skip('complex parameters are unsupported by fop_optax (rejected at init)')
  factory, kwargs = OURS[opt]
  if harness == 'alias_test':
    monkeypatch.setattr(module, '_get_opt', lambda self, name: OURS[name][0])
  else:
    monkeypatch.setattr(module, '_get_opt_factory', lambda name: OURS[name][0])
  case = test_class(methodName='__init__')
  case.setUp()
  params = dict(opt_name=opt, opt_kwargs=dict(kwargs), **rest)
  if has_wrapper:
    params.update(wrapper_name=None, wrapper_kwargs=None)
  try:
    fn(case, **params)
  except unittest.SkipTest as e:
    pytest.skip(f'skipped by optax\'s check: {e}')
  finally:
    case.doCleanups()
