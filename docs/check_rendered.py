"""Check in headless Chromium that the built docs site's maths is rendered.

Usage::

    python3 docs/check_rendered.py BUILD_DIR [--chromium /usr/bin/chromium]

BUILD_DIR is the output of ``python3 -m sphinx -b html docs BUILD_DIR``. The
script serves it from a localhost HTTP server (nothing else is reached), opens
the index page, the FOP guide (``guides/fop.html``) and the API page that
documents ``fop_optax.fop`` in headless Chromium, lets MathJax run, and reads
back the rendered DOM (``--dump-dom``). For every page it checks:

* every formula the page carries (Sphinx wraps each in an element of class
  ``math``) was processed by MathJax: one ``script type="math/tex"`` and one
  CommonHTML output (``mjx-chtml``) per formula (``mjx-container`` for a
  MathJax 3 copy), and none is a TeX error (``mjx-merror``);
* no raw TeX is left in the visible text outside code: no ``\\(``, ``\\[``,
  ``$$``, ``\\frac``, ``\\begin{``;
* a page whose source has maths has formulas: the index always (it carries
  $P = M^\\top M$), the guide and the API page when their sources contain ``$``,
  ``:math:`` or ``.. math::`` (the API page's source being the docstrings it
  renders, i.e. the ``class="math"`` elements Sphinx wrote).

It prints what it found per page and exits 1 on any failure (2 on a usage or
environment error: no Chromium, no page, no local MathJax in the build).
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-default-apps', '--disable-extensions', '--mute-audio',
    '--virtual-time-budget=10000', '--run-all-compositor-stages-before-draw',
]
RAW_TEX = (r'\(', r'\[', '$$', r'\frac', r'\begin{')
MATH_ELEMENT = re.compile(r'<(?:span|div)\b[^>]*\bclass="[^"]*\bmath\b[^"]*"', re.I)


def math_elements(page_html: str) -> int:
    """Formulas Sphinx wrote into a page (elements of class ``math``)."""
    return len(MATH_ELEMENT.findall(page_html))


def visible_text(dom: str) -> str:
    """The DOM's text outside scripts, styles, code and MathJax's hidden copies."""
    dom = re.sub(r'<(script|style|pre|code|template|noscript)\b.*?</\1\s*>', ' ', dom,
                 flags=re.S | re.I)
    # MathJax 2's assistive MathML and preview spans hold no TeX, but drop them anyway
    dom = re.sub(r'<span class="MJX_Assistive_MathML[^"]*".*?</math></span>', ' ', dom, flags=re.S)
    dom = re.sub(r'<[^>]+>', ' ', dom)
    return html.unescape(dom)


def render(chromium: str, url: str, timeout: float = 120.0) -> str:
    """The DOM of ``url`` after its scripts ran, from headless Chromium."""
    with tempfile.TemporaryDirectory(prefix='check_rendered_') as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', '--dump-dom', url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or '<html' not in proc.stdout.lower():
        raise RuntimeError(f'chromium failed on {url} (rc {proc.returncode}): '
                           f'{proc.stderr.strip()[-2000:]}')
    return proc.stdout


def source_has_maths(text: str) -> bool:
    return '$' in text or ':math:' in text or '.. math::' in text


def check_page(chromium: str, base_url: str, build: Path, rel: str, source_maths: bool) -> list[str]:
    """Render one page; print its counts; return its failures."""
    built = (build / rel).read_text(encoding='utf-8')
    n_math = math_elements(built)
    dom = render(chromium, f'{base_url}/{rel}')
    n_tex = len(re.findall(r'<script[^>]*type="math/tex', dom))
    # MathJax 2 wraps each formula's output in one element with this id
    n_chtml = len(re.findall(r'id="MathJax-Element-\d+-Frame"', dom))
    n_v3 = len(re.findall(r'<mjx-container\b', dom))
    n_err = len(re.findall(r'class="[^"]*\b(?:mjx-merror|MathJax_Error)\b', dom))
    text = visible_text(dom)
    raw = {tok: text.count(tok) for tok in RAW_TEX if tok in text}
    rendered = max(n_chtml, n_v3)
    print(f'{rel}: {n_math} formulas in the page, {n_tex} read by MathJax, {n_chtml} MathJax 2 '
          f'outputs (MathJax-Element-*-Frame), {n_v3} mjx-container, {n_err} TeX errors; raw TeX in the '
          f'visible text: {raw or "none"}')
    failures = []
    if source_maths and n_math == 0:
        failures.append(f'{rel}: its source has maths but the page has no formula')
    if n_math and rendered < n_math:
        failures.append(f'{rel}: {n_math} formulas but only {rendered} rendered by MathJax')
    if n_err:
        failures.append(f'{rel}: {n_err} MathJax TeX errors')
    if raw:
        snippets = []
        for tok in raw:
            i = text.find(tok)
            snippets.append(' '.join(text[max(0, i - 60):i + 60].split()))
        failures.append(f'{rel}: raw TeX left in the visible text: {raw}; e.g. {snippets}')
    return failures


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D102 - silence the per-request lines
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('build_dir', type=Path, help='the built HTML site')
    parser.add_argument('--chromium', default='/usr/bin/chromium',
                        help='the Chromium binary (default: /usr/bin/chromium)')
    args = parser.parse_args(argv)
    build = args.build_dir.resolve()
    chromium = shutil.which(args.chromium) or args.chromium
    if not Path(chromium).exists():
        print(f'no Chromium at {args.chromium}', file=sys.stderr)
        return 2
    if not (build / 'index.html').is_file():
        print(f'no index.html in {build}', file=sys.stderr)
        return 2
    mathjax = build / '_static' / 'mathjax'
    if not (mathjax / 'MathJax.js').is_file() and not list(mathjax.glob('*.js')):
        print(f'no local MathJax in {mathjax} (the build found no libjs-mathjax)', file=sys.stderr)
        return 2

    api_page = next((p for p in sorted((build / 'api').glob('*.html'))
                     if 'id="fop_optax.fop"' in p.read_text(encoding='utf-8')), None)
    if api_page is None:
        print('no API page documents fop_optax.fop', file=sys.stderr)
        return 2
    api_rel = api_page.relative_to(build).as_posix()

    guide_src = DOCS / 'guides' / 'fop.md'
    api_html = api_page.read_text(encoding='utf-8')
    pages = [
        ('index.html', True),  # docs/index.md carries $P = M^\top M$
        ('guides/fop.html', guide_src.is_file() and source_has_maths(
            guide_src.read_text(encoding='utf-8'))),
        # the API page's source is the docstrings: :math: / .. math:: become class="math"
        (api_rel, math_elements(api_html) > 0),
    ]

    handler = functools.partial(_Quiet, directory=str(build))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base_url = f'http://127.0.0.1:{server.server_address[1]}'
    failures = []
    try:
        for rel, needs in pages:
            if not (build / rel).is_file():
                failures.append(f'{rel}: not in the build')
                print(f'{rel}: missing')
                continue
            failures += check_page(chromium, base_url, build, rel, needs)
    finally:
        server.shutdown()
        server.server_close()
    if failures:
        print('FAILED:')
        for f in failures:
            print('  ' + f)
        return 1
    print(f'OK: maths rendered on {len(pages)} pages')
    return 0


if __name__ == '__main__':
    sys.exit(main())
