"""SCAFFOLD: stochastic controlled averaging with per-client control variates.

Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", arXiv 1910.06378, Algorithm 1.

The server keeps a control variate `c` (`ServerState.extra`), each client keeps
`c_i` (`ServerState.client_states`, leaves `[N, ...]`, zero at start). A sampled
client starts from `y = w` and takes K corrected steps
`y ← y − η_l (g_i(y) − c_i + c)` (the engine adds `grad_offset = c − c_i` to every
local gradient), then updates its control variate:

* option II (default): `c_i⁺ = c_i − c + (w − y) / (K η_l)`;
* option I: `c_i⁺ = g_i(w)`, the client's gradient at the global model over the
  examples of its round (one extra pass).

The server steps `w ← w + η_g · mean_S Δy_i` and `c ← c + (|S|/N) mean_S Δc_i`
with `Δc_i = c_i⁺ − c_i`. The paper averages over S with equal weights, so the
default aggregator is the unweighted `mean()` over present clients (weight > 0),
not FedAvg's example-weighted mean; pass `aggregator=` to change it. Zero-weight
(padded) clients neither move c nor have their `c_i` written back.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator, compute_dtype, mean
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (SCAFFOLD_OPTION, Hyperparameters, client_and_server,
                                             register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training, masked_mean
from fedjax_sync.types import Algorithm, Params

OPTIONS = ('I', 'II')


class ScaffoldExtra(NamedTuple):
  """SCAFFOLD's server state beyond the optimizer: the control variate `c`."""

  control: Params


def effective_steps(num_steps: jax.Array, momentum: float, dtype=jnp.float32) -> jax.Array:
  """Effective step count of K heavy-ball steps, `Σ_{k=1..K} (1 − β^k)/(1 − β)`.

  A constant gradient g moves K momentum-SGD steps by `η · effective_steps · g`,
  so this replaces K in option II with local momentum (= K when β = 0). Computed
  in `dtype` (the params' float dtype in SCAFFOLD).
  """
  k = num_steps.astype(dtype)
  if momentum == 0.0:
    return k
  b = jnp.asarray(momentum, dtype)
  return (k - b * (1.0 - b ** k) / (1.0 - b)) / (1.0 - b)


def scaffold_update(loss_fn: Callable, learning_rate: float, *, momentum: float = 0.0,
                    option: str = 'II', reset_client_control: bool = False,
                    unroll: int | bool = 1):
  """SCAFFOLD's client update (Algorithm 1, lines 8–13 of arXiv 1910.06378).

  Returns `client_update(server_params, extra, c_i, data [S, B, ...], mask [S, B],
  key) -> ClientOutput` with `update = w − y` (a pseudo-gradient), `state = c_i⁺`
  and `aux = Δc_i`. K is the number of steps holding at least one real example.
  """
  if option not in OPTIONS:
    raise ValueError(f'SCAFFOLD option must be one of {OPTIONS}, got {option!r}')
  # A traced learning rate (a `Sweep` over learning rates) is not checked here.
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f'SCAFFOLD needs a positive local learning rate, got {learning_rate!r}')
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f'momentum must be in [0, 1), got {momentum!r}')
  optimizer = optax.sgd(learning_rate, momentum=momentum or None)
  train = make_local_training(make_local_step(loss_fn, optimizer), unroll=unroll)

  def full_gradient(params, data, mask, key):
    """`g_i(w)`: gradient of the client's mean loss over all its round's examples."""
    def body(acc, xs):
      batch, m, s = xs
      def objective(p):
        mean_loss, count = masked_mean(loss_fn(p, batch, jax.random.fold_in(key, s)), m)
        return mean_loss * count
      g = jax.grad(objective)(params)
      return tree_lib.tree_add(acc, g), jnp.sum(m)
    total, counts = jax.lax.scan(
        body, tree_lib.tree_zeros_like(params), (data, mask, jnp.arange(mask.shape[0])))
    return tree_lib.tree_scale(total, 1.0 / jnp.maximum(jnp.sum(counts), 1))

  def client_update(server_params, extra: ScaffoldExtra, client_control, data, mask, key):
    c = extra.control
    if reset_client_control:
      client_control = c
    offset = tree_lib.tree_sub(c, client_control)
    y, _, metrics = train(server_params, optimizer.init(server_params), data, mask, key,
                          grad_offset=offset)
    delta = tree_lib.tree_sub(server_params, y)  # w − y, the pseudo-gradient
    num_steps = jnp.sum(jnp.any(mask, axis=1))
    trained = num_steps > 0
    if option == 'II':
      steps = effective_steps(num_steps, momentum, compute_dtype(delta))
      inv = 1.0 / (jnp.maximum(steps, 1.0) * learning_rate)
      new_control = jax.tree.map(lambda ci, cc, d: ci - cc + inv.astype(d.dtype) * d,
                                 client_control, c, delta)
    else:
      new_control = full_gradient(server_params, data, mask, key)
    new_control = jax.tree.map(lambda n, o: jnp.where(trained, n, o), new_control, client_control)
    return ClientOutput(update=delta, state=new_control,
                        aux=tree_lib.tree_sub(new_control, client_control),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def _update_control(extra: ScaffoldExtra, control_deltas, batch, num_clients) -> ScaffoldExtra:
  """`c ← c + (|S|/N) · mean_S Δc_i = c + (1/N) Σ_{i∈S} Δc_i` over present clients."""
  present = (batch.weight > 0).astype(compute_dtype(control_deltas))
  step = tree_lib.client_weighted_sum(control_deltas, present / num_clients)
  return ScaffoldExtra(control=tree_lib.tree_add(extra.control, step))


def scaffold(loss_fn: Callable, learning_rate: float, *, num_clients: int | None = None,
             server_learning_rate: float = 1.0, option: str = 'II', momentum: float = 0.0,
             aggregator: Aggregator | None = None,
             server_optimizer: optax.GradientTransformation | None = None,
             execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
             reset_client_control: bool = False, name: str | None = None) -> Algorithm:
  """SCAFFOLD (Karimireddy et al. 2020, arXiv 1910.06378, Algorithm 1).

  Example:
    >>> algorithm = scaffold(model.loss, 0.01, num_clients=data.num_clients)
    >>> state = algorithm.init(params)   # c = 0, c_i = 0 for all N clients
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> state.extra.control, state.client_states   # c [...], c_i [N, ...]

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    learning_rate: local step size η_l (local optimizer: SGD, optionally momentum).
    num_clients: population size N (the c update scales by |S|/N); required, and
      the drivers check it against the data's number of clients.
    server_learning_rate: η_g (default 1); the server optimizer is `sgd(η_g)`.
    option: 'II' (default, cheap) or 'I' (extra gradient pass at w).
    momentum: local heavy-ball momentum; K becomes the effective step count.
    aggregator: reducer of `w − y` (default `mean()`, the paper's plain mean).
    server_optimizer: overrides `sgd(server_learning_rate)`.
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    reset_client_control: the seed report's "modified SCAFFOLD" (`scaffold_modified`).
    name: the algorithm's name.
  """
  if num_clients is None:
    raise ValueError('SCAFFOLD keeps a control variate per client and needs num_clients, the '
                     'population size: scaffold(loss_fn, learning_rate, '
                     'num_clients=data.num_clients)')
  if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
    raise ValueError(f'SCAFFOLD needs num_clients (population size) ≥ 1, got {num_clients!r}')
  if name is None:
    name = 'scaffold_modified' if reset_client_control else 'scaffold'
  return federated_algorithm(
      scaffold_update(loss_fn, learning_rate, momentum=momentum, option=option,
                      reset_client_control=reset_client_control, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(server_learning_rate),
      aggregator=aggregator if aggregator is not None else mean(),
      num_clients=num_clients,
      init_client_state=tree_lib.tree_zeros_like,
      init_extra=lambda params: ScaffoldExtra(control=tree_lib.tree_zeros_like(params)),
      update_extra=_update_control, execution=execution, name=name)


def scaffold_modified(loss_fn: Callable, learning_rate: float, **kwargs) -> Algorithm:
  """The seed report's "modified SCAFFOLD": every `c_i` is reset to `c` at round start.

  The local correction `c − c_i` is then exactly zero, so local training is plain
  SGD and the model trajectory is identical to FedAvg's with server learning rate
  η_g and the same (unweighted-mean) aggregation — c still moves, but never
  reaches the model. Any accuracy gain over FedAvg that the seed report attributes
  to this variant cannot come from the algorithm (it must come from differences
  in data, seeds or evaluation); `tests/test_scaffold.py` checks the identity.
  """
  return scaffold(loss_fn, learning_rate, reset_client_control=True, **kwargs)


# Client SGD(η_l, momentum), the server step η_g and the control-variate option.
_HYPERPARAMETERS = (*client_and_server(1.0), SCAFFOLD_OPTION)


def _builder(reset: bool):
  def build(loss, h: Hyperparameters, **kw):
    return scaffold(loss, h.client_learning_rate, momentum=h.client_momentum,
                    server_learning_rate=(1.0 if h.server_learning_rate is None
                                          else h.server_learning_rate),
                    option=h.scaffold_option, reset_client_control=reset, **kw)
  return build


register_algorithm('scaffold', _builder(False),
                   'SCAFFOLD (options I/II), Karimireddy et al. 2020 (arXiv 1910.06378)',
                   _HYPERPARAMETERS)
register_algorithm('scaffold_modified', _builder(True),
                   "Seed report's modified SCAFFOLD (c_i reset to c): identical to FedAvg; "
                   'SCAFFOLD is Karimireddy et al. 2020 (arXiv 1910.06378)',
                   _HYPERPARAMETERS)
