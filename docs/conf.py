"""Sphinx configuration for the fop_optax documentation site.

Build (offline, warnings as errors, nitpicky cross-references)::

    python3 -m sphinx -b html -W --keep-going -n docs docs/_build/html

Nothing is fetched at build time or by the built pages: no intersphinx
inventories, no CDN. Maths is rendered by a local MathJax copied from Debian's
``libjs-mathjax`` (``/usr/share/javascript/mathjax``) into ``_static/mathjax``
of the built site. Where that copy is absent (e.g. on CI) the build still
succeeds; the pages then carry the TeX source, unrendered. The environment
variable ``FOP_OPTAX_MATHJAX_DIR`` points the build at another MathJax 2
directory (the one holding ``MathJax.js``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = 'fop_optax'
author = 'fop_optax contributors'
copyright = 'fop_optax contributors'  # noqa: A001 (Sphinx's name)
try:
    import fop_optax as _pkg

    release = version = _pkg.__version__
except Exception:  # pragma: no cover - the package should import
    release = version = ''

extensions = [
    'myst_nb',  # includes myst_parser
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]

# --- sources ----------------------------------------------------------------
# Markdown is handled by myst_nb (which registers .md and .ipynb).
root_doc = 'index'
exclude_patterns = [
    '_build',
    '_build/**',
    'data',
    'data/**',
    '**/.ipynb_checkpoints',
    'Thumbs.db',
    '.DS_Store',
]

# --- MyST / myst-nb ---------------------------------------------------------
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
# MyST's MathJax hook only knows the MathJax 3/4 configuration keys; the local
# MathJax is version 2, configured below through mathjax2_config instead.
myst_update_mathjax = False
nb_execution_mode = 'off'  # the notebooks are run by the test suite, not here
nb_merge_streams = True

# --- autodoc / napoleon -----------------------------------------------------
autodoc_default_options = {
    'members': True,
    'undoc-members': False,
    'show-inheritance': False,
    'member-order': 'bysource',
}
autodoc_typehints = 'signature'
autodoc_member_order = 'bysource'
autodoc_class_signature = 'mixed'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_attr_annotations = True
add_module_names = True

# --- nitpicky cross-references ----------------------------------------------
# No intersphinx inventories are fetched, so references to other libraries
# cannot resolve; they are ignored here. References inside fop_optax must
# resolve.
nitpicky = True
_OUTSIDE = (
    r'jax', r'jnp', r'jaxlib', r'optax', r'chex', r'flax', r'nnx', r'numpy', r'np',
    r'typing', r'typing_extensions', r'collections', r'collections\.abc', r'abc',
    r'builtins', r'functools', r'enum', r'dataclasses', r'types', r'warnings',
    r'math', r're', r'os', r'pathlib', r'orbax', r'ml_dtypes', r'equinox',
)
_OUTSIDE_NAMES = {n.replace('\\', '') for n in _OUTSIDE}
nitpick_ignore_regex = [
    (r'py:.*', r'(%s)(\..*)?' % '|'.join(_OUTSIDE)),
    # bare names that come from type hints and napoleon's "Args" types
    (r'py:.*', r'(Any|Callable|Optional|Union|NamedTuple|Sequence|Mapping|'
               r'MutableMapping|Iterable|Iterator|Hashable|Literal|TypeVar|Protocol|'
               r'Generic|Tuple|List|Dict|Set|FrozenSet|Type|ClassVar|Final|Self|'
               r'TypeAlias|ParamSpec|Concatenate|Annotated|NoneType|None|'
               r'int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|'
               r'complex|slice|Ellipsis|callable|optional|default|'
               r'Array|ArrayLike|ArrayTree|PyTree|Pytree|Params|Updates|OptState|'
               r'ScalarOrSchedule|Schedule|GradientTransformation|'
               r'GradientTransformationExtraArgs|DTypeLike|Numeric|PRNGKey|Shape|'
               r'Exception|Warning|UserWarning|RuntimeWarning|ValueError|TypeError|'
               r'NamedTupleMeta|T|P|R)'),
    # the leading-underscore private helpers and TypeVars of other packages
    (r'py:.*', r'(?!fop_optax\.).*\._[A-Za-z].*'),
    # a private TypeVar of the package (e.g. structures._base._S in register's signature)
    (r'py:class', r'fop_optax\..*\._[A-Z][A-Za-z]?'),
]

# --- HTML -------------------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = 'fop_optax'
html_static_path: list[str] = []
html_last_updated_fmt = None
html_theme_options = {
    # nothing that reaches the network: no repository buttons, no launch
    # buttons (Binder/Colab), no analytics, no icon links to external hosts
    'use_download_button': False,
    'use_fullscreen_button': False,
    'use_repository_button': False,
    'use_issues_button': False,
    'use_edit_page_button': False,
    'use_source_button': False,
    'launch_buttons': {},
    'show_toc_level': 2,
    'navigation_with_keys': False,
    'analytics': {},
    'icon_links': [],
}
html_show_sourcelink = False
html_copy_source = False

# --- maths: a local MathJax ---------------------------------------------------
_MATHJAX_CANDIDATES = ([os.environ['FOP_OPTAX_MATHJAX_DIR']]
                       if 'FOP_OPTAX_MATHJAX_DIR' in os.environ
                       else ['/usr/share/javascript/mathjax'])
MATHJAX_SRC = next((Path(p) for p in _MATHJAX_CANDIDATES
                    if p and (Path(p) / 'MathJax.js').is_file()), None)
# the subset of MathJax 2 that TeX input with CommonHTML output needs
_MATHJAX_PARTS = [
    'MathJax.js',
    'config/TeX-AMS_CHTML.js',
    'extensions',
    'jax/input/TeX',
    'jax/element',
    'jax/output/CommonHTML',
    'fonts/HTML-CSS/TeX/woff',
    'localization/en',
]
# relative to _static; Sphinx keeps a ?config= query on MathJax 2 paths
mathjax_path = 'mathjax/MathJax.js?config=TeX-AMS_CHTML'
mathjax2_config = {
    # MyST wraps every formula in \( \) or \[ \] inside an element of class
    # "math" and marks the rest of each page "tex2jax_ignore", so MathJax only
    # touches the formulas (not dollar signs in code or prose)
    'tex2jax': {
        'inlineMath': [['\\(', '\\)']],
        'displayMath': [['\\[', '\\]']],
        'processEscapes': False,
        'processEnvironments': True,
        'processRefs': False,
        'ignoreClass': 'tex2jax_ignore|mathjax_ignore',
        'processClass': 'tex2jax_process|mathjax_process|math|output_area',
    },
    'TeX': {'equationNumbers': {'autoNumber': 'none'}},
    'CommonHTML': {'linebreaks': {'automatic': False}},
    'menuSettings': {'zoom': 'None'},
    'showMathMenu': False,
    'messageStyle': 'none',
}


def _copy_mathjax(app, exception):
    """Copy the local MathJax subset into the built site (HTML builders only)."""
    from sphinx.util import logging

    logger = logging.getLogger('fop_optax.docs')
    if exception is not None or app.builder.format != 'html':
        return
    if MATHJAX_SRC is None:
        logger.info('fop_optax docs: no local MathJax found (install Debian\'s '
                    'libjs-mathjax); maths is left as TeX source')
        return
    dest = Path(app.outdir) / '_static' / 'mathjax'
    for part in _MATHJAX_PARTS:
        src = MATHJAX_SRC / part
        if not src.exists():
            continue
        target = dest / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
    logger.info('fop_optax docs: copied MathJax from %s to %s', MATHJAX_SRC, dest)


def _resolve_inside_package(app, env, node, contnode):
    """Resolve a reference to a fop_optax object written by its short or defining name.

    Docstrings say ``:class:`Structure``` (inside ``fop_optax.structures``) or
    ``:func:`fop_optax.structures.resolve_structures``` while the page documents
    the object under another of its import paths (``fop_optax.resolve_structures``).
    A reference that did not resolve is retried against the documented
    ``fop_optax`` objects whose dotted name ends with the same one or two
    components; it resolves only when exactly one object matches, so a reference
    to something undocumented (or outside the package) still fails.
    """
    from sphinx.util import logging

    logger = logging.getLogger('fop_optax.docs')
    if node.get('refdomain') != 'py':
        return None
    target = node.get('reftarget', '').lstrip('.~')
    if not target or target.split('.')[0] in _OUTSIDE_NAMES:
        return None
    domain = env.get_domain('py')
    objects = domain.objects
    parts = target.split('.')
    # the shortest suffix that could identify the object (method: Class.method)
    for width in (2, 1):
        if len(parts) < width:
            continue
        tail = '.' + '.'.join(parts[-width:])
        found = {}
        for name, entry in objects.items():
            if name.startswith('fop_optax.') and (name.endswith(tail)) and not entry.aliased:
                found[(entry.docname, entry.node_id)] = name
        if len(found) == 1:
            full = next(iter(found.values()))
            logger.debug('fop_optax docs: %r resolved as %r', target, full)
            return domain.resolve_xref(env, node.get('refdoc', ''), app.builder,
                                       node.get('reftype'), full, node, contnode)
        if len(found) > 1:
            return None
    return None


def _type_alias_spellings():
    """Expanded spellings of the optax type aliases in signatures, mapped to the alias name.

    ``optax.ScalarOrSchedule`` is a union of eight types; autodoc would print it in full.
    """
    try:
        import optax
        from sphinx.util.typing import stringify_annotation
    except Exception:  # pragma: no cover
        return {}
    out = {}
    for name in ('ScalarOrSchedule', 'Schedule'):
        alias = getattr(optax, name, None)
        if alias is None:
            continue
        for mode in ('smart', 'fully-qualified-except-typing', 'fully-qualified'):
            try:
                out[stringify_annotation(alias, mode)] = f'optax.{name}'
            except Exception:  # pragma: no cover
                pass
    # the longest first, so that a spelling containing another is replaced whole
    return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))


def _shorten_signature(app, what, name, obj, options, signature, return_annotation):
    spellings = _ALIAS_SPELLINGS
    for long, short in spellings.items():
        if signature:
            signature = signature.replace(long, short)
        if return_annotation:
            return_annotation = return_annotation.replace(long, short)
    return signature, return_annotation


_ALIAS_SPELLINGS = _type_alias_spellings()


def setup(app):
    app.connect('autodoc-process-signature', _shorten_signature)
    app.connect('build-finished', _copy_mathjax)
    app.connect('missing-reference', _resolve_inside_package)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
