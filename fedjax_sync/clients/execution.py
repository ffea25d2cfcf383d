"""How the clients of a round execute: all under `vmap`, in chunks, or one at a time.

Every strategy computes the same function of the stacked inputs `[C, ...]`; they
differ in speed and peak memory. With a device mesh the client axis is first split
into `[D, C/D]` across the `'clients'` mesh axis (one slice per device, sharded
with `NamedSharding`), and the strategy applies within each device's slice.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sync import tree as tree_lib

STRATEGIES = ('vmap', 'chunked', 'sequential', 'loop', 'auto')
# What 'auto' runs (measured, docs/performance.md). Accelerators want the batched
# clients. On CPU it depends on size: while the clients' outputs together (one
# model-sized update each) fit in about a core's L2 cache, vmap amortizes per-op
# overhead (Synthetic logistic regression, 10 clients: 2.5 against 3.2 ms per
# round); above it every vmapped step streams C models through memory and one
# client at a time wins (MLP 784-200-10, 100 clients: 0.08 against 0.19 s).
AUTO_STRATEGY = {'gpu': 'vmap', 'tpu': 'vmap'}
CPU_VMAP_MAX_BYTES = 1 << 20
CLIENT_AXIS = 'clients'


class ClientExecution(NamedTuple):
  """Client-execution choice.

  Attributes:
    strategy: 'auto' (default: the measured best, `resolve_strategy`: 'vmap' on
      GPU/TPU; on CPU 'vmap' while the clients' outputs fit in
      `CPU_VMAP_MAX_BYTES`, else 'sequential'), 'vmap' (all clients batched),
      'chunked' (`chunk_size` clients under vmap at a time, bounding memory),
      'sequential' (one client at a time in a compiled loop), or 'loop' (clients
      unrolled in the trace, no while loop; compile time grows with C). 'loop'
      with `unroll=True` local steps is for CNNs on CPU whose convolutions are
      plain `lax` ones: XLA:CPU runs their gradients slowly inside loops. The
      models of `fedjax_sync.models` use `loop_friendly_conv` and need no
      'loop'.
    chunk_size: clients per chunk for 'chunked'.
    mesh: optional `Mesh` with a `'clients'` axis to shard the client axis over.
  """

  strategy: str = 'auto'
  chunk_size: int | None = None
  mesh: Mesh | None = None

  def validate(self) -> 'ClientExecution':
    if self.strategy not in STRATEGIES:
      raise ValueError(f'unknown client execution {self.strategy!r}; valid: {", ".join(STRATEGIES)}')
    if self.strategy == 'chunked' and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"strategy 'chunked' needs a positive integer chunk_size, got {self.chunk_size!r}")
    if self.mesh is not None and CLIENT_AXIS not in self.mesh.axis_names:
      raise ValueError(f"mesh must have a {CLIENT_AXIS!r} axis, got {self.mesh.axis_names}")
    return self

  @property
  def num_shards(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape[CLIENT_AXIS]


def client_mesh(devices=None) -> Mesh:
  """A one-axis mesh named `'clients'` over `devices` (default: all devices)."""
  import numpy as np
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def shard_client_axis(tree, mesh: Mesh | None):
  """Constrains every leaf's leading axis to be sharded over `'clients'` (inside jit)."""
  if mesh is None:
    return tree
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(CLIENT_AXIS))), tree)


def replicate(tree, mesh: Mesh | None):
  """Constrains every leaf to be replicated over the mesh (inside jit)."""
  if mesh is None:
    return tree
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())), tree)


def resolve_strategy(strategy: str, fn: Callable, args, client_bytes: int | None = None) -> str:
  """The strategy 'auto' stands for when `fn` runs on the clients of `args` (`[C, ...]`).

  Any other strategy is returned unchanged. Resolved at trace time, from shapes
  only: `client_bytes` is the size of one client's output (e.g. one model); when
  not given it is found by tracing `fn` once more (`jax.eval_shape`).
  """
  if strategy != 'auto':
    return strategy
  backend = jax.default_backend()
  if backend != 'cpu':
    return AUTO_STRATEGY.get(backend, 'vmap')
  num_clients = jax.tree.leaves(args)[0].shape[0]
  if client_bytes is None:
    one = jax.eval_shape(fn, *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                           args))
    client_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(one))
  return 'vmap' if num_clients * client_bytes <= CPU_VMAP_MAX_BYTES else 'sequential'


def map_clients(fn: Callable, args, execution: ClientExecution = ClientExecution(), *,
                client_bytes: int | None = None):
  """Applies `fn` to every client's slice of `args` (a tuple whose leaves are `[C, ...]`).

  `fn(*slices)` takes one client's slices and returns a pytree; the result has a
  leading `[C]` axis. C must be a multiple of the mesh's device count (pad with
  zero-weight clients: `fedjax_sync.data.pad_clients`). `client_bytes` (one
  client's output size) lets 'auto' choose without tracing `fn` twice.
  """
  execution.validate()
  leaves = jax.tree.leaves(args)
  num_clients = leaves[0].shape[0]
  shards = execution.num_shards
  if num_clients % shards:
    raise ValueError(f'{num_clients} clients do not split over {shards} devices; '
                     'pad with zero-weight clients first')

  def per_shard(shard_args):
    strategy = resolve_strategy(execution.strategy, fn, shard_args, client_bytes)
    if strategy == 'vmap':
      return jax.vmap(fn)(*shard_args)
    if strategy == 'loop':
      # Python-unrolled: one traced copy per client, no while loop (XLA:CPU runs
      # convolutions inside loops far slower); compile time grows with C.
      n = jax.tree.leaves(shard_args)[0].shape[0]
      outs = [fn(*jax.tree.map(lambda x: x[c], shard_args)) for c in range(n)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    batch = execution.chunk_size if strategy == 'chunked' else None
    return jax.lax.map(lambda a: fn(*a), shard_args, batch_size=batch)

  if shards == 1:
    return per_shard(args)
  split = jax.tree.map(lambda x: x.reshape((shards, num_clients // shards) + x.shape[1:]), args)
  split = shard_client_axis(split, execution.mesh)
  out = jax.vmap(per_shard)(split)
  out = shard_client_axis(out, execution.mesh)
  return jax.tree.map(lambda x: x.reshape((num_clients,) + x.shape[2:]), out)


def map_reduce_clients(fn: Callable, args, weights, execution: ClientExecution, *,
                       client_bytes: int | None = None, update_like=None):
  """Runs the clients and reduces their updates as they are produced.

  Memory-bounded rounds: with 'sequential' one client's update exists at a time,
  with 'chunked' `execution.chunk_size` clients' (per device), never all `[C, d]`
  ('vmap' and 'loop' produce every update first, then sum them). Valid for
  aggregators that are a linear weighted sum of the updates (FedAvg's
  `weighted_mean`); robust, clipping or compressing aggregators need every update
  at once and use `map_clients`.

  Args:
    fn: `fn(*slices) -> (update, per_client)` for one client; `update` is
      params-shaped, `per_client` a pytree of small per-client values (metrics).
    args: tuple whose leaves are `[C, ...]`.
    weights: `[C]` weights of the sum.
    execution: any strategy, with its chunk size and optional mesh.
    client_bytes: one client's output size, for 'auto' (see `map_clients`).
    update_like: a pytree shaped like one client's update (e.g. the params); when
      not given, its shape is found by tracing `fn` once more (`jax.eval_shape`).

  Returns:
    `(Σ_c weights[c] · update_c, per_client [C, ...], ‖update_c‖² [C])`. C need not
    be a multiple of chunk_size (the last chunk is padded with zero-weight copies of
    the first clients, which add nothing).
  """
  execution.validate()
  num_clients = weights.shape[0]
  shards = execution.num_shards
  if num_clients % shards:
    raise ValueError(f'{num_clients} clients do not split over {shards} devices; '
                     'pad with zero-weight clients first')

  def weighted_sum(w, update):
    # A zero-weight client adds nothing even when its update is NaN or Inf.
    return tree_lib.client_weighted_sum(update, w)

  def zero_update(one_client_args, batched: bool):
    if update_like is not None:
      return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x)), update_like)
    run = (lambda a: jax.vmap(fn)(*a)[0]) if batched else (lambda a: fn(*a)[0])
    shapes = jax.eval_shape(run, one_client_args)
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:] if batched else x.shape, x.dtype), shapes)

  def sq_norms(update):
    return sum(jnp.sum(jnp.square(u.reshape(u.shape[0], -1)), axis=1)
               for u in jax.tree.leaves(update))

  def all_at_once(shard_args, shard_weights, strategy):
    update, per_client = map_clients(fn, shard_args,
                                     execution._replace(strategy=strategy, mesh=None),
                                     client_bytes=client_bytes)
    return weighted_sum(shard_weights, update), per_client, sq_norms(update)

  def one_at_a_time(shard_args, shard_weights):
    zeros = zero_update(jax.tree.map(lambda x: x[0], shard_args), batched=False)

    def body(total, xs):
      client_args, w = xs
      update, per_client = fn(*client_args)
      # where, not w · u: a zero-weight client's NaN or Inf update adds nothing.
      total = jax.tree.map(
          lambda t, u: t + jnp.where(w != 0, w.astype(u.dtype) * u, jnp.zeros((), u.dtype)),
          total, update)
      sq = sum(jnp.sum(jnp.square(u)) for u in jax.tree.leaves(update))
      return total, (per_client, sq)

    total, (per_client, sq) = jax.lax.scan(body, zeros, (shard_args, shard_weights))
    return total, per_client, sq

  def in_chunks(shard_args, shard_weights):
    n = shard_weights.shape[0]
    chunk = min(execution.chunk_size, n)
    pad = (-n) % chunk
    if pad:
      # Padding clients repeat the first ones (valid inputs) with weight 0.
      shard_args = jax.tree.map(lambda x: jnp.concatenate([x, x[:pad]], axis=0), shard_args)
      shard_weights = jnp.concatenate([shard_weights, jnp.zeros((pad,), shard_weights.dtype)])
    num_chunks = (n + pad) // chunk
    chunked = jax.tree.map(lambda x: x.reshape((num_chunks, chunk) + x.shape[1:]),
                           (shard_args, shard_weights))
    zeros = zero_update(jax.tree.map(lambda x: x[0], chunked[0]), batched=True)

    def body(total, xs):
      chunk_args, chunk_weights = xs
      update, per_client = jax.vmap(fn)(*chunk_args)
      total = jax.tree.map(jnp.add, total, weighted_sum(chunk_weights, update))
      return total, (per_client, sq_norms(update))

    total, (per_client, sq) = jax.lax.scan(body, zeros, chunked)
    unchunk = lambda x: x.reshape((num_chunks * chunk,) + x.shape[2:])[:n]
    return total, jax.tree.map(unchunk, per_client), unchunk(sq)

  def per_shard(shard_args, shard_weights):
    strategy = resolve_strategy(execution.strategy, fn, shard_args, client_bytes)
    if strategy == 'chunked':
      return in_chunks(shard_args, shard_weights)
    if strategy == 'sequential':
      return one_at_a_time(shard_args, shard_weights)
    return all_at_once(shard_args, shard_weights, strategy)

  if shards == 1:
    return per_shard(args, weights)
  split = jax.tree.map(lambda x: x.reshape((shards, num_clients // shards) + x.shape[1:]),
                       (args, weights))
  split = shard_client_axis(split, execution.mesh)
  totals, per_client, sq = jax.vmap(per_shard)(*split)
  ones = jnp.ones((shards,))
  total = jax.tree.map(lambda t: jnp.tensordot(ones.astype(t.dtype), t, axes=1), totals)
  merge = lambda x: x.reshape((num_clients,) + x.shape[2:])
  return replicate(total, execution.mesh), jax.tree.map(merge, per_client), merge(sq)
