"""Every Python snippet in the README runs, and the set-up commands match CI."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
SNIPPETS = re.findall(r'```python\n(.*?)```', README, flags=re.S)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 3


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
