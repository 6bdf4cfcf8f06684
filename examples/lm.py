"""A small byte-level Transformer language model on real text: the shared LM task.

One module for the benchmarks, the tests and the leaderboard, so that they all train the same
model on the same text:

* **Corpus** -- :data:`CORPUS_FILES`, 31 modules of the CPython 3.11 standard library (about
  507 KB of Python source), read from the interpreter's own ``Lib`` folder
  (``os.path.dirname(os.__file__)``) and checked against pinned sha256 digests: nothing is
  downloaded, and a machine whose files differ stops with an error naming the file instead of
  quietly training on other text. The files were chosen because they are byte-identical in
  CPython 3.11.2 (Debian's ``/usr/lib/python3.11``) and 3.11.7 (pyenv). :func:`load_corpus`
  returns the concatenation (sorted by name) as ``uint8`` tokens, vocabulary 256;
  :func:`split` holds out the last 10% as validation; :func:`batches` samples random windows.
* **Model** -- :class:`TransformerLM`, a pre-LayerNorm decoder built from Flax NNX layers with
  *Einsum attention*: query/key/value are ``nnx.Einsum('BTD,DNH->BTNH')`` with ``(d, heads,
  head_dim)`` kernels, the output projection ``nnx.Einsum('BTNH,NHD->BTD')`` with a ``(heads,
  head_dim, d)`` kernel, and causal softmax attention written with ``jnp.einsum``; a GELU MLP
  (``nnx.Linear``, 4x wide), token and learned position tables (``nnx.Embed``) and an
  ``nnx.Linear`` head to 256 logits. Defaults (2 layers, width 64, 4 heads, context 64):
  :data:`DEFAULT_PARAM_COUNT` = 136,704 parameters.
* **Pure-functional form** for optax -- :func:`init_params` gives the ``nnx.Param`` state as a
  plain nested dict (``nnx.to_pure_dict``), and :func:`loss_fn` merges it back into the model
  (the graph is rebuilt from the parameters' shapes, so any configuration works) and returns
  the mean next-token cross-entropy of a ``(batch, seq + 1)`` token array.

The attention layers are named ``query``/``key``/``value``/``out`` under ``attn``, so FOP's
default rule (:func:`fop_optax.describe`) finds the attention block and reads the kernels as the
layers compute them: rows = axis 0 (``d``) for query/key/value, axes 0 and 1 (``heads x
head_dim``) for ``out``; embeddings, biases and LayerNorm scales get no preconditioner.

  python3 -m examples.lm --steps 200     # adam and fop_adam side by side, validation loss
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    'CORPUS_FILES', 'DEFAULT_PARAM_COUNT', 'VOCAB', 'TransformerLM', 'batches', 'config_of',
    'fixed_batch', 'init_params', 'load_corpus', 'loss_fn', 'make_model', 'split',
]

VOCAB = 256   # byte-level tokens

# File name -> sha256 of its bytes. Pinned: the task is the same text everywhere, or it stops.
CORPUS_FILES = {
    'bisect.py': 'e5b2ff166f48a06e70ae831d8c9b47283fcd0c254306eee12d3dae9c55e11526',
    'cmd.py': 'fb82a8c4e44e5b559c88d516d79051534cec69a463df97defe05ac8a261f0a0d',
    'code.py': '266841655656d5b2370e80addcdb959f5173142d5e3778b489e734802447c5e8',
    'copy.py': '27dcfc53a4b9d4fbc3d90c74e549eb6eca9301524d6d2fbff9a6589cf51b6fd5',
    'copyreg.py': '5499e1be7ba52d4715a911ae65ef2d703db9379d21fff2a07fad8877c318e070',
    'difflib.py': '0c6afc23568d55b3e9ac914f9c5361e3033e778aa5b58d3cc82835fc5c638679',
    'fnmatch.py': '6683da36e47af523f3f41e18ad244d837783e19e98911cc0b7415dea81494ebc',
    'fractions.py': 'b11e850e354808b882d13a70a911c29accd1dbdd41757566704e3b7206c74edb',
    'functools.py': '6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b',
    'genericpath.py': '9d58ad64056a89f12258a62596c2073cd9e52b459dde152f710edc0cffcd865b',
    'getopt.py': 'efafb88c7c978e96bd6c232b7fa10bf50cef5e7fb0fb7dc8e5bce44e19f8c92f',
    'glob.py': 'fa579f8a50a66313d34d339f10be0821c9b4fed6207e8ba8e29ed1c5e119f740',
    'graphlib.py': '7bd338c5a475d1101064603d3baa5507446d3c5e73f741f6d6e77c6204c1eb65',
    'heapq.py': '6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9',
    'keyword.py': 'afbe73afb68d32fa998e5ff3d081090deec457152470f5331cc2bd430a0e9d2a',
    'linecache.py': 'e814839fc75010db274ae034f45b0fff7e529ccb702319048545fef84c2045b7',
    'numbers.py': '6d70991643a109e9c99e94d6ea2734a995fa8e89114a70ea09737413fa9ae292',
    'operator.py': 'b2af20f67667203c1730e686cc5d0427becc94db4c97f1d3efe3ed2158473f6a',
    'posixpath.py': '115bb3d2051318ee3d951cdb13c60f118f15cea837cb69fb52cf543c12fe25c3',
    'pprint.py': '0b67dbc8af449d8ced3acd9df902e98c2dbc56c8f2a7a181c51cc72768db621f',
    'queue.py': 'f6c37fc37cd7440979f7d22d40ee818fa3b714c573610c08fa52911d541193f0',
    'random.py': 'b931a2d452db89ab9e1f79d59b66ce194dbd6748049cfe44699726da52b9c956',
    'reprlib.py': '264433cc232332db871666b3bb6e4c2cb97b092cb8d5056a45ec2e53daea2b1c',
    'sched.py': 'edfb309483d7cb05e06ad86d1fdeb819629f71402dc6710a1bec36c7afcaac50',
    'shlex.py': '42ab6060f316e121e374e6621d8c1c98b8db323903c3df289a810c45a8ae46a7',
    'statistics.py': '889a066f1b8063e73387ceb84018efc507a89b365b56c6afb9cc15b2ed25c2d9',
    'string.py': '24aeae1f0526250f442022022bf98df9a823b1cb330543ee79e70e44907462e9',
    'textwrap.py': '62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c',
    'token.py': '2cabb6a81cafa84b475fc852c20b6bad45955ec0f88063720a831495215f776b',
    'types.py': '0c08fbb650c37535a7d8361fc12029e3f4c72a418cf564e8779dae14b979e5ba',
    'weakref.py': '56f8d313fb74019e53eb9287400702fbce788b7fe30e097b0b6e06296f3f080c',
}
CORPUS_BYTES = 506_888         # their total size
VALID_FRACTION = 0.1
DEFAULT_PARAM_COUNT = 136_704  # make_model() with the defaults below
DEFAULTS = dict(layers=2, width=64, heads=4, seq=64)


# --------------------------------------------------------------------------- corpus

def default_root() -> str:
  """The running interpreter's standard-library folder (where ``os.py`` lives)."""
  return os.path.dirname(os.__file__)


@functools.lru_cache(maxsize=4)
def _read_corpus(root: str) -> bytes:
  chunks = []
  for name in sorted(CORPUS_FILES):
    path = os.path.join(root, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'LM corpus: {name} is missing from {root} (expected {path}); the corpus is 31 '
          'files of the CPython 3.11 standard library: pass root= a folder that holds them, '
          'e.g. /usr/lib/python3.11')
    with open(path, 'rb') as f:
      data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_FILES[name]:
      raise ValueError(
          f'LM corpus: {path} has sha256 {digest}, expected {CORPUS_FILES[name]}: this is '
          'another version of the file, so the task would not be the same text; pass root= '
          'a CPython 3.11 standard-library folder (3.11.2 and 3.11.7 match)')
    chunks.append(data)
  return b''.join(chunks)


def load_corpus(root: str | None = None) -> np.ndarray:
  """The whole corpus as byte tokens: a ``uint8`` array of :data:`CORPUS_BYTES` entries.

  Args:
    root: the folder holding the files of :data:`CORPUS_FILES`; default
      :func:`default_root`.

  Raises:
    FileNotFoundError: a file is missing (the message names it).
    ValueError: a file's sha256 differs from the pinned one (the message names it).
  """
  data = _read_corpus(os.path.abspath(root or default_root()))
  return np.frombuffer(data, dtype=np.uint8)


def split(tokens: np.ndarray, valid_fraction: float = VALID_FRACTION):
  """``(train, valid)``: the last ``valid_fraction`` of the concatenation is validation.

  The cut is at a fixed position (no shuffling), so validation text is never trained on except
  for the windows that straddle it, none of which :func:`batches` on ``train`` can reach.
  """
  cut = len(tokens) - int(round(valid_fraction * len(tokens)))
  return tokens[:cut], tokens[cut:]


def batches(tokens: Any, batch: int, seq: int, key: jax.Array) -> jax.Array:
  """``batch`` random windows of ``seq + 1`` tokens: an ``int32`` array ``(batch, seq + 1)``.

  The model reads the first ``seq`` tokens of each window and predicts the last ``seq``
  (:func:`loss_fn`). Starts are uniform over every full window of ``tokens``; works under
  ``jax.jit`` (``batch`` and ``seq`` static).
  """
  tokens = jnp.asarray(tokens)
  starts = jax.random.randint(key, (batch,), 0, tokens.shape[0] - seq)
  return tokens[starts[:, None] + jnp.arange(seq + 1)].astype(jnp.int32)


def fixed_batch(batch: int = 8, seq: int = 64, seed: int = 0, root: str | None = None) -> jax.Array:
  """One reproducible training batch ``(batch, seq + 1)``: the benchmarks' and tests' input."""
  train, _ = split(load_corpus(root))
  return batches(train, batch, seq, jax.random.key(seed))


# --------------------------------------------------------------------------- model

def _fan_in_init(in_axis, out_axis):
  # Flax's default for an einsum kernel (lecun_normal, in_axis=-2) takes the heads axis of a
  # (d, heads, head_dim) kernel for its input: the scale must come from the contracted axes.
  return nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                           in_axis=in_axis, out_axis=out_axis)


class Attention(nnx.Module):
  """Causal multi-head self-attention with ``nnx.Einsum`` projections.

  The children are named ``query``/``key``/``value``/``out`` so that FOP's default rule sees an
  attention block (:func:`fop_optax.structures.find_attention_blocks`).
  """

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f'width {width} is not a multiple of heads {heads}')
    head_dim = width // heads
    shape = (width, heads, head_dim)
    init = _fan_in_init(0, (1, 2))
    self.query = nnx.Einsum('BTD,DNH->BTNH', shape, kernel_init=init, rngs=rngs)
    self.key = nnx.Einsum('BTD,DNH->BTNH', shape, kernel_init=init, rngs=rngs)
    self.value = nnx.Einsum('BTD,DNH->BTNH', shape, kernel_init=init, rngs=rngs)
    self.out = nnx.Einsum('BTNH,NHD->BTD', (heads, head_dim, width),
                          kernel_init=_fan_in_init((0, 1), 2), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.query(x), self.key(x), self.value(x)
    t = x.shape[1]
    scores = jnp.einsum('BTNH,BSNH->BNTS', q, k) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return self.out(jnp.einsum('BNTS,BSNH->BTNH', weights, v))


class Block(nnx.Module):
  """Pre-LayerNorm residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU, 4x)."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = Attention(width, heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only byte-level language model: ``(batch, t)`` tokens -> ``(batch, t, 256)`` logits.

  Learned positions (an ``nnx.Embed`` of ``seq`` rows: ``t <= seq``). The head's kernel starts
  small (normal, std 0.02), so the loss at initialisation is close to ``ln 256``.
  """

  def __init__(self, layers: int = 2, width: int = 64, heads: int = 4, seq: int = 64, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
    self.pos = nnx.Embed(seq, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, VOCAB, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def make_model(seed: int | jax.Array = 0, layers: int = 2, width: int = 64, heads: int = 4,
               seq: int = 64) -> TransformerLM:
  """A :class:`TransformerLM` from ``nnx.Rngs(seed)`` (``seed``: an int or a JAX key)."""
  return TransformerLM(layers, width, heads, seq, rngs=nnx.Rngs(seed))


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of ``logits[:, :-1]`` (from ``tokens[:, :-1]``) against ``tokens[:, 1:]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# --------------------------------------------------------------------------- pure-functional form

def init_params(seed: int | jax.Array = 0, **config) -> dict:
  """The model's ``nnx.Param`` state as a plain nested dict (``nnx.to_pure_dict``).

  ``config``: ``layers``, ``width``, ``heads``, ``seq`` as for :func:`make_model`. Leaves are
  ``params['blocks'][i]['attn']['query']['kernel']`` and the like.
  """
  _, state = nnx.split(make_model(seed, **config), nnx.Param)
  return nnx.to_pure_dict(state)


def config_of(params: dict) -> dict:
  """``layers``, ``width``, ``heads``, ``seq`` read back from the parameters' shapes."""
  query = params['blocks'][0]['attn']['query']['kernel']
  return dict(layers=len(params['blocks']), width=int(query.shape[0]),
              heads=int(query.shape[1]), seq=int(params['pos']['embedding'].shape[0]))


@functools.lru_cache(maxsize=16)
def _skeleton(layers: int, width: int, heads: int, seq: int):
  """``(graphdef, abstract Param state)`` of a configuration (shapes only: no arrays made)."""
  model = nnx.eval_shape(lambda: make_model(0, layers, width, heads, seq))
  return nnx.split(model, nnx.Param)


def apply(params: dict, tokens: jax.Array) -> jax.Array:
  """Logits ``(batch, t, 256)`` of the model with ``params`` (a dict from :func:`init_params`)."""
  graphdef, abstract = _skeleton(**config_of(params))
  state = jax.tree.map(lambda x: x, abstract)   # a copy: the cached skeleton stays abstract
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(tokens)


def loss_fn(params: dict, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy (nats per byte) of ``tokens`` ``(batch, seq + 1)``: a scalar."""
  return next_token_loss(apply(params, tokens[:, :-1]), tokens)


def param_count(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------- a short run

def train(tx: optax.GradientTransformation, steps: int, *, batch: int = 8, seed: int = 0,
          eval_batches: int = 16, **config) -> dict:
  """Trains :func:`init_params` ``(seed)`` with ``tx`` on random training windows.

  Returns the final training-batch loss, the validation loss (mean over ``eval_batches``
  fixed validation batches) and the wall time. The data key is fixed, so every optimiser sees
  the same batches.
  """
  config = {**DEFAULTS, **config}
  train_tokens, valid_tokens = (jnp.asarray(t) for t in split(load_corpus()))
  params = init_params(seed, **config)
  state = tx.init(params)
  seq = config['seq']

  @jax.jit
  def step(params, state, key):
    tokens = batches(train_tokens, batch, seq, key)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  started = time.time()
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  loss = jnp.nan
  for i in range(steps):
    params, state, loss = step(params, state, keys[i])
  valid = batches(valid_tokens, batch * eval_batches, seq, jax.random.key(12345))
  valid_loss = jax.jit(loss_fn)(params, valid)
  return dict(train_loss=float(loss), valid_loss=float(valid_loss),
              seconds=time.time() - started)


def main(argv=None):
  import fop_optax
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--lr', type=float, default=3e-3)
  args = parser.parse_args(argv)
  print(f'corpus {CORPUS_BYTES} bytes; model {param_count(init_params(0))} parameters; '
        f'ln 256 = {math.log(VOCAB):.3f}')
  for name, tx in (('adam', optax.adam(args.lr)), ('fop_adam', fop_optax.fop_adam(args.lr))):
    r = train(tx, args.steps)
    print(f"{name:9s} {args.steps} steps: train {r['train_loss']:.3f}  "
          f"valid {r['valid_loss']:.3f} nats/byte  ({r['seconds']:.1f} s)", flush=True)


if __name__ == '__main__':
  main()
