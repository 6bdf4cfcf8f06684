"""examples/curvature_methods.py runs at a tiny setting (Rosenbrock, 30 steps, one seed)."""

import importlib
import json

import numpy as np


def test_curvature_methods_rosenbrock_tiny(tmp_path):
  script = importlib.import_module('examples.curvature_methods')
  results = script.main(['rosenbrock', '--optimizers', 'adam_qlr', 'sfn_power',
                         '--seeds', '1', '--steps', '30', '--check-scale', '--out', str(tmp_path),
                         '--json', str(tmp_path / 'curvature_rosenbrock.json')])
  final = {r['name']: r['train_loss'] for r in results}
  start = 4.0 * 100  # f(1, −1) = 100·(−1 − 1)² = 400
  # (the full run: Adam at its best rate 0.1 ends near 0.4 after 200 steps)
  assert final['adam_qlr'] < 1.0, final
  assert np.isfinite(final['sfn_power']) and final['sfn_power'] < start
  checks = [r['scale_checks'] for r in results if r['name'] == 'sfn_power'][0]
  assert checks and all(top < 2 * v for _, top, v in checks), checks
  assert (tmp_path / 'curvature_rosenbrock.png').stat().st_size > 10_000
  saved = json.loads((tmp_path / 'curvature_rosenbrock.json').read_text())
  assert len(saved['results']) == 2
