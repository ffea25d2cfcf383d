"""Mime and MimeLite: clients mimic a centralized optimizer with the server's state.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich & Suresh 2020, "Mime: Mimicking
Centralized Stochastic Algorithms in Federated Learning", arXiv 2008.03606,
Algorithm 1 (Mime) and MimeLite (Section 3), in the single-round form FedJAX
implements (`fedjax.algorithms.mime`, `mime_lite`).

The server keeps the model x and the state s of a base optimizer B (by default
the paper's SGD with momentum, `m ← (1 − β) g + β m`, step `−η_l m`:
`optax.chain(optax.ema(β, debias=False), optax.scale(−η_l))`; s holds m). Each round:

1. Every sampled client computes its full-batch gradient at x over its round's
   examples; c = their example-weighted mean (Mime: sent to the clients as a
   control variate; in a real deployment a first exchange, here the same round).
2. Each client runs local steps from x applying B with the *fixed* state s:
   Mime on the SVRG-corrected gradient `g(y; b) − g(x; b) + c` (both gradients on
   the same minibatch b), MimeLite on `g(y; b)`. s is never updated by clients.
3. The server steps `x ← x − η_s Σ_i p_i (x − y_i)` (example-weighted) and
   updates s with c, the full-batch gradient: `s ← B.update(c, s, x)`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import communication
from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator, compute_dtype
from fedjax_sync.algorithms.fed_sgd import full_batch_gradient_update
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (CLIENT_LEARNING_RATE, SERVER_MOMENTUM,
                                             Hyperparameters, register_algorithm,
                                             server_learning_rate)
from fedjax_sync.clients.execution import (ClientExecution, map_clients, replicate,
                                           shard_client_axis)
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm, Params, PyTree, ServerState


class MimeExtra(NamedTuple):
  """Mime's server state beyond the model.

  Attributes:
    base_state: the base optimizer's state s (e.g. the momentum), which the
      clients apply but do not update.
    control: c, the last round's full-batch gradient at the server model.
  """

  base_state: PyTree
  control: Params


def frozen_state_optimizer(base: optax.GradientTransformation, *, anchor: Params | None = None,
                           control: Params | None = None) -> optax.GradientTransformation:
  """`base` whose `update` returns its state unchanged: the client applies the server's
  optimizer state without updating it. With `anchor` and `control`, the gradient is
  first corrected to `g(y) − g(anchor) + control` (Mime's SVRG correction; `g(anchor)`
  on the step's own minibatch, through the local step's `grad_fn`)."""
  if (anchor is None) != (control is None):
    raise ValueError('Mime\'s correction needs both the anchor and the control variate')

  def init(params):
    return base.init(params)

  if anchor is None:
    def update(updates, state, params=None):
      return base.update(updates, state, params)[0], state

    return optax.GradientTransformation(init, update)

  def corrected(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    anchor_grads = grad_fn(anchor)
    adjusted = jax.tree.map(lambda g, a, c: g - a + c.astype(g.dtype), updates, anchor_grads,
                            control)
    return base.update(adjusted, state, params)[0], state

  return optax.GradientTransformationExtraArgs(init, corrected)


def sgd_with_momentum(learning_rate: float, momentum: float) -> optax.GradientTransformation:
  """Mime's base optimizer: `m ← (1 − β) g + β m` (m = 0 at start), step `−η m`."""
  return optax.chain(optax.ema(momentum, debias=False), optax.scale(-learning_rate))


def mime(loss_fn: Callable, learning_rate: float, *, momentum: float = 0.9,
         server_learning_rate: float = 1.0,
         base_optimizer: optax.GradientTransformation | None = None, lite: bool = False,
         aggregator: Aggregator | None = None, num_clients: int | None = None,
         execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
         name: str | None = None) -> Algorithm:
  """Mime (or MimeLite with `lite=True`), Karimireddy et al. 2020, arXiv 2008.03606.

  Example:
    >>> algorithm = mime(model.loss, 0.05, momentum=0.9)
    >>> state = algorithm.init(params)
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> state.extra.base_state   # the server's momentum, updated with full-batch gradients

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]` (stateless: the full-batch
      gradient differentiates it directly).
    learning_rate: the base optimizer's step size η_l.
    momentum: the base optimizer's momentum β in the paper's form
      `m ← (1 − β) g + β m`, step `−η_l m` (so η_l means what FedAvg's lr means; optax's
      heavy ball `m ← g + β m` would step 1/(1 − β) times further).
    server_learning_rate: η_s, the step on the mean client update.
    base_optimizer: overrides the momentum SGD above (any optax transform, e.g.
      FedJAX's `optax.sgd(lr, momentum)`: its state is the server's, used frozen on
      the clients).
    lite: MimeLite (no control variate).
    aggregator: reducer of the client updates (default `weighted_mean()`).
    num_clients: population size (only needed by aggregators with per-client state).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name (default 'mime' or 'mimelite').
  """
  if base_optimizer is None:
    if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
      raise ValueError(f'Mime needs a positive local learning rate, got {learning_rate!r}')
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f'Mime base momentum must be in [0, 1), got {momentum!r}')
    base_optimizer = sgd_with_momentum(learning_rate, momentum)
  name = name or ('mimelite' if lite else 'mime')
  gradient_update = full_batch_gradient_update(loss_fn)

  def client_update(server_params, extra: MimeExtra, client_state, data, mask, key):
    del client_state
    optimizer = (frozen_state_optimizer(base_optimizer) if lite else
                 frozen_state_optimizer(base_optimizer, anchor=server_params,
                                        control=extra.control))
    train = make_local_training(make_local_step(loss_fn, optimizer), unroll=unroll)
    params, _, metrics = train(server_params, extra.base_state, data, mask, key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, params), state=(), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  inner = federated_algorithm(
      client_update, server_optimizer=optax.sgd(server_learning_rate), aggregator=aggregator,
      num_clients=num_clients,
      init_extra=lambda params: MimeExtra(base_state=base_optimizer.init(params),
                                          control=tree_lib.tree_zeros_like(params)),
      execution=execution, name=name)

  def full_batch_gradient(state: ServerState, batch, key) -> Params:
    """c: the example-weighted mean of the present clients' gradients at x (finite ones)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch.client_ids)
    params = replicate(state.params, execution.mesh)

    def one_client(data, mask, k):
      out = gradient_update(params, (), (), data, mask, k)
      return out.update, out.metrics['num_examples']

    inputs = shard_client_axis((batch.data, batch.mask, keys), execution.mesh)
    grads, counts = map_clients(one_client, inputs, execution,
                                client_bytes=communication.model_bytes(state.params))
    dtype = compute_dtype(state.params)
    usable = (batch.weight > 0) & tree_lib.client_all_finite(grads)
    weights = jnp.where(usable, counts.astype(dtype), 0.0)
    total = jnp.sum(weights)
    return tree_lib.client_weighted_sum(grads, weights / jnp.where(total > 0, total, 1.0))

  def round_fn(state: ServerState, batch, key):
    gradient_key, round_key = jax.random.split(key)
    control = full_batch_gradient(state, batch, gradient_key)
    extra = MimeExtra(base_state=state.extra.base_state, control=control)
    new_state, metrics = inner.round(state._replace(extra=extra), batch, round_key)
    _, base_state = base_optimizer.update(control, state.extra.base_state, state.params)
    # Up: the update and the gradient; down: the model, s and (Mime) c.
    model = communication.model_bytes(state.params)
    down = model + communication.model_bytes(state.extra.base_state) + (0 if lite else model)
    participants = metrics['num_participants']
    metrics = {**metrics, 'bytes_up': participants * 2 * model,
               'bytes_down': participants * down}
    return new_state._replace(extra=MimeExtra(base_state=base_state, control=control)), metrics

  return inner._replace(round=round_fn)


def mime_lite(loss_fn: Callable, learning_rate: float, **kwargs) -> Algorithm:
  """MimeLite (arXiv 2008.03606): Mime without the control variate; the clients apply
  the server's frozen optimizer state to their plain minibatch gradients."""
  return mime(loss_fn, learning_rate, lite=True, **kwargs)


def _builder(lite: bool):
  def build(loss, h: Hyperparameters, **kw):
    return mime(loss, h.client_learning_rate, momentum=h.server_momentum,
                server_learning_rate=(1.0 if h.server_learning_rate is None
                                      else h.server_learning_rate), lite=lite, **kw)
  return build


_HYPERPARAMETERS = (CLIENT_LEARNING_RATE, SERVER_MOMENTUM, server_learning_rate(1.0))
register_algorithm('mime', _builder(False),
                   'Mime (server momentum + SVRG correction), Karimireddy et al. 2020 '
                   '(arXiv 2008.03606)', _HYPERPARAMETERS)
register_algorithm('mimelite', _builder(True),
                   'MimeLite (server momentum, frozen on clients), Karimireddy et al. 2020 '
                   '(arXiv 2008.03606)', _HYPERPARAMETERS)
