"""The oracle errors behind docs/curvature.md: curvature products and the series against dense float64.

Reuses the fixtures of tests/test_curvature.py and tests/test_series_sfn.py (a 3-5-4 tanh MLP with 40
parameters; a 3-4-2 MLP with 20 parameters and an indefinite Hessian). Prints the max-abs error relative
to the oracle's max-abs entry for each product, and the relative error of series SFN against exact SFN
(eigh, |eigenvalues| + λ) as the number of terms grows, with and without ε-acceleration.

Run from the repository root: ``python3 -m benchmarks.curvature_oracle_errors`` (under a minute; the
fixtures come from the ``tests`` folder, imported as ``tests.test_curvature``).
"""

import sys

if __name__ == '__main__' and not __package__:
  sys.exit('run it from the repository root as a module: python3 -m benchmarks.curvature_oracle_errors')

import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update('jax_enable_x64', True)
from jax.flatten_util import ravel_pytree
from tests import test_curvature as T
from tests import test_series_sfn as S
from fop_optax import curvature as C
params, _, labels, targets, model_fn = T._problem()
ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
mse = lambda z: jnp.mean((z - targets) ** 2)
loss = lambda p: ce(model_fn(p))
v, d = T._vectors(params)
fv = ravel_pytree(v)[0]; fd = ravel_pytree(d)[0]
rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
h = T._dense_hessian(loss, params)
print('hvp', rel(ravel_pytree(C.hvp(loss, params, v))[0], h @ fv))
print('hvp_fn', rel(ravel_pytree(C.hvp_fn(loss, params)[1](v))[0], h @ fv))
print('dHd fwd-fwd', rel(C.hessian_quadratic(loss, params, d), fd @ h @ fd))
g = T._dense_ggn(model_fn, params, T._softmax_output_hessian(model_fn(params)))
for name, lf in (('CE named', 'softmax_cross_entropy'), ('CE callable', ce)):
  print('ggn_vp', name, rel(ravel_pytree(C.ggn_vp(model_fn, lf, params, v))[0], g @ fv), 'dGd', rel(C.ggn_quadratic(model_fn, lf, params, d), fd @ g @ fd))
gm = T._dense_ggn(model_fn, params, 2.0 * jnp.eye(targets.size) / targets.size)
for name, lf in (('MSE named', 'mse'), ('MSE callable', mse)):
  print('ggn_vp', name, rel(ravel_pytree(C.ggn_vp(model_fn, lf, params, v))[0], gm @ fv), 'dGd', rel(C.ggn_quadratic(model_fn, lf, params, d), fd @ gm @ fd))
# series vs eigh
p2, l2 = S._mlp()
flat, unravel = ravel_pytree(p2)
H = np.asarray(jax.hessian(lambda f: l2(unravel(f)))(flat)); gg = np.asarray(ravel_pytree(jax.grad(l2)(p2))[0])
ev, V = np.linalg.eigh(H); lam = 0.5
exact = V @ ((V.T @ gg) / (np.abs(ev) + lam)); scale = 1.2 * np.max(ev ** 2)
for k in (1, 3, 10, 30, 100):
  for r in (0, 1):
    if k < 2*r+1: continue
    u, _ = S._first_step(l2, p2, num_terms=k, acceleration_order=r, initial_damping=lam, initial_scale=scale)
    print('series K', k, 'r', r, 'rel err vs eigh', np.linalg.norm(u - exact) / np.linalg.norm(exact))
print('params', flat.size, 'eig range', ev.min(), ev.max())
