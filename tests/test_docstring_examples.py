"""The docstrings' ``Examples:`` blocks run as doctests (optax's manner), and every optimiser has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import fop_optax
from citizen import REGISTRY

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(fop_optax.__path__, prefix='fop_optax.'))
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

# Factories whose docstring has no runnable ``Examples:`` block yet (each removal is checked).
PENDING: set[str] = set()


def _tests(module_name):
  module = importlib.import_module(module_name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  return [t for t in finder.find(module, module_name) if t.examples]


@pytest.mark.parametrize('module_name', MODULES)
def test_docstring_examples_run(module_name):
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  for test in _tests(module_name):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f'{result.failed} of {result.attempted} examples failed'


def test_every_optimiser_has_an_example():
  factories = {entry.factory.__name__: entry.factory for entry in REGISTRY.values()}
  without = {name for name, f in factories.items()
             if '>>>' not in (inspect.getdoc(f) or '').partition('Examples:')[2]}
  assert without == PENDING, (
      f'no Examples: block: {sorted(without - PENDING)}; '
      f'has one now, drop from PENDING: {sorted(PENDING - without)}')
