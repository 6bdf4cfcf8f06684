"""The toy-function and what-FOP-learns examples run, and both notebooks execute.

Everything runs at tiny settings (the notebooks in ``FOP_NOTEBOOK_SMOKE=1``
mode) so that the file stays well under a minute and a half on two cores.
"""

import importlib
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_functions_fop_beats_sgd(tmp_path):
  toy = importlib.import_module('examples.toy_functions')
  summary = toy.main(['--out', str(tmp_path), '--max-iters', '5000'])
  for name in ('booth', 'himmelblau'):
    runs = summary['functions'][name]
    assert runs['fop']['iterations'] is not None and runs['sgd']['iterations'] is not None
    assert runs['fop']['iterations'] < runs['sgd']['iterations'], runs
    assert runs['fop']['final_loss'] < 1e-6
    assert (tmp_path / f'toy_{name}.png').stat().st_size > 10_000
  assert json.loads((tmp_path / 'toy_functions.json').read_text())['functions'].keys() == {
      'booth', 'himmelblau'}


def test_what_fop_learns_tiny(tmp_path):
  script = importlib.import_module('examples.what_fop_learns')
  summary = script.main(['--epochs', '2', '--max-train', '320', '--widths', '8', '16',
                         '--snapshots', '2', '--no-progress', '--out', str(tmp_path)])
  for name in ('matrices', 'centre', 'histograms', 'spectra', 'angles'):
    assert (tmp_path / f'learned_{name}.png').is_file()
  saved = json.loads((tmp_path / 'what_fop_learns.json').read_text())
  assert saved['spatial_layers'] == 4 and saved['snapshot_steps'] == [0, 10, 20]
  for name, p in saved['final_matrices'].items():
    p = np.asarray(p)
    np.testing.assert_allclose(p, p.T, atol=1e-6, err_msg=name)
    assert np.linalg.eigvalsh(p).min() > -1e-5, name
  for name, layer in summary['layers'].items():
    assert layer['eigenvalue_min'] > -1e-5, name
    assert layer['angle_max'] < 90, (name, layer)
    assert set(layer.get('pattern', {'whitening': False})) >= {'whitening'}


@pytest.mark.parametrize('notebook', ['quickstart.ipynb', 'what_fop_learns.ipynb'])
def test_notebook_executes(notebook, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('FOP_NOTEBOOK_SMOKE', '1')  # the kernel inherits it
  path = os.path.join(ROOT, 'notebooks', notebook)
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get('outputs') and c.get('execution_count') is None
             for c in nb.cells if c.cell_type == 'code'), 'store notebooks without outputs'
  nbclient.NotebookClient(nb, kernel_name='python3', timeout=120,
                          resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors, errors
