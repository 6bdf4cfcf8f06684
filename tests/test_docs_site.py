"""The documentation site builds offline with warnings as errors and documents every public name.

One full build (module-scoped fixture, ~30-90 s on 2 busy cores) is shared by the checks:

* the build passes ``-W --keep-going -n`` (warnings as errors, nitpicky cross-references);
* every name in ``fop_optax.__all__`` has an entry in the API pages (an object id such as
  ``id="fop_optax.fop"``, or ``id="module-fop_optax.diagnostics"`` for a module), and every
  docstring ``Examples:`` section is rendered as an example (a rubric and a doctest block);
* the built pages load nothing from the network (no external script, stylesheet or font);
* with Chromium and Debian's libjs-mathjax present, ``docs/check_rendered.py`` finds the maths
  rendered by the local MathJax (skipped otherwise, with the reason).

A second, tiny build (the real ``docs/conf.py`` on a one-page source) checks that without a local
MathJax the build still passes ``-W`` and points at no CDN.
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fop_optax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
CHROMIUM = Path('/usr/bin/chromium')
BUILD_TIMEOUT = 900

pytestmark = pytest.mark.slow


def _sphinx(src: Path, out: Path, tmp: Path, *, env=None, confdir: Path = None):
  """Runs ``python -m sphinx -b html -W --keep-going -n`` and returns (returncode, warnings, log)."""
  warnings_file = tmp / f'warnings_{out.name}.txt'
  cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-W', '--keep-going', '-n', '-q',
         '-d', str(tmp / f'doctrees_{out.name}'), '-w', str(warnings_file)]
  if confdir is not None:
    cmd += ['-c', str(confdir)]
  cmd += [str(src), str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                        env={**os.environ, **(env or {})})
  warnings = warnings_file.read_text() if warnings_file.exists() else ''
  return proc.returncode, warnings, proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('docs_site')
  out = tmp / 'html'
  rc, warnings, log = _sphinx(DOCS, out, tmp)
  return rc, warnings, log, out


def _built(site):
  """The built site; with --keep-going it is complete even when a warning failed the build
  (that failure is test_site_builds_offline_with_warnings_as_errors's to report)."""
  rc, warnings, log, out = site
  if not (out / 'index.html').is_file():
    pytest.fail(f'the docs build produced no site (rc {rc}); warnings:\n{warnings}\n'
                f'--- log tail:\n{log[-4000:]}', pytrace=False)
  return out


def test_site_builds_offline_with_warnings_as_errors(site):
  rc, warnings, log, out = site
  n = len([line for line in warnings.splitlines() if 'WARNING' in line or 'ERROR' in line])
  assert rc == 0 and not warnings.strip(), (
      f'python -m sphinx -b html -W --keep-going -n docs: rc {rc}, {n} warnings:\n{warnings}\n'
      f'--- log tail:\n{log[-4000:]}')
  assert (out / 'index.html').is_file()


def _api_pages(out: Path) -> dict[str, str]:
  return {p.name: p.read_text(encoding='utf-8') for p in sorted((out / 'api').glob('*.html'))}


def test_every_public_name_has_an_api_entry(site):
  out = _built(site)
  pages = _api_pages(out)
  assert pages, 'no API pages built under api/'
  ids = {}
  for name, text in pages.items():
    for i in re.findall(r'\bid="([^"]+)"', text):
      ids.setdefault(i, name)
  missing = []
  for name in fop_optax.__all__:
    obj = getattr(fop_optax, name)
    want = f'module-fop_optax.{name}' if inspect.ismodule(obj) else f'fop_optax.{name}'
    if want not in ids:
      missing.append(f'{name} (no id="{want}" in docs/api/*.md\'s pages)')
  assert not missing, 'public names without an API entry:\n  ' + '\n  '.join(missing)


def test_docstring_examples_render_on_the_api_pages(site):
  out = _built(site)
  text = '\n'.join(_api_pages(out).values())
  bad = []
  for name in fop_optax.__all__:
    obj = getattr(fop_optax, name)
    if inspect.ismodule(obj) or 'Examples:' not in (inspect.getdoc(obj) or ''):
      continue
    start = text.find(f'id="fop_optax.{name}"')
    if start < 0:
      continue  # reported by test_every_public_name_has_an_api_entry
    end = text.find('<dt class="sig', start + 1)
    entry = text[start:end if end > 0 else len(text)]
    if 'rubric">Examples' not in entry or '&gt;&gt;&gt;' not in entry:
      bad.append(name)
  assert not bad, f'Examples: sections not rendered as examples for {bad}'


def test_built_pages_load_nothing_from_the_network(site):
  out = _built(site)
  external = re.compile(
      r'<(?:script|img|iframe)\b[^>]*\bsrc="(?:https?:)?//[^"]*"'
      r'|<link\b[^>]*\bhref="(?:https?:)?//[^"]*"[^>]*>'
      r'|@import\s+url\(["\']?(?:https?:)?//'
      r'|url\(["\']?(?:https?:)?//[^)]*\.(?:woff2?|ttf|otf|css)', re.I)
  found = []
  for page in out.rglob('*.html'):
    for m in external.finditer(page.read_text(encoding='utf-8')):
      tag = m.group(0)
      if tag.startswith('<link') and re.search(r'rel="(?:stylesheet|preload|prefetch|preconnect|icon)"',
                                               tag) is None:
        continue  # e.g. rel="canonical": not loaded
      found.append(f'{page.relative_to(out)}: {tag[:160]}')
  for sheet in list(out.rglob('_static/**/*.css')):
    if re.search(r'fonts\.googleapis|fonts\.gstatic|@import\s+url\(["\']?https?:',
                 sheet.read_text(encoding='utf-8', errors='replace')):
      found.append(f'{sheet.relative_to(out)}: loads an external font or stylesheet')
  assert not found, 'the site loads from the network:\n  ' + '\n  '.join(found[:20])


def test_maths_render_in_chromium(site):
  out = _built(site)
  if not CHROMIUM.exists():
    pytest.skip(f'no Chromium at {CHROMIUM} (apt-get install chromium) to render the pages')
  if not (out / '_static' / 'mathjax' / 'MathJax.js').is_file():
    pytest.skip('no local MathJax was copied into the site (apt-get install libjs-mathjax: '
                '/usr/share/javascript/mathjax)')
  proc = subprocess.run([sys.executable, str(DOCS / 'check_rendered.py'), str(out)],
                        capture_output=True, text=True, timeout=600)
  print(proc.stdout)
  assert proc.returncode == 0, f'docs/check_rendered.py failed:\n{proc.stdout}\n{proc.stderr}'


def test_build_without_local_mathjax_passes_and_uses_no_cdn(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  (src / 'index.md').write_text('# Tiny\n\nA formula: $P = M^\\top M$.\n')
  out = tmp_path / 'html'
  rc, warnings, log = _sphinx(src, out, tmp_path, confdir=DOCS,
                              env={'FOP_OPTAX_MATHJAX_DIR': str(tmp_path / 'no_mathjax')})
  assert rc == 0 and not warnings.strip(), f'rc {rc}, warnings:\n{warnings}\n{log[-3000:]}'
  page = (out / 'index.html').read_text(encoding='utf-8')
  scripts = re.findall(r'<script[^>]*src="([^"]*MathJax[^"]*)"', page, re.I)
  assert scripts and all('://' not in s for s in scripts), scripts
  assert not (out / '_static' / 'mathjax').exists()
