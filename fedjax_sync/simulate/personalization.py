"""Personalization evaluation: fine-tune the global model on each client, then test it there.

The protocol of TFF's personalization evaluation and of FedJAX's per-client
evaluation: for every client k, start from the global params w (or from the client's
own model `personalize(w, s_k)`, e.g. Ditto's v_k), run K local SGD steps on k's
training examples, and evaluate the result on k's held-out examples. The
distribution of those per-client accuracies over the population (mean, median, mean
of the worst decile) is what a personalization method is judged by; the same
statistics of the global model, unchanged, sit next to it (`client_*`).

Every client is fine-tuned and evaluated inside one compiled function: clients go
through `lax.map` in chunks of `client_chunk_size`, vmapped within a chunk (no Python
per client); a chunk's fine-tuned models are evaluated and dropped, so memory holds
`client_chunk_size` models at a time, never `[N, ...]` of them.

Example:
  >>> data = hold_out_client_test(fedjax_sync.data.label_skewed_digits(...), 0.2)
  >>> evaluate = personalized_evaluator(model, data, steps=5, learning_rate=0.05,
  ...                                   batch_size=10)
  >>> evaluate(state.params, jax.random.key(0))['personalized_accuracy_mean']
  >>> # An algorithm with personal models (Ditto, FedPer, FedRep, FedBN):
  >>> evaluate = personalized_evaluator(model, data, steps=0, learning_rate=0.05,
  ...                                   batch_size=10, personalize=algorithm.personalize)
  >>> evaluate(state.params, key, state.client_states)
  >>> # In a run, every evaluation: a driver hook.
  >>> sim.run(state, evaluation_hooks=[personalized_evaluation(evaluate, jax.random.key(1))])
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.data.batching import LocalWork, make_client_batch, to_device
from fedjax_sync.data.examples import hold_out
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.types import Params, PyTree


def hold_out_client_test(data: FederatedData, fraction: float) -> FederatedData:
  """`data` with the last `floor(fraction · n_k)` training examples of each client
  moved to that client's held-out split (`test_client`).

  For datasets without per-client test splits (label-skewed digits, Stack Overflow):
  the held-out examples become the test set, replacing the global one, so the
  global `test_*` metrics then describe the union of the clients' held-out examples.
  A client with fewer than `1 / fraction` examples keeps all of them for training
  and has no held-out examples (it is left out of the per-client statistics).
  """
  if not isinstance(fraction, numbers.Real) or not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be a number in (0, 1), got {fraction!r}')
  train, counts, test, owners = hold_out(data.train, data.counts, float(fraction))
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return FederatedData(train=train, offsets=offsets, counts=counts, test=test,
                       test_client=owners.astype(np.int32), num_classes=data.num_classes,
                       name=f'{data.name} (last {fraction:.0%} of each client held out)')


def accuracy_distribution(values: jax.Array, present: jax.Array, prefix: str) -> dict:
  """`{prefix_mean, prefix_var, prefix_median, prefix_worst_decile}` of `values [N]`
  over the clients where `present [N]` is True (the variance over those k clients,
  divided by k, as `make_evaluator`'s `client_accuracy_var`).

  The worst decile is the mean of the lowest `max(1, floor(k / 10))` values of the k
  present clients (as `make_evaluator`'s `client_accuracy_worst_decile`).
  """
  k = jnp.sum(present)
  kept = jnp.where(present, values, jnp.nan)
  mean = jnp.nansum(kept) / jnp.maximum(k, 1)
  median = jnp.nanmedian(kept)
  decile = jnp.maximum(1, jnp.floor(k / 10)).astype(jnp.int32)
  lowest = jnp.sort(jnp.where(present, values, jnp.inf))
  worst = jnp.sum(jnp.where(jnp.arange(values.shape[0]) < decile, lowest, 0.0)) / decile
  var = jnp.nansum(jnp.where(present, (values - mean) ** 2, 0.0)) / jnp.maximum(k, 1)
  return {f'{prefix}_mean': mean, f'{prefix}_var': var, f'{prefix}_median': median,
          f'{prefix}_worst_decile': worst}


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'{name} must be an integer ≥ {minimum}, got {value!r}')
  return int(value)


def personalized_evaluator(model: Any, data: FederatedData, *, steps: int,
                           learning_rate: float, batch_size: int,
                           personalize: Callable[[Params, PyTree], Params] | None = None,
                           client_chunk_size: int = 32, eval_batch_size: int = 256,
                           unroll: int | bool = 1) -> Callable:
  """Builds `evaluate(params, key, client_states=()) -> metrics` (jitted), the
  personalization evaluation of every client.

  For each client k with held-out examples: start from `params` (or, with
  `personalize` and `client_states`, from `personalize(params, client_states[k])`),
  run `steps` SGD steps of `batch_size` examples of k's training data (reshuffled
  epochs, as `LocalWork(steps=...)` in a round; key `fold_in(key, k)`), evaluate on
  k's held-out examples (`data.test` rows owned by k through `data.test_client`).

  Cost: every client runs `steps` steps, and is evaluated on as many examples as the
  client with the most held-out examples (padding is masked), so a population with
  very unequal held-out sets pays for the largest one N times.

  Args:
    model: has `loss(params, batch, key) -> [B]` (or `(losses, state update)` for a
      stateful model) and `evaluate(params, batch) -> (loss [B], correct [B])`, e.g.
      `fedjax_sync.models.Model`.
    data: federated data with per-client held-out examples (`test_client` set); a
      dataset without them is a ValueError: split some off with
      `hold_out_client_test(data, fraction)`.
    steps: K ≥ 0 fine-tuning steps (0: evaluate the starting model as it is).
    learning_rate: SGD learning rate of fine-tuning (> 0).
    batch_size: examples per fine-tuning step.
    personalize: `(params, client_state) -> params` each client starts from
      (`Algorithm.personalize`: Ditto's personal model, FedPer's/FedRep's own head,
      FedBN's own batch-norm layers); used when `client_states` is given.
    client_chunk_size: clients fine-tuned at once (vmapped); bounds memory.
    eval_batch_size: held-out examples evaluated per step of a client's evaluation.
    unroll: unrolling of the fine-tuning loop.

  Returns:
    `evaluate(params, key, client_states=())` returning, over the clients with
    held-out examples:
      `personalized_accuracy` `[N]` (NaN for a client without held-out examples),
      `personalized_accuracy_mean`, `_var`, `_median`, `_worst_decile`,
      `personalized_loss_mean` (fine-tuned models); `client_accuracy` `[N]`,
      `client_accuracy_mean`, `_var`, `_median`,
      `_worst_decile`, `client_loss_mean` (the global `params`, not fine-tuned, not
      personalized); `num_evaluated_clients`. Means are over clients (each client
      counts once); a client's loss and accuracy are means over its examples.
  """
  for attribute in ('loss', 'evaluate'):
    if not callable(getattr(model, attribute, None)):
      raise ValueError(f'model must have callable loss and evaluate (a fedjax_sync.models.'
                       f'Model), got {type(model).__name__} without {attribute!r}')
  if not isinstance(data, FederatedData):
    raise ValueError(f'data must be a FederatedData, got {type(data).__name__}')
  if data.test_client is None:
    raise ValueError(f'personalization evaluation needs per-client held-out examples, but '
                     f'{data.name!r} has only a global test set (test_client is None); split '
                     f'some off with fedjax_sync.simulate.personalization.hold_out_client_test('
                     f'data, fraction=0.2)')
  steps = _positive_int('steps', steps, minimum=0)
  batch_size = _positive_int('batch_size', batch_size)
  client_chunk_size = _positive_int('client_chunk_size', client_chunk_size)
  eval_batch_size = _positive_int('eval_batch_size', eval_batch_size)
  if (isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real)
      or not math.isfinite(learning_rate) or learning_rate <= 0):
    raise ValueError(f'learning_rate must be a finite number > 0, got {learning_rate!r}')

  num_clients = data.num_clients
  owners = np.asarray(data.test_client)
  order = np.argsort(owners, kind='stable')
  test = {k: jnp.asarray(np.asarray(v)[order]) for k, v in data.test.items()}
  test_counts = np.bincount(owners, minlength=num_clients).astype(np.int64)
  test_offsets = np.concatenate([[0], np.cumsum(test_counts)[:-1]]).astype(np.int32)
  eval_batch = max(1, min(eval_batch_size, int(test_counts.max())))
  eval_steps = max(1, -(-int(test_counts.max()) // eval_batch))
  device_test_counts = jnp.asarray(test_counts.astype(np.int32))
  device_test_offsets = jnp.asarray(test_offsets)
  train_data = to_device(data)
  max_count = int(data.counts.max()) if num_clients else 1
  work = LocalWork(batch_size=batch_size, steps=max(steps, 1))
  optimizer = optax.sgd(float(learning_rate))
  train = make_local_training(make_local_step(model.loss, optimizer), unroll=unroll)
  chunk = min(client_chunk_size, num_clients)
  num_chunks = -(-num_clients // chunk)
  padded_ids = np.minimum(np.arange(num_chunks * chunk), num_clients - 1).astype(np.int32)
  chunk_ids = jnp.asarray(padded_ids.reshape(num_chunks, chunk))

  def held_out_sums(client_params, client_id):
    """Sums of loss and correctness of one client's params over its held-out rows."""
    positions = jnp.arange(eval_steps * eval_batch, dtype=jnp.int32)
    real = positions < device_test_counts[client_id]
    rows = jnp.where(real, device_test_offsets[client_id] + positions, 0)
    rows, real = rows.reshape(eval_steps, eval_batch), real.reshape(eval_steps, eval_batch)

    def one_batch(totals, xs):
      batch_rows, batch_real = xs
      loss, correct = model.evaluate(client_params, {k: v[batch_rows] for k, v in test.items()})
      loss = jnp.where(batch_real, loss, 0.0)
      correct = jnp.where(batch_real, correct, False).astype(loss.dtype)
      return (totals[0] + jnp.sum(loss), totals[1] + jnp.sum(correct)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct_sum), _ = jax.lax.scan(one_batch, (zero, zero), (rows, real))
    return loss_sum, correct_sum

  def evaluate(params, key, client_states=()):
    personal = personalize is not None and bool(jax.tree.leaves(client_states))
    batch_key, train_key = jax.random.split(key)

    def one_chunk(ids):
      if personal:
        states = jax.tree.map(lambda s: s[ids], client_states)
        start = jax.vmap(personalize, in_axes=(None, 0))(params, states)
      else:
        start = jax.tree.map(lambda p: jnp.broadcast_to(p, (chunk,) + jnp.shape(p)), params)
      if steps:
        batch = make_client_batch(batch_key, train_data, ids, work, max_count=max_count)
        keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(ids)

        def fine_tune(p, d, m, k):
          return train(p, optimizer.init(p), d, m, k)[0]

        tuned = jax.vmap(fine_tune)(start, batch.data, batch.mask, keys)
      else:
        tuned = start
      personal_sums = jax.vmap(held_out_sums)(tuned, ids)
      global_sums = jax.vmap(held_out_sums, in_axes=(None, 0))(params, ids)
      return personal_sums, global_sums

    (tuned_loss, tuned_correct), (global_loss, global_correct) = jax.tree.map(
        lambda x: x.reshape(-1)[:num_clients], jax.lax.map(one_chunk, chunk_ids))
    counts = device_test_counts.astype(tuned_loss.dtype)
    present = device_test_counts > 0
    per_example = lambda total: jnp.where(present, total / jnp.maximum(counts, 1), jnp.nan)
    tuned_accuracy, global_accuracy = per_example(tuned_correct), per_example(global_correct)
    out = {'personalized_accuracy': tuned_accuracy, 'client_accuracy': global_accuracy,
           'num_evaluated_clients': jnp.sum(present)}
    out.update(accuracy_distribution(tuned_accuracy, present, 'personalized_accuracy'))
    out.update(accuracy_distribution(global_accuracy, present, 'client_accuracy'))
    for name, total in (('personalized_loss_mean', tuned_loss), ('client_loss_mean', global_loss)):
      out[name] = jnp.nansum(per_example(total)) / jnp.maximum(jnp.sum(present), 1)
    return out

  return jax.jit(evaluate)


def personalized_evaluation(evaluate: Callable, key: jax.Array, *,
                            per_client: bool = False) -> Callable:
  """An evaluation hook of the driver (`Simulator.run(evaluation_hooks=[...])`):
  `hook(state, rounds_done) -> metrics` runs `evaluate` (from `personalized_evaluator`) on
  `state.params` and `state.client_states` with key `fold_in(key, rounds_done)`.

  Args:
    evaluate: `evaluate(params, key, client_states)` from `personalized_evaluator`.
    key: the hook's root key (e.g. `fold_in(run_key, 1)`; never a key the rounds use).
    per_client: also return the `[N]` arrays (`personalized_accuracy`,
      `client_accuracy`); by default only the scalar statistics, one value per row.
  """
  def hook(state, rounds_done: int) -> dict:
    out = evaluate(state.params, jax.random.fold_in(key, rounds_done),
                   getattr(state, 'client_states', ()))
    if not per_client:
      out = {k: v for k, v in out.items() if k not in ('personalized_accuracy', 'client_accuracy')}
    return out

  return hook

