"""The benchmarks' one harness: common arguments, interleaved timing, JSON with metadata.

* :func:`parser` -- ``argparse`` with the common options: ``--rounds`` (old name ``--reps``:
  interleaved rounds), ``--out JSON`` (``results/<benchmark>.json`` by default) and ``--quick``
  (a smoke run: :func:`apply_quick` sets the benchmark's smallest settings and, unless ``--out``
  was given, writes ``results/<benchmark>_quick.json`` so a smoke run never replaces a real one).
* :func:`interleaved` -- seconds per call of each variant, the variants run round-robin with the
  order rotated every round, so a noisy, shared machine slows every variant of a round alike.
* :func:`ratios` -- a variant's time over a reference's, taken **per round** (both measured
  within the same round), then summarised by :func:`spread` (median, IQR, min-max).
* :func:`profile_thunks` -- what XLA:CPU ran in a jitted step, from a ``jax.profiler`` trace:
  its thunks' time and count by kind (:func:`thunk_kinds`: the op, a fusion's name stem, or a
  custom call's target, e.g. ``lapack_sgeqrf_ffi``).
* :func:`metadata` and :func:`write_json` -- ``{'meta': ..., <payload>}``: git commit, jax / jaxlib /
  optax / flax versions, Python, platform, CPU count, ``OPENBLAS_NUM_THREADS``,
  backend and devices, load average, the exact command line, the date (UTC), the parsed
  arguments and the seconds the run took.

Run the benchmarks from the repository root as modules, ``python3 -m benchmarks.<name>``: they
import one another and the examples' shared code (``examples/common.py``) as the packages
``benchmarks`` and ``examples``, with nothing added to ``sys.path``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import shlex
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- arguments

def parser(description: str, *, name: str, rounds: int | None = None,
           out: str | None = 'default', **kwargs) -> argparse.ArgumentParser:
  """An ``ArgumentParser`` with the common options.

  ``name`` is the benchmark's name (``--out`` defaults to ``results/<name>.json``; ``out=None``:
  no file unless ``--out`` is given); ``rounds``, when given, adds ``--rounds`` (alias ``--reps``)
  with that default. ``description``: the first line of the module's docstring is enough.
  """
  p = argparse.ArgumentParser(description=description, **kwargs)
  if rounds is not None:
    p.add_argument('--rounds', '--reps', dest='rounds', type=int, default=rounds,
                   help='interleaved rounds: every variant runs once per round, in an order '
                   'rotated every round; medians and spreads are over rounds (default %(default)s)')
  default = os.path.join('results', f'{name}.json') if out == 'default' else out
  p.add_argument('--out', default=default, metavar='JSON',
                 help='where the results and their metadata go (default %(default)s)')
  p.add_argument('--quick', action='store_true',
                 help='a smoke run at the smallest settings (seconds); writes '
                 f'results/{name}_quick.json unless --out is given')
  return p


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser,
                **settings) -> argparse.Namespace:
  """Under ``--quick``: ``settings`` replace the options left at their defaults (an option given
  on the command line wins), and a default ``--out`` becomes ``<out>_quick.json``."""
  if getattr(args, 'quick', False):
    for key, value in settings.items():
      if getattr(args, key) == parser.get_default(key):
        setattr(args, key, value)
    if args.out is not None and args.out == parser.get_default('out'):
      root, ext = os.path.splitext(args.out)
      args.out = f'{root}_quick{ext or ".json"}'
  return args


# ----------------------------------------------------------------------------- timing

def round_order(names: Sequence[str], r: int) -> list[str]:
  """Round ``r``'s order: ``names`` rotated left by ``r`` (each variant leads in turn)."""
  k = r % len(names) if names else 0
  return list(names[k:]) + list(names[:k])


def interleaved_clocks(runners: Mapping[str, Callable[[], Any]], rounds: int, inner: int = 1,
                       clocks: Mapping[str, Callable[[], float]] | None = None
                       ) -> dict[str, dict[str, list[float]]]:
  """:func:`interleaved` read on several clocks at once (e.g. wall and process CPU time).

  Returns ``{clock: {variant: [seconds per call, one per round]}}``.
  """
  clocks = dict(clocks or {'wall': time.perf_counter})
  names = list(runners)
  times = {c: {n: [] for n in names} for c in clocks}
  for r in range(rounds):
    for name in round_order(names, r):
      start = {c: clock() for c, clock in clocks.items()}
      for _ in range(inner):
        runners[name]()
      for c, clock in clocks.items():
        times[c][name].append((clock() - start[c]) / inner)
  return times


def interleaved(runners: Mapping[str, Callable[[], Any]], rounds: int, inner: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
  """Seconds per call of each runner, one value per round.

  Every round calls each runner ``inner`` times in a row (the runner must block until its work
  is done, e.g. ``jax.block_until_ready``); the runners' order rotates every round
  (:func:`round_order`).
  """
  return interleaved_clocks(runners, rounds, inner, {'t': clock})['t']


def ratios(times: Mapping[str, Sequence[float]], ref: str) -> dict[str, list[float]]:
  """Each variant's time over ``ref``'s time **of the same round**: ``{variant: [ratio per round]}``."""
  return {name: [a / b for a, b in zip(t, times[ref])] for name, t in times.items()}


def spread(values: Sequence[float]) -> dict[str, float]:
  """Median, quartiles (IQR) and min-max of ``values``."""
  values = sorted(values)
  if len(values) > 1:
    q1, _, q3 = statistics.quantiles(values, n=4, method='inclusive')
  else:
    q1 = q3 = values[0]
  return dict(median=statistics.median(values), q1=q1, q3=q3, min=values[0], max=values[-1],
              n=len(values))


def summarize(times: Mapping[str, Sequence[float]], ref: str | None = None
              ) -> dict[str, dict[str, Any]]:
  """Per variant: :func:`spread` of its times and, given ``ref``, of its per-round ratios to it."""
  per_round = ratios(times, ref) if ref is not None else {}
  return {name: dict(time=spread(t), **({'ratio': spread(per_round[name])} if ref else {}))
          for name, t in times.items()}


def fmt_spread(s: Mapping[str, float], fmt: str = '.3f') -> str:
  """``median [min-max]``, as the benchmarks' tables print it."""
  return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


# ----------------------------------------------------------------------------- profiling

_INSTRUCTION = re.compile(r'%?([\w.\-]+) = \S+ ([\w\-]+)\(')
_CUSTOM_CALL = re.compile(r'%?([\w.\-]+) = [^\n]*custom-call\([^\n]*custom_call_target="([^"]+)"')


def thunk_kinds(compiled_text: str) -> dict[str, str]:
  """``{instruction name: kind}``: the op, a fusion's name stem, or a custom call's target."""
  out = {m.group(1): m.group(2) for m in _INSTRUCTION.finditer(compiled_text)}
  out.update({m.group(1): m.group(2) for m in _CUSTOM_CALL.finditer(compiled_text)})
  for name, kind in out.items():
    if kind == 'fusion':
      out[name] = 'fusion:' + name.split('.')[0]
  return out


def profile_thunks(run: Callable[[], Any], compiled_text: str, steps: int):
  """``run()`` (one step of the program ``compiled_text``) ``steps`` times under the profiler.

  XLA:CPU records every thunk it runs under its instruction's name, which
  :func:`thunk_kinds` maps to its kind; work in a branch a step skips does not count.
  Returns, per step: the jitted call's wall ms, ``{kind: (ms, calls)}`` (costliest first)
  and ``{instruction: ms}`` of the ten costliest instructions.
  """
  import jax   # here only: the rest of the harness never imports (or initialises) JAX
  kind = thunk_kinds(compiled_text)
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    for _ in range(steps):
      run()
    jax.profiler.stop_trace()
    (trace,) = glob.glob(f'{folder}/**/perfetto_trace.json.gz', recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  by_kind, count, by_name = collections.Counter(), collections.Counter(), collections.Counter()
  wall = 0.0
  for e in events:
    if e.get('ph') != 'X':
      continue
    if e.get('name', '').startswith('PjitFunction'):
      wall += e.get('dur', 0)
    elif e.get('name') in kind:
      by_kind[kind[e['name']]] += e.get('dur', 0)
      count[kind[e['name']]] += 1
      by_name[e['name']] += e.get('dur', 0)
  per = lambda us: us / steps / 1e3
  return (per(wall), {k: (per(v), count[k] / steps) for k, v in by_kind.most_common()},
          {k: per(v) for k, v in by_name.most_common(10)})


# ----------------------------------------------------------------------------- metadata, JSON

def _git(*cmd: str) -> str | None:
  try:
    return subprocess.run(['git', *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def git_commit() -> dict[str, Any]:
  """This checkout's commit and whether tracked files differ from it (``None`` without git)."""
  commit = _git('rev-parse', 'HEAD')
  status = _git('status', '--porcelain', '--untracked-files=no') if commit else None
  return dict(commit=commit, dirty=None if status is None else bool(status))


def command_line(argv: Sequence[str] | None = None, module: str | None = None) -> str:
  """The exact command: ``sys.orig_argv`` for a command-line run; for ``main(argv)`` called in
  a process, the equivalent ``python3 -m <module> <argv>``."""
  if argv is None:
    return shlex.join(getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv])
  return shlex.join([sys.executable, '-m', module or '?', *map(str, argv)])


def versions() -> dict[str, str | None]:
  """Installed jax, jaxlib, optax and flax versions (``None``: not installed)."""
  from importlib.metadata import PackageNotFoundError, version
  out: dict[str, str | None] = {}
  for dist in ('jax', 'jaxlib', 'optax', 'flax'):
    try:
      out[dist] = version(dist)
    except PackageNotFoundError:
      out[dist] = None
  return out


def metadata(args: argparse.Namespace | None = None, *, argv: Sequence[str] | None = None,
             module: str | None = None, t0: float | None = None, **extra) -> dict[str, Any]:
  """What a benchmark ran on and with. ``t0``: its ``time.perf_counter()`` at the start
  (``seconds`` is measured from it); ``extra`` is added as is."""
  meta: dict[str, Any] = dict(
      command=command_line(argv, module), cwd=os.getcwd(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      git=git_commit(), **versions(), python=platform.python_version(),
      platform=platform.platform(), machine=platform.machine(), cpus=os.cpu_count(),
      openblas_num_threads=os.environ.get('OPENBLAS_NUM_THREADS'))
  if 'jax' in sys.modules:   # the backend as the benchmark used it (never initialises one itself)
    jax = sys.modules['jax']
    meta.update(backend=jax.default_backend(), devices=len(jax.devices()),
                device_kind=jax.devices()[0].device_kind)
  meta['load_average'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
  if args is not None:
    meta['args'] = dict(vars(args))
  meta.update(extra)
  if t0 is not None:
    meta['seconds'] = time.perf_counter() - t0
  return meta


def saved_line(path: str, meta: Mapping[str, Any]) -> str:
  seconds = meta.get('seconds')
  return f'saved {path}' + (f' ({seconds:.0f}s)' if seconds is not None else '')


def write_json(path: str, meta: Mapping[str, Any], *, announce: bool = True, **payload) -> str:
  """Writes ``{'meta': meta, **payload}`` to ``path`` (JSON; folders made) and, with
  ``announce``, prints :func:`saved_line`."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(dict(meta=dict(meta), **payload), f, indent=1, default=str)
  if announce:
    print(saved_line(path, meta))
  return path


def save_rows(path: str, meta: Mapping[str, Any], rows) -> str:
  """``{'meta': meta, 'rows': rows}``: the layout of the timing benchmarks' results."""
  return write_json(path, meta, rows=rows)
