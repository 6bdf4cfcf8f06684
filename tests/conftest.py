"""Suite-wide settings that cut XLA:CPU compile time, the bulk of the suite's time.

Most of the suite's time is XLA:CPU compiling (a FOP update with the guard takes seconds to
compile and milliseconds to run), and many tests compile the same program again: the same
optimiser on the same shapes inside a new ``jax.jit`` closure, in another xdist worker or in a
subprocess. JAX's persistent compilation cache, keyed on the program, the JAX version and the
flags, turns those into cache hits. The cache lives in a fresh directory for each test run (the
controller names it; xdist workers and subprocesses inherit it through the environment), so every
run starts cold, as CI does, and a stale entry can never reach a later run (a
``JAX_COMPILATION_CACHE_DIR`` you set is used and kept). ``FOP_TEST_NO_COMPILE_CACHE=1`` switches
it off.

The suite also compiles with LLVM's optimisation passes off (``--xla_backend_optimization_level=0``
in ``XLA_FLAGS``; XLA's own HLO passes still run): about a quarter less compile time, and the
programs compute the same maths with different rounding (contracted multiply-adds), as on
another CPU. The tests assert what the code guarantees, with tolerances that hold across such
rounding; a test that only passes at one optimisation level is a defect. The suite checks
behaviour, not speed (speed is measured by ``benchmarks/``). ``FOP_TEST_FULL_OPT=1`` compiles
as users do.
"""

import os
import tempfile

if not os.environ.get('FOP_TEST_FULL_OPT'):
  _flag = '--xla_backend_optimization_level=0'
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

if not os.environ.get('FOP_TEST_NO_COMPILE_CACHE'):
  _dir = os.path.join(tempfile.gettempdir(), f'fop_optax_jax_cache_pid{os.getpid()}')
  # Environment, not only jax.config: subprocesses (examples, notebooks, workers) read it too.
  # A directory the user set is used and left alone; only this run's own one is removed.
  _OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _dir)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

  import jax  # noqa: E402  (after the environment, so that jax reads it)

  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))


def pytest_sessionfinish(session):
  """The controller (not an xdist worker) removes this run's cache when the run ends."""
  if globals().get('_OWN_CACHE') and not hasattr(session.config, 'workerinput'):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
