"""examples/paper_length.py --paired: the paired-difference table of issue 28's arms (no data needed)."""

import json
import math

import numpy as np
import pytest

pytest.importorskip('flax')
pytest.importorskip('scipy')
from examples import common  # noqa: E402
from examples import paper_length  # noqa: E402


def test_paired_table_is_the_t_interval_of_per_seed_differences(tmp_path):
  """--paired: differences per seed, sample std, Student's t with n − 1 degrees of freedom."""
  base = [0.80, 0.82, 0.81, 0.79, 0.83]
  other = [0.81, 0.84, 0.825, 0.80, 0.86]
  for name, accs in (('momentum', base), ('fop_paper', other)):
    seeds = [{'seed': k, 'test_accuracy': [0.1, a]} for k, a in enumerate(accs)]
    with open(tmp_path / f'{name}.json', 'w') as f:
      json.dump({'optimizer': name, 'label': common.LABELS[name], 'done': True,
                 'history': {'seeds': seeds}}, f)
  table = paper_length.paired(str(tmp_path), 'momentum')
  d = np.array(other) - np.array(base)            # 0.01 0.02 0.015 0.01 0.03
  half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)   # t_{0.975, 4}
  row = [line for line in table.splitlines() if line.startswith('| FOP (paper')][0]
  assert f'{d.mean():+.4f}' in row
  assert f'[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]*' in row   # excludes 0
  assert f'{np.mean(other):.4f} ± {np.std(other, ddof=1):.4f}' in row
