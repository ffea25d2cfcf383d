"""Pytree arithmetic, including reductions over the leading client axis `[C, ...]`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sync.types import PyTree


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(tree: PyTree, scalar) -> PyTree:
  return jax.tree.map(lambda x: x * jnp.asarray(scalar, x.dtype), tree)


def tree_zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """Inner product of two pytrees of equal structure (a scalar)."""
  parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y).real, a, b))
  return sum(parts[1:], parts[0]) if parts else jnp.zeros(())


def tree_sq_norm(tree: PyTree) -> jax.Array:
  return tree_dot(tree, tree)


def tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(tree_sq_norm(tree))


def tree_size(tree: PyTree) -> int:
  """Number of scalars in a pytree (static)."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def tree_num_bytes(tree: PyTree) -> int:
  """Number of bytes of a pytree's leaves (static)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _broadcast_weights(weights: jax.Array, leaf: jax.Array) -> jax.Array:
  return weights.reshape(weights.shape + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def client_weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  """`Σ_c weights[c] · stacked[c]` for every leaf `[C, ...]` → `[...]`."""
  # A contraction, not `sum(w * x, axis=0)`: XLA:CPU reduces over a leading (major)
  # axis ~100× slower than a dot (0.5 s vs 3 ms for [100, 784, 200]).
  return jax.tree.map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1,
                              precision=jax.lax.Precision.HIGHEST), stacked)


def client_scale(stacked: PyTree, scales: jax.Array) -> PyTree:
  """Multiplies client c's slice of every leaf `[C, ...]` by `scales[c]`."""
  return jax.tree.map(lambda x: _broadcast_weights(scales, x) * x, stacked)


def client_where(keep: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per client: `new[c]` where `keep[c]`, else `old[c]` (leaves `[C, ...]`)."""
  return jax.tree.map(
      lambda n, o: jnp.where(keep.reshape(keep.shape + (1,) * (n.ndim - 1)), n, o),
      new, old)


def client_sq_norms(stacked: PyTree) -> jax.Array:
  """`[C]` squared global norms of each client's slice."""
  parts = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
           for x in jax.tree.leaves(stacked)]
  return sum(parts[1:], parts[0])


def client_gram(stacked: PyTree) -> jax.Array:
  """`[C, C]` matrix of inner products between clients' slices."""
  parts = []
  for x in jax.tree.leaves(stacked):
    flat = x.reshape(x.shape[0], -1)
    parts.append(flat @ flat.T)
  return sum(parts[1:], parts[0])


def client_flatten(stacked: PyTree) -> jax.Array:
  """Concatenates every leaf `[C, ...]` into one `[C, d]` matrix."""
  return jnp.concatenate(
      [x.reshape(x.shape[0], -1) for x in jax.tree.leaves(stacked)], axis=1)


def client_unflatten(flat: jax.Array, like: PyTree) -> PyTree:
  """Inverse of `client_flatten` for a `[d]` or `[C, d]` matrix; `like` is `[...]`-shaped."""
  leaves, treedef = jax.tree.flatten(like)
  lead = flat.shape[:-1]
  out, start = [], 0
  for leaf in leaves:
    out.append(flat[..., start:start + leaf.size].reshape(lead + leaf.shape).astype(leaf.dtype))
    start += leaf.size
  return jax.tree.unflatten(treedef, out)


def gather_clients(per_client: PyTree, client_ids: jax.Array) -> PyTree:
  """Gathers rows `client_ids` of per-client state with leaves `[N, ...]`."""
  return jax.tree.map(lambda x: x[client_ids], per_client)


def scatter_clients(per_client: PyTree, client_ids: jax.Array, values: PyTree,
                    keep: jax.Array) -> PyTree:
  """Writes `values[c]` into row `client_ids[c]` for every client with `keep[c]`.

  Clients with `keep[c] == False` (absent or zero-weight) are dropped, so padding
  that repeats a real client's id never overwrites that client's state.
  """
  num = jax.tree.leaves(per_client)[0].shape[0] if jax.tree.leaves(per_client) else 0
  index = jnp.where(keep, client_ids, num)
  return jax.tree.map(lambda x, v: x.at[index].set(v.astype(x.dtype), mode='drop'),
                      per_client, values)
