"""Small shared fixtures for the tests: a linear softmax model in plain jnp and numpy."""

import jax.numpy as jnp
import numpy as np


def softmax_loss(params, batch, key):
  """Per-example cross-entropy of a linear softmax classifier `[B]`."""
  del key
  logits = batch['x'] @ params['w'] + params['b'][None, :]
  logz = jnp.log(jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return logz - jnp.take_along_axis(logits, batch['y'][:, None], axis=-1)[:, 0]


def numpy_softmax_grad(params, x, y):
  """Gradient of the mean cross-entropy over all rows of `x` (numpy, float64)."""
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return {'w': x.T @ p / len(y), 'b': p.mean(0)}


def classification_data(n=120, d=5, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  w = rng.normal(size=(d, k))
  y = np.argmax(x @ w + 0.5 * rng.normal(size=(n, k)), axis=1)
  return x, y


def init_params(d=5, k=3, seed=1, dtype=None):
  """float64 under `jax.enable_x64`, else JAX's default float."""
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(d, k)) * 0.1, dtype),
          'b': jnp.asarray(rng.normal(size=(k,)) * 0.1, dtype)}


# --- A run directory and the CLI's one-line errors ------------------------------------------


def run_rows(run_dir):
  """The rows of a run directory's metrics.jsonl."""
  import json
  import os
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def run_config(run_dir):
  """A run directory's config.json."""
  import json
  import os
  with open(os.path.join(run_dir, 'config.json')) as f:
    return json.load(f)


def cli_error(argv, capsys):
  """The one error line of a failing `fedjax-sync` invocation (exit 2, in-process or argparse)."""
  from fedjax_sync import cli
  capsys.readouterr()
  try:
    code = cli.main(argv)
  except SystemExit as exit_info:
    code = exit_info.code
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err
