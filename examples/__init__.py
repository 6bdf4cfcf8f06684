"""The examples, importable as a package from the repository root (``from examples import common``).

Run each one as a script, ``python3 examples/<name>.py``: its folder is then first on ``sys.path``
and the examples import one another by their bare names. Imported as ``examples.<name>`` (by the
tests, where pytest's ``pythonpath = ["."]`` holds the root, and by ``python3 -m benchmarks.<name>``
from the root), they import one another as ``examples.<name>``: each module exists once either way.
Not part of the wheel (``[tool.setuptools] packages = ["fop_optax"]``).
"""
