"""How exact is one_pass_hpo's hypergradient? Errors against autodiff and the implicit-function oracle.

Prints, in float64:

1. ``closed forms``: the hypergradient ``one_pass_hpo`` computes in closed form on its hyper step
   (small tanh MLP, after 2 ordinary steps) against ``−pᵀ ∂u/∂λ`` with ``p`` from the same K
   Neumann terms on the dense Jacobian ``∂u/∂w`` and ``∂u/∂λ`` from ``jax.vjp`` of the update map
   ``u(w, λ) = η(μ b + ∇L_T(w) + ω w)``, written separately here. Scalar, per-parameter ``η``
   and all three per parameter.
2. ``Neumann -> implicit``: on a quadratic ``L_T = ½wᵀAw − cᵀw`` (eig(A) in [1, 3]) with
   ``L_V = ½‖w − w_v‖²`` at the known fixed point ``w* = (A + ωI)⁻¹c``, the relative error of
   the weight-decay hypergradient against ``d L_V(w*(ω)) / d log₁₀ω`` (autodiff through the
   solve), as the number of Neumann terms K grows. (η and μ do not move the fixed point: their
   exact hypergradients are 0, and so are the estimates.)

Run: ``python examples/one_pass_hypergradient.py`` (seconds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import fop_optax  # noqa: E402


def _times(h, tree):
  if isinstance(h, dict):
    return jax.tree.map(lambda a, x: a * x, h, tree)
  return jax.tree.map(lambda x: h * x, tree)


def update_map(train_loss, b_prev, fixed):
  def u(w, raw):
    get = lambda name, f: jax.tree.map(f, raw[name]) if name in raw else fixed[name]
    eta = get('learning_rate', lambda r: 10.0 ** r)
    mu = get('momentum', jax.nn.sigmoid)
    wd = get('weight_decay', lambda r: 10.0 ** r)
    b = optax.tree.add(_times(mu, b_prev), optax.tree.add(jax.grad(train_loss)(w), _times(wd, w)))
    return _times(eta, b)
  return u


def oracle(u, w, raw, val_loss, terms):
  flat_w, unravel = ravel_pytree(w)
  jac = jax.jacobian(lambda f: ravel_pytree(u(unravel(f), raw))[0])(flat_w)
  v = ravel_pytree(jax.grad(val_loss)(optax.tree.sub(w, u(w, raw))))[0]
  p = term = v
  for _ in range(terms - 1):
    term = term - term @ jac
    p = p + term
  _, vjp = jax.vjp(lambda r: u(w, r), raw)
  return jax.tree.map(lambda x: -x, vjp(unravel(p))[0])


def hyper_step(tx, params, train_loss, val_loss, steps):
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=train_loss,
                                             validation_value_fn=val_loss))
  for _ in range(steps):
    before, w = state, params
    updates, state = update(jax.grad(train_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return before, w, state


def rel_err(a, b):
  fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.max(jnp.abs(fa - fb)) / jnp.max(jnp.abs(fb)))


def closed_forms():
  keys = jax.random.split(jax.random.key(0), 4)
  x, xv = (jax.random.normal(k, (32, 3)) for k in keys[:2])
  params = {'w1': 0.5 * jax.random.normal(keys[2], (3, 4)), 'b1': jnp.zeros(4),
            'w2': 0.5 * jax.random.normal(keys[3], (4, 1))}

  def loss(p, x):
    return jnp.mean((jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] - jnp.sin(x[:, :1])) ** 2)

  train_loss, val_loss = (lambda p: loss(p, x)), (lambda p: loss(p, xv))
  print('1. closed forms vs jax.vjp of the update map (max relative error per hyperparameter)')
  for per in [(), ('learning_rate',), ('learning_rate', 'momentum', 'weight_decay')]:
    for terms in (1, 5):
      tx = fop_optax.one_pass_hpo(0.1, 0.7, 1e-3, period=3, neumann_terms=terms,
                                  per_parameter=per)
      before, w, after = hyper_step(tx, params, train_loss, val_loss, 3)
      u = update_map(train_loss, before.momentum, before.hyperparams)
      want = oracle(u, w, before.raw_hyperparams, val_loss, terms)
      errs = ', '.join(f'{n} {rel_err(after.hypergradient[n], want[n]):.1e}' for n in want)
      print(f'   per_parameter={per!s:<45} K={terms}: {errs}')


def neumann():
  n = 6
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = jnp.asarray(q @ np.diag(np.linspace(1.0, 3.0, n)) @ q.T)
  c, w_v = jnp.asarray(rng.normal(size=n)), jnp.asarray(rng.normal(size=n))
  train_loss = lambda w: 0.5 * w @ a @ w - c @ w
  val_loss = lambda w: 0.5 * jnp.sum((w - w_v) ** 2)
  eta, mu, wd = 0.4, 0.5, 0.05
  exact = jax.grad(lambda lw: val_loss(jnp.linalg.solve(a + 10.0 ** lw * jnp.eye(n), c)))(
      jnp.log10(wd))
  w_star = jnp.linalg.solve(a + wd * jnp.eye(n), c)
  print(f'2. Neumann -> implicit hypergradient at the fixed point (eig of J = η(A + ωI) in '
        f'[{eta * (1 + wd):.2f}, {eta * (3 + wd):.2f}]); exact d L_V/d log10 ω = {float(exact):.6g}')
  for terms in (1, 2, 3, 5, 10, 20, 40, 60):
    tx = fop_optax.one_pass_hpo(eta, mu, wd, period=1, neumann_terms=terms)
    _, state = tx.update(jax.grad(train_loss)(w_star), tx.init(w_star), w_star,
                         value_fn=train_loss, validation_value_fn=val_loss)
    h = state.hypergradient
    err = abs(float(h['weight_decay'] - exact)) / abs(float(exact))
    print(f'   K={terms:3d}: estimate {float(h["weight_decay"]):.6g}  relative error {err:.1e}  '
          f'(η: {float(h["learning_rate"]):.0e}, μ: {float(h["momentum"]):.0e})')


def main():
  with jax.enable_x64(True):
    closed_forms()
    neumann()


if __name__ == '__main__':
  main()
