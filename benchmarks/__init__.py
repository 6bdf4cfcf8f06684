"""The benchmarks: run each from the repository root as a module, ``python3 -m benchmarks.<name>``.

They share one harness (:mod:`benchmarks._harness`: arguments, interleaved timing, JSON with
metadata) and import the examples' shared code as ``from examples import common``; as modules run
from the root they need nothing added to ``sys.path``. Not part of the wheel.
"""
