"""FedSGD: one full-batch gradient per client, one server step per round.

McMahan et al. 2017, arXiv 1602.05629 (FedSGD, the C-fraction baseline of §2).
With all clients, weights n_k/n and mean-reduced losses, one round equals one
full-batch gradient-descent step on the union of the clients' data.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import check_per_example_losses
from fedjax_sync.types import Algorithm


def full_batch_gradient_update(loss_fn: Callable):
  """Client update returning `∇ (1/n_k) Σ_i loss_i(w)` over all its real examples."""

  def client_update(server_params, extra, client_state, data, mask, key):
    del extra, client_state

    def body(carry, xs):
      grad_sum, loss_sum, count = carry
      batch, m, s = xs
      k = jax.random.fold_in(key, s)
      def total(p):
        losses = loss_fn(p, batch, k)
        check_per_example_losses(losses, m)
        return jnp.sum(jnp.where(m, losses, jnp.zeros_like(losses)))
      loss, grads = jax.value_and_grad(total)(server_params)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (grad_sum, loss_sum + loss, count + jnp.sum(m, dtype=jnp.int32)), None

    zeros = jax.tree.map(jnp.zeros_like, server_params)
    init = (zeros, jnp.zeros((), jnp.result_type(*jax.tree.leaves(server_params))),
            jnp.zeros((), jnp.int32))
    (grad_sum, loss_sum, count), _ = jax.lax.scan(
        body, init, (data, mask, jnp.arange(mask.shape[0])))
    denom = jnp.maximum(count, 1)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grad_sum)
    return ClientOutput(update=grads, state=(), aux=(),
                        metrics={'loss_sum': loss_sum, 'num_examples': count.astype(loss_sum.dtype)})

  return client_update


def fed_sgd(loss_fn: Callable, *, server_learning_rate: float = 0.1,
            server_optimizer: optax.GradientTransformation | None = None,
            aggregator: Aggregator | None = None, num_clients: int | None = None,
            execution: ClientExecution = ClientExecution(), name: str = 'fedsgd') -> Algorithm:
  """Federated SGD (McMahan et al. 2017, arXiv 1602.05629).

  Each client returns the gradient of its mean loss over all its real examples at
  the global model; the server steps `w ← w − η Σ_k (n_k/n) g_k` (weighted mean by
  default; pass `aggregator=mean()` for the unweighted 1/K average, which equals
  centralized training only when every n_k is equal).
  """
  return federated_algorithm(
      full_batch_gradient_update(loss_fn),
      server_optimizer=server_optimizer or optax.sgd(server_learning_rate),
      aggregator=aggregator, num_clients=num_clients, execution=execution, name=name)
