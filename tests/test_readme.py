"""Every Python snippet in the README runs, the set-up commands match CI, and the README stays short."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
SNIPPETS = re.findall(r'```python\n(.*?)```', README, flags=re.S)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 1
  assert 'nnx.Optimizer' in SNIPPETS[0]   # the training loop


def test_readme_is_at_most_8_kib():
  """The README is a front page (<= 8 KiB); guides, results and the API live in docs/."""
  size = (ROOT / 'README.md').stat().st_size
  assert size <= 8192, f'README.md is {size} bytes; move detail into docs/'


def test_readme_links_resolve():
  """Relative links and images in the README point at files of the repository."""
  targets = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', README)
  local = [t for t in targets if '://' not in t]
  assert {'docs/index.md', 'docs/getting_started.md', 'docs/api/index.md', 'docs/results.md',
          'docs/gallery/index.md'} <= set(local)
  assert {f'docs/guides/{p.name}' for p in (ROOT / 'docs' / 'guides').glob('*.md')} <= set(local)
  missing = sorted(t for t in local if not (ROOT / t).exists())
  assert not missing, missing


def test_readme_names_every_optimiser_factory():
  import fop_optax
  factories = {'fop', 'fop_adam', 'sgd_hd', 'adam_hd', 'lodo', 'adam_qlr', 'series_sfn',
               'one_pass_hpo', 'one_pass_hpo_injected', 'skip_nonfinite',
               *(n for n in fop_optax.__all__ if n.startswith('scale_by_'))}
  assert factories <= set(fop_optax.__all__)
  missing = sorted(n for n in factories if f'`{n}`' not in README)
  assert not missing, missing


@pytest.mark.parametrize('index', range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
  exec(compile(SNIPPETS[index], f'README.md snippet {index}', 'exec'), {})


def test_ci_runs_the_readme_test_command():
  bash_blocks = re.findall(r'```bash\n(.*?)```', README, flags=re.S)
  commands = [line for block in bash_blocks for line in block.splitlines()
              if 'pytest' in line and not line.startswith('#')]
  assert len(commands) == 1
  assert commands[0].strip() in (ROOT / '.ci' / 'run').read_text()
  assert any('examples/demo.py' in block for block in bash_blocks)


def test_files_the_readme_names_exist():
  named = set(re.findall(r'\b((?:examples|notebooks|benchmarks|docs|fop_optax)/[\w/.-]+\.(?:py|ipynb|md))',
                         README))
  assert len(named) >= 8
  missing = sorted(n for n in named if not (ROOT / n).is_file())
  assert not missing, missing


DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def test_benchmark_commands_run_modules_that_exist():
  """Benchmarks run as ``python3 -m benchmarks.<name>`` from the root (they import ``examples``
  and one another as packages); a ``python3 benchmarks/<name>.py`` command would stop at once."""
  as_script, named = [], set()
  for doc in DOCS:
    text = doc.read_text()
    as_script += [f'{doc.name}: {m}' for m in re.findall(r'python3? benchmarks/\w+\.py', text)]
    named |= set(re.findall(r'-m benchmarks\.(\w+)', text))
  assert not as_script, as_script
  assert 'overhead' in named and 'leaderboard' in named
  missing = sorted(n for n in named if not (ROOT / 'benchmarks' / f'{n}.py').is_file())
  assert not missing, missing
