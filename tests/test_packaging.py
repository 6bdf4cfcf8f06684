"""The package as it would be published.

`python -m build` makes a wheel and an sdist (the wheel is built from the sdist, so the sdist is
complete), `twine check --strict` accepts both, and the wheel, installed with pip (not editable)
into a fresh virtual environment outside the checkout, imports and runs the README's first Python
snippet. The venv reuses the already installed jax/optax/chex/flax through a .pth file naming the
current environment's site-packages directories (their own .pth files, such as an editable
install's finder, are not processed), so nothing is downloaded and fop_optax can only come from
the wheel, which the test checks.

The build runs with --no-isolation when the installed setuptools satisfies `build-system.requires`
(about 1 s); otherwise `build` makes its isolated environment, which downloads setuptools from PyPI.
"""

import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile

import pytest

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10: build depends on tomli there
  tomllib = pytest.importorskip('tomli')

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())
NAME = PYPROJECT['project']['name']
VERSION = PYPROJECT['project']['version']


def _readme_snippets():
  """The README's Python snippets, extracted exactly as tests/test_readme.py does."""
  spec = importlib.util.spec_from_file_location('_readme_for_packaging', ROOT / 'tests' / 'test_readme.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SNIPPETS


def _build_requirements_installed():
  from packaging.requirements import Requirement  # a dependency of build
  for spec in PYPROJECT['build-system']['requires']:
    req = Requirement(spec)
    try:
      version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
      return False
    if not req.specifier.contains(version, prereleases=True):
      return False
  return True


def _run(cmd, **kwargs):
  result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, (
      f'{" ".join(map(str, cmd))} exited {result.returncode}\n'
      f'--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}')
  return result


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
  pytest.importorskip('build')  # fallback only: the test extra installs build and twine
  out = tmp_path_factory.mktemp('dist')
  isolation = ['--no-isolation'] if _build_requirements_installed() else []
  _run([sys.executable, '-m', 'build', *isolation, '--outdir', out, ROOT], timeout=300)
  wheels = sorted(out.glob('*.whl'))
  sdists = sorted(out.glob('*.tar.gz'))
  assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
  return wheels[0], sdists[0]


def test_wheel_holds_only_the_package_and_the_licence(dist):
  wheel, _ = dist
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    metadata = zf.read(f'{NAME}-{VERSION}.dist-info/METADATA').decode()
  top = {n.split('/')[0] for n in names}
  assert top == {'fop_optax', f'{NAME}-{VERSION}.dist-info'}, top
  assert 'fop_optax/__init__.py' in names
  assert f'{NAME}-{VERSION}.dist-info/licenses/LICENSE' in names
  assert 'License-Expression: Apache-2.0' in metadata
  assert 'Description-Content-Type: text/markdown' in metadata


def test_sdist_holds_what_a_build_needs(dist):
  _, sdist = dist
  with tarfile.open(sdist) as tf:
    names = {n.split('/', 1)[1] for n in tf.getnames() if '/' in n}
  for needed in ('pyproject.toml', 'README.md', 'LICENSE', 'CITATION.cff', 'fop_optax/__init__.py'):
    assert needed in names, needed
  # Tests, examples, notebooks and results stay in the repository (the tests need all of them).
  assert not any(n.split('/')[0] in ('tests', 'examples', 'notebooks', 'docs', 'benchmarks')
                 for n in names), sorted(names)


def test_twine_check_accepts_both(dist):
  pytest.importorskip('twine')
  result = _run([sys.executable, '-m', 'twine', 'check', '--strict', *dist], timeout=120)
  assert result.stdout.count('PASSED') == 2, result.stdout


def test_wheel_in_a_fresh_venv_runs_the_readme_snippet(dist, tmp_path):
  wheel, _ = dist
  env_dir = tmp_path / 'venv'
  assert ROOT not in env_dir.parents  # outside the checkout
  venv.create(env_dir, with_pip=True, symlinks=(os.name != 'nt'))
  python = env_dir / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
  # Reuse this environment's third-party packages (jax, optax, chex, flax) without processing
  # their .pth files, so an editable fop_optax installed here stays invisible.
  here = [p for p in sys.path if pathlib.Path(p).name in ('site-packages', 'dist-packages')
          and pathlib.Path(p).is_dir()]
  assert here, sys.path
  purelib = _run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))']).stdout.strip()
  (pathlib.Path(purelib) / '_outer_site_packages.pth').write_text('\n'.join(here) + '\n')
  _run([python, '-m', 'pip', 'install', '--no-index', '--no-deps', '--ignore-installed',
        '--disable-pip-version-check', wheel], cwd=tmp_path, timeout=300)

  script = tmp_path / 'snippet.py'
  script.write_text(_readme_snippets()[0] + textwrap.dedent('''
      import importlib.metadata, json, fop_optax
      dist = importlib.metadata.distribution('fop_optax')
      direct_url = dist.read_text('direct_url.json') or '{}'
      print(json.dumps({'file': fop_optax.__file__, 'version': dist.version,
                        'editable': json.loads(direct_url).get('dir_info', {}).get('editable', False),
                        'loss': float(loss)}))
      '''))
  # -I: no PYTHONPATH, no user site, no script directory or cwd on sys.path.
  result = _run([python, '-I', script], cwd=tmp_path, timeout=300)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  print(report)
  assert pathlib.Path(report['file']).resolve().is_relative_to(pathlib.Path(purelib).resolve()), report
  assert not pathlib.Path(report['file']).resolve().is_relative_to(ROOT), report
  assert report['version'] == VERSION and not report['editable'], report
  assert math.isfinite(report['loss']), report


FOP_AUTHORS = ['Moskovitz', 'Wang', 'Lan', 'Kapoor', 'Miconi', 'Yosinski', 'Rawal']  # arXiv:1910.08461


def test_citation_metadata_matches_the_package_and_the_readme():
  yaml = pytest.importorskip('yaml')  # PyYAML comes with flax (the examples extra)
  cff = yaml.safe_load((ROOT / 'CITATION.cff').read_text(encoding='utf-8'))
  assert cff['cff-version'] == '1.2.0'
  assert str(cff['version']) == VERSION
  assert cff['license'] == PYPROJECT['project']['license']
  fop = cff['references'][0]
  assert '1910.08461' in fop['url']
  assert [a['family-names'] for a in fop['authors']] == FOP_AUTHORS
  readme = (ROOT / 'README.md').read_text(encoding='utf-8')
  bibtex = readme[readme.index('```bibtex'):]
  bibtex = bibtex[:bibtex.index('```', 3)]
  assert '1910.08461' in bibtex
  assert all(name in bibtex for name in FOP_AUTHORS), bibtex
