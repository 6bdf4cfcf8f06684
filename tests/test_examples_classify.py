"""Smoke tests of the classification examples (demo, classify, robustness_grid, common).

Each script's ``main(argv)`` runs in-process on digits with tiny settings, so the whole file
stays within a few tens of seconds of CPU (mostly compilation).
"""

import gzip
import json
import math

import numpy as np
import pytest

from examples import classify, common, demo, robustness_grid


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_missing_files_raise_a_helpful_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as info:
    common.load_dataset('fashion_mnist', data_dir=str(tmp_path))
  assert '--data-dir' in str(info.value)


def test_fashion_mnist_idx_reader(tmp_path):
  rng = np.random.default_rng(0)
  images = {'train': rng.integers(0, 256, (5, 28, 28)), 't10k': rng.integers(0, 256, (3, 28, 28))}
  for split, x in images.items():
    _write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', x)
    _write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', np.arange(len(x)))
  x_train, y_train, x_test, y_test = common.load_dataset('fashion_mnist', str(tmp_path))
  assert x_train.shape == (5, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
  assert x_train.dtype == np.float32
  np.testing.assert_allclose(x_train[..., 0] * 255, images['train'], atol=1e-4)
  np.testing.assert_array_equal(y_test, [0, 1, 2])


def test_digits_split_is_fixed_and_scaled():
  x_train, y_train, x_test, y_test = common.load_dataset('digits')
  assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
  assert 0 <= x_train.min() and x_train.max() == 1
  np.testing.assert_array_equal(common.load_dataset('digits')[3], y_test)
  assert set(common.OPTIMIZERS) == set(common.LABELS)


def test_pool_images_averages_blocks():
  rng = np.random.default_rng(0)
  data = (rng.random((3, 4, 6, 1), dtype=np.float32), np.arange(3),
          rng.random((2, 4, 6, 1), dtype=np.float32), np.arange(2))
  x_train, y_train, x_test, y_test = common.pool_images(data, 2)
  assert x_train.shape == (3, 2, 3, 1) and x_test.shape == (2, 2, 3, 1)
  assert x_train.dtype == np.float32 and y_train is data[1] and y_test is data[3]
  np.testing.assert_allclose(x_train[1, 1, 2, 0], data[0][1, 2:4, 4:6, 0].mean(), rtol=1e-6)
  np.testing.assert_allclose(x_test.mean(), data[2].mean(), rtol=1e-5)
  assert common.pool_images(data, 1) is data
  for k in (0, 4):   # 4 does not divide the width 6
    with pytest.raises(ValueError, match='must be >= 1 and divide'):
      common.pool_images(data, k)


def test_demo_trains_and_saves_plot(tmp_path, capsys):
  results = demo.main(['--epochs', '1', '--seeds', '2', '--no-progress', '--out', str(tmp_path)])
  assert (tmp_path / 'demo.png').stat().st_size > 0
  saved = json.loads((tmp_path / 'demo.json').read_text())
  assert set(saved['runs']) == {'momentum', 'fop'} and saved['seeds'] == [0, 1]
  for runs in results.values():
    assert [r['seed'] for r in runs] == [0, 1]
    for run in runs:
      assert math.isfinite(run['train_loss'][0]) and run['train_loss'][0] < 2.3
  assert min(r['test_accuracy'][0] for r in results['fop']) > 0.3  # chance is 0.1
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('verdict: ') and last == saved['verdict']


def test_demo_verdict_from_paired_seeds():
  """The verdict line's arithmetic on synthetic finals (no training)."""
  level = demo.verdict({'fop': [0.95, 0.96, 0.97], 'momentum': [0.96, 0.97, 0.99]})
  assert level.startswith('verdict: momentum ended higher by 1.3 points (FOP+momentum 0.960 ± 0.010, '
                          'momentum 0.973 ± 0.015 over 3 seeds; ')
  # paired differences −1, −1, −2 points: mean −1.33, sd 0.577, t(0.975, 2) = 4.303 -> ±1.43
  assert 'paired difference FOP+momentum − momentum −1.3 points, 95% CI [−2.8, +0.1]' in level
  assert level.endswith("not larger than the seeds' spread (the interval includes 0)")
  ahead = demo.verdict({'fop': [0.97, 0.98, 0.976], 'momentum': [0.95, 0.96, 0.955]})
  assert ahead.startswith('verdict: FOP+momentum ended higher by 2.0 points')
  assert ahead.endswith("larger than the seeds' spread (the interval excludes 0)")
  assert 'not larger' not in ahead
  one = demo.verdict({'fop': [0.9], 'momentum': [0.9]})
  assert one.startswith('verdict: both ended level') and 'one seed has no spread' in one
  with pytest.raises(ValueError, match='one final value per seed'):
    demo.verdict({'fop': [0.9, 0.8], 'momentum': [0.9]})


def test_classify_outputs(tmp_path):
  out = classify.main(['--model', 'mlp', '--epochs', '2', '--seeds', '2',
                       '--optimizers', 'momentum,fop', '--no-progress', '--out', str(tmp_path)])
  for name in ('curves.png', 'results.json', 'summary.csv', 'curves.csv'):
    assert (tmp_path / name).stat().st_size > 0
  summary = json.loads((tmp_path / 'results.json').read_text())['summary']
  assert set(summary) == {'momentum', 'fop'}
  assert summary['fop']['test_accuracy_mean'] > 0.5
  assert summary['fop']['seeds'] == 2 and summary['fop']['sec_per_epoch'] > 0
  assert len((tmp_path / 'curves.csv').read_text().splitlines()) == 1 + 2 * 2 * 2
  assert len(out['runs']['fop'][0]['train_loss']) == 2


def test_classify_rejects_unknown_optimizer():
  with pytest.raises(SystemExit):
    classify.main(['--optimizers', 'momentum,sgdd'])


def test_robustness_grid_outputs(tmp_path):
  result = robustness_grid.main([
      '--model', 'mlp', '--epochs', '1', '--max-steps', '3', '--lrs', '0.01,0.1',
      '--momenta', '0,0.9', '--adam-lrs', '', '--no-progress', '--out', str(tmp_path)])
  assert (tmp_path / 'grid.png').stat().st_size > 0
  assert not (tmp_path / 'adam.png').exists()
  saved = json.loads((tmp_path / 'grid.json').read_text())
  for name in ('momentum', 'fop'):
    acc = np.array(saved['grid'][name])
    assert acc.shape == (2, 2) and np.all((0 <= acc) & (acc <= 1))
  assert result['adam'] == {}
