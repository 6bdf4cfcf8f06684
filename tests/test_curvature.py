"""Curvature-vector products against dense float64 oracles on small models.

The oracles are built independently of the code under test: ``jax.hessian`` of
the flattened loss, and the explicit Jacobian ``jax.jacfwd`` of the flattened
model times the output Hessian written out by hand (``diag p − p pᵀ`` per
example for softmax cross-entropy, ``2I/size`` for the mean squared error), or
``jax.hessian`` of the written-out optax loss for the named squared losses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fop_optax import curvature


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _problem(num_classes=4, n=6):
  k = jax.random.split(jax.random.key(0), 6)
  params = {
      'w1': jax.random.normal(k[0], (3, 5), jnp.float64),
      'b1': 0.1 * jax.random.normal(k[1], (5,), jnp.float64),
      'w2': jax.random.normal(k[2], (5, num_classes), jnp.float64),
  }
  x = jax.random.normal(k[3], (n, 3), jnp.float64)
  labels = jax.random.randint(k[4], (n,), 0, num_classes)
  targets = jax.random.normal(k[5], (n, num_classes), jnp.float64)

  def model_fn(p):
    return jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2']

  return params, x, labels, targets, model_fn


def _vectors(params, count=2):
  flat, unravel = ravel_pytree(params)
  keys = jax.random.split(jax.random.key(1), count)
  return [unravel(jax.random.normal(k, flat.shape, flat.dtype)) for k in keys]


def _dense_hessian(fun, params):
  flat, unravel = ravel_pytree(params)
  return jax.jit(jax.hessian(lambda f: fun(unravel(f))))(flat)


def _dense_ggn(model_fn, params, output_hessian):
  flat, unravel = ravel_pytree(params)
  jac = jax.jit(jax.jacfwd(lambda f: model_fn(unravel(f)).reshape(-1)))(flat)  # (outputs, params)
  return jac.T @ output_hessian @ jac


def _softmax_output_hessian(logits):
  n, c = logits.shape
  p = jax.nn.softmax(logits, axis=-1)
  blocks = [jnp.diag(p[i]) - jnp.outer(p[i], p[i]) for i in range(n)]
  return jax.scipy.linalg.block_diag(*blocks) / n


def test_hvp_and_quadratics_match_dense_hessian():
  params, _, labels, _, model_fn = _problem()

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model_fn(p), labels).mean()

  h = _dense_hessian(loss, params)
  v, d = _vectors(params)
  fv, _ = ravel_pytree(v)
  fd, _ = ravel_pytree(d)
  got = ravel_pytree(curvature.hvp(loss, params, v))[0]
  np.testing.assert_allclose(got, h @ fv, rtol=1e-10, atol=1e-13)
  grad, lin = curvature.hvp_fn(loss, params)
  np.testing.assert_allclose(ravel_pytree(lin(v))[0], h @ fv, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(ravel_pytree(grad)[0], ravel_pytree(jax.grad(loss)(params))[0],
                             rtol=1e-12)
  # forward-over-forward dᵀHd, and the value and slope beside it
  value, slope, quad = curvature.directional_derivatives(loss, params, d)
  np.testing.assert_allclose(quad, fd @ h @ fd, rtol=1e-10)
  np.testing.assert_allclose(slope, ravel_pytree(jax.grad(loss)(params))[0] @ fd, rtol=1e-10)
  np.testing.assert_allclose(value, loss(params), rtol=1e-14)
  np.testing.assert_allclose(curvature.hessian_quadratic(loss, params, d), fd @ h @ fd,
                             rtol=1e-10)


@pytest.mark.parametrize('named', [False, True])
def test_ggn_softmax_cross_entropy_matches_explicit_jacobian(named):
  params, _, labels, _, model_fn = _problem()

  def ce(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss_fn = 'softmax_cross_entropy' if named else ce
  g = _dense_ggn(model_fn, params, _softmax_output_hessian(model_fn(params)))
  v, d = _vectors(params)
  fv, _ = ravel_pytree(v)
  fd, _ = ravel_pytree(d)
  got = ravel_pytree(curvature.ggn_vp(model_fn, loss_fn, params, v))[0]
  np.testing.assert_allclose(got, g @ fv, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(curvature.ggn_quadratic(model_fn, loss_fn, params, d),
                             fd @ g @ fd, rtol=1e-10)
  # The GGN is PSD and differs from the Hessian (this model is not linear).
  h = _dense_hessian(lambda p: ce(model_fn(p)), params)
  assert np.linalg.eigvalsh(np.asarray(g)).min() > -1e-10
  assert np.abs(np.asarray(g - h)).max() > 1e-3


@pytest.mark.parametrize('named', [False, True])
def test_ggn_mse_matches_explicit_jacobian(named):
  params, _, _, targets, model_fn = _problem()

  def mse(outputs):
    return jnp.mean((outputs - targets) ** 2)

  loss_fn = 'mse' if named else mse
  size = targets.size
  g = _dense_ggn(model_fn, params, 2.0 * jnp.eye(size) / size)
  v, d = _vectors(params)
  fv, _ = ravel_pytree(v)
  fd, _ = ravel_pytree(d)
  got = ravel_pytree(curvature.ggn_vp(model_fn, loss_fn, params, v))[0]
  np.testing.assert_allclose(got, g @ fv, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(curvature.ggn_quadratic(model_fn, loss_fn, params, d),
                             fd @ g @ fd, rtol=1e-10)


def test_ggn_equals_hessian_for_a_linear_model():
  """For a model linear in θ and a convex loss, G = H exactly."""
  params, x, _, targets, _ = _problem()
  lin = {'w': params['w1'], 'b': params['b1']}
  y = targets[:, :1] * jnp.ones((1, 5))

  def model_fn(p):
    return x @ p['w'] + p['b']

  loss = lambda p: jnp.mean((model_fn(p) - y) ** 2)
  d, = _vectors(lin, 1)
  np.testing.assert_allclose(curvature.ggn_quadratic(model_fn, 'mse', lin, d),
                             curvature.hessian_quadratic(loss, lin, d), rtol=1e-12)


_SQUARED_LOSSES = {
    # name: the loss it stands for, written with optax / jnp as a user would
    'l2': lambda z, y: optax.l2_loss(z, y).mean(),  # mean(½(z − y)²)
    'mse': lambda z, y: ((z - y) ** 2).mean(),  # mean((z − y)²), no ½
}


@pytest.mark.parametrize('name', ['l2', 'mse'])
def test_named_squared_losses_match_autodiff_ggn_of_their_optax_loss(name):
  """``'l2'`` is ``optax.l2_loss(z, y).mean()``, ``'mse'`` is ``((z − y)**2).mean()``.

  Oracle: the output Hessian by ``jax.hessian`` of the written-out loss (not the
  closed form), sandwiched by the explicit Jacobian, on a nonlinear model; and
  on a linear model the full Hessian of the loss of the parameters (G = H).
  """
  params, x, _, targets, model_fn = _problem()
  loss = _SQUARED_LOSSES[name]
  z = model_fn(params)
  output_hessian = jax.hessian(lambda flat: loss(flat.reshape(z.shape), targets))(z.reshape(-1))
  g = _dense_ggn(model_fn, params, output_hessian)
  v, d = _vectors(params)
  fv, fd = ravel_pytree(v)[0], ravel_pytree(d)[0]
  got = ravel_pytree(curvature.ggn_vp(model_fn, name, params, v))[0]
  np.testing.assert_allclose(got, g @ fv, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(curvature.ggn_quadratic(model_fn, name, params, d), fd @ g @ fd,
                             rtol=1e-10)
  # the named form agrees with the same loss passed as a callable
  np.testing.assert_allclose(
      curvature.ggn_quadratic(model_fn, lambda out: loss(out, targets), params, d),
      fd @ g @ fd, rtol=1e-10)
  # linear model: G = H of the loss as a function of the parameters
  lin = {'w': params['w1'], 'b': params['b1']}
  y = targets[:, :1] * jnp.ones((1, 5))
  linear = lambda p: x @ p['w'] + p['b']
  h = _dense_hessian(lambda p: loss(linear(p), y), lin)
  dl, = _vectors(lin, 1)
  fdl = ravel_pytree(dl)[0]
  np.testing.assert_allclose(curvature.ggn_quadratic(linear, name, lin, dl), fdl @ h @ fdl,
                             rtol=1e-12)
  np.testing.assert_allclose(ravel_pytree(curvature.ggn_vp(linear, name, lin, dl))[0],
                             h @ fdl, rtol=1e-12, atol=1e-14)


def test_mse_curvature_is_twice_l2():
  """The two conventions differ by exactly 2 (the ½): naming matters for the step length."""
  params, _, _, _, model_fn = _problem()
  d, = _vectors(params, 1)
  mse = curvature.ggn_quadratic(model_fn, 'mse', params, d)
  l2 = curvature.ggn_quadratic(model_fn, 'l2', params, d)
  np.testing.assert_allclose(mse, 2 * l2, rtol=1e-14)
  assert curvature.LOSSES == ('softmax_cross_entropy', 'mse', 'l2')


def test_bad_arguments_raise():
  params, *_, model_fn = _problem()
  with pytest.raises(ValueError, match='loss_fn must be a callable or one of'):
    curvature.ggn_quadratic(model_fn, 'cross_entropy', params, params)
  with pytest.raises(TypeError, match='model_fn must be a callable'):
    curvature.ggn_vp(None, 'mse', params, params)
  with pytest.raises(TypeError, match='fun must be a callable'):
    curvature.hvp(None, params, params)


def test_float32_params_give_float32_products():
  with jax.enable_x64(False):
    params = {'w': jnp.ones((3, 2), jnp.float32)}
    fun = lambda p: jnp.sum(jnp.sin(p['w']) ** 2)
    out = curvature.hvp(fun, params, params)
    assert out['w'].dtype == jnp.float32
    assert curvature.hessian_quadratic(fun, params, params).dtype == jnp.float32
