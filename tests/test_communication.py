"""Byte counting against hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import communication as comm


def _logistic_params():
  # 60 × 10 kernel + 10 bias, float32: (600 + 10) · 4 = 2440 bytes.
  return fs.models.logistic_regression((60,), 10).init(jax.random.key(0))


def test_model_bytes_hand_count():
  assert comm.model_bytes(_logistic_params()) == 2440
  mixed = {'a': jnp.zeros((3,), jnp.float16), 'b': jnp.zeros((5,), jnp.int8),
           'c': jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  assert comm.model_bytes(mixed) == 3 * 2 + 5 * 1 + 4 * 4
  assert comm.model_bytes(()) == 0


def test_message_sizes_hand_count():
  assert comm.state_bytes(2) == 8
  assert comm.sketch_bytes(5, 250) == 5000
  assert comm.compressed_bytes(10, value_bits=32, index_bits=32) == 80
  assert comm.compressed_bytes(3, value_bits=4) == 2          # 12 bits round up to 2 bytes
  assert comm.compressed_bytes(610, value_bits=8) == 610
  assert comm.monitoring_bytes(5, 1 + 5 * 250) == 5 * 4 * 1251
  assert comm.full_exchange_bytes(_logistic_params(), 3) == (3 * 2440, 3 * 2440)


def test_averaging_cost_totals():
  cost = comm.averaging_cost(_logistic_params(), num_workers=5, state_floats=2)
  assert cost == comm.CommunicationCost(up_per_step=40, down_per_step=0,
                                        up_per_sync=5 * 2440, down_per_sync=5 * 2440)
  # 100 steps with 2 floats from 5 workers, 3 syncs of 5 models each way.
  assert cost.totals(100, 3) == (100 * 40 + 3 * 12200, 3 * 12200)
  assert cost.total(100, 3) == 100 * 40 + 6 * 12200
  # Exact beyond float32's integer range.
  big = comm.averaging_cost({'w': jax.ShapeDtypeStruct((10**6,), jnp.float32)}, 60)
  assert big.total(0, 10**4) == 2 * 60 * 4 * 10**6 * 10**4


@pytest.mark.parametrize('call', [
    lambda: comm.state_bytes(-1),
    lambda: comm.sketch_bytes(5, 2.5),
    lambda: comm.compressed_bytes(3, value_bits=-8),
    lambda: comm.full_exchange_bytes({}, -2),
    lambda: comm.averaging_cost({}, 0.5),
])
def test_invalid_counts_raise(call):
  with pytest.raises(ValueError, match='non-negative integer'):
    call()


def test_round_metrics_bytes_match_hand_count():
  model = fs.models.logistic_regression((60,), 10)
  params = model.init(jax.random.key(0))
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.1))
  rng = np.random.default_rng(0)
  clients = [{'x': rng.normal(size=(4, 60)).astype(np.float32), 'y': rng.integers(0, 10, 4)}
             for _ in range(3)]
  batch = fs.data.client_batch_from_arrays(clients, batch_size=2)
  # Third client absent (weight 0): two participants.
  batch = batch._replace(weight=batch.weight.at[2].set(0.0))
  _, metrics = jax.jit(algorithm.round)(algorithm.init(params), batch, jax.random.key(1))
  assert float(metrics['bytes_up']) == 2 * 2440
  assert float(metrics['bytes_down']) == 2 * 2440
