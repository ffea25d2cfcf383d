"""Evaluation: global test metrics, per-client accuracy, and personal models' accuracy.

Naming (issue 16): `test_*` and `client_accuracy*` always describe the global model;
the accuracy of personal models (an algorithm's `personalize`: FedBN, Ditto, FedPer,
FedRep, APFL, ...) carries the `personalized_` prefix, as in
`simulate.personalization`.

Runs compiled on the device over flat example arrays in fixed-size chunks; per-client
accuracy is a `segment_sum` of per-example correctness by owner, so no padded
`[N, max_n]` copy is ever built.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sync.data.federated import FederatedData


def _chunks(arrays: Mapping[str, np.ndarray], owner: np.ndarray, chunk: int):
  n = owner.shape[0]
  padded = -(-n // chunk) * chunk
  def pad(a):
    out = np.zeros((padded,) + a.shape[1:], a.dtype)
    out[:n] = a
    return jnp.asarray(out.reshape((padded // chunk, chunk) + a.shape[1:]))
  mask = np.arange(padded) < n
  return ({k: pad(v) for k, v in arrays.items()}, pad(owner.astype(np.int32)),
          jnp.asarray(mask.reshape(padded // chunk, chunk)))


def make_evaluator(evaluate_fn: Callable, data: FederatedData, *, chunk_size: int = 1024,
                   per_client: bool = True, personalize: Callable | None = None) -> Callable:
  """Builds `evaluate(params, client_states=()) -> dict` (jitted).

  Returns `test_loss`, `test_accuracy` on the global test set and, with
  `per_client`, `client_accuracy` `[N]` of the global params on each client's own
  test split (or on its training data when the dataset has no per-client test
  split), `client_accuracy_mean`, `client_accuracy_var`, `client_accuracy_median`
  (across clients with data) and `client_accuracy_worst_decile` (mean accuracy of
  the worst 10% of clients). With `personalize` and `client_states`, the same five
  for each client's personal model: `personalized_accuracy` `[N]`,
  `personalized_accuracy_mean`, `_var`, `_median`, `_worst_decile`; the
  `client_accuracy*` figures still describe the global params (a second pass over
  the clients' examples, batched like the global test set: cheap next to the
  personal pass, which evaluates example by example).

  Args:
    evaluate_fn: `(params, batch) -> (loss [B], correct [B])`, e.g. `Model.evaluate`.
    data: the federated data.
    chunk_size: examples per compiled evaluation chunk.
    per_client: also compute per-client accuracy.
    personalize: `(params, client_state) -> params` one client evaluates with (FedBN:
      the shared layers and the client's own batch-norm layers,
      `algorithms.fed_bn.personalized_params`); given with `client_states` (leaves
      `[N, ...]`, `ServerState.client_states`), `personalized_accuracy*` use each
      client's own params, example by example. The global test set and
      `client_accuracy*` use `params`.
  """
  num_clients = data.num_clients
  test_owner = np.zeros(len(next(iter(data.test.values()))), np.int32)
  test = _chunks(data.test, test_owner, chunk_size)
  if per_client:
    if data.test_client is not None:
      client_arrays, owner = data.test, data.test_client
    else:
      client_arrays = data.train
      owner = np.repeat(np.arange(num_clients, dtype=np.int32), data.counts)
    client_eval = _chunks(client_arrays, owner, chunk_size)
    client_sizes = jnp.asarray(np.bincount(owner, minlength=num_clients).astype(np.float32))

  def personal_evaluate(params, client_states, batch, owners):
    def one_example(state, example):
      loss, correct = evaluate_fn(personalize(params, state),
                                  jax.tree.map(lambda a: a[None], example))
      return loss[0], correct[0]
    states = jax.tree.map(lambda s: s[owners], client_states)
    return jax.vmap(one_example)(states, batch)

  def sums(params, arrays, owners, mask, client_states=()):
    def one(xs):
      batch, own, m = xs
      if jax.tree.leaves(client_states):
        loss, correct = personal_evaluate(params, client_states, batch, own)
      else:
        loss, correct = evaluate_fn(params, batch)
      return (jnp.where(m, loss, 0.0), jnp.where(m, correct, False).astype(jnp.float32), own)
    loss, correct, own = jax.lax.map(one, (arrays, owners, mask))
    return loss.reshape(-1), correct.reshape(-1), own.reshape(-1)

  @jax.jit
  def evaluate(params, client_states=()):
    loss, correct, _ = sums(params, *test)
    count = jnp.sum(test[2])
    out = {'test_loss': jnp.sum(loss) / count, 'test_accuracy': jnp.sum(correct) / count}
    if per_client:
      out.update(per_client_accuracy(sums(params, *client_eval), 'client_accuracy'))
      if personalize is not None and jax.tree.leaves(client_states):
        out.update(per_client_accuracy(sums(params, *client_eval, client_states),
                                       'personalized_accuracy'))
    return out

  def per_client_accuracy(example_sums, prefix):
    _, correct_c, own = example_sums
    per = jax.ops.segment_sum(correct_c, own, num_segments=num_clients)
    has = client_sizes > 0
    acc = jnp.where(has, per / jnp.maximum(client_sizes, 1), jnp.nan)
    k = jnp.sum(has)
    mean = jnp.nansum(acc) / k
    var = jnp.nansum(jnp.where(has, (acc - mean) ** 2, 0.0)) / k
    sorted_acc = jnp.sort(jnp.where(has, acc, jnp.inf))
    decile = jnp.maximum(1, jnp.floor(k / 10)).astype(jnp.int32)
    worst = jnp.sum(jnp.where(jnp.arange(num_clients) < decile, sorted_acc, 0.0)) / decile
    return {prefix: acc, f'{prefix}_mean': mean, f'{prefix}_var': var,
            f'{prefix}_median': jnp.nanmedian(acc), f'{prefix}_worst_decile': worst}

  return evaluate
