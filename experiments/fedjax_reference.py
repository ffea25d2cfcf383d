"""FedJAX's side of the benchmark: one FedAvg round per request, in a separate Python.

Run by `experiments/benchmark.py --fedjax-python PATH` with an interpreter that has
FedJAX 0.0.17 installed (its own jax), never imported by fedjax-sync. Usage:

    PATH/python experiments/fedjax_reference.py WORKLOAD CLIENTS

WORKLOAD is `cnn` (FedJAX's EMNIST CNN, `fedjax.models.emnist.create_conv_model`,
62 classes) or `mlp` (a 784-200-10 ReLU network built with haiku). Each client
holds 100 random examples; FedAvg with client SGD (lr 0.1), batch 20, one epoch,
server SGD (lr 1) — the workload fedjax-sync's benchmark runs. The script prints
`ready` once the round has been compiled (two untimed rounds), then answers each
line `round` on stdin with one line on stdout: the round's wall and process CPU
seconds, measured here around `algorithm.apply` and a block on the new params.
`quit` (or end of input) ends it.
"""

import sys
import time


def _model(workload):
  import fedjax
  import haiku as hk
  import jax
  import jax.numpy as jnp

  if workload == 'cnn':
    return fedjax.models.emnist.create_conv_model(only_digits=False), (28, 28, 1), 62

  def forward(batch):
    x = hk.Flatten()(batch['x'])
    return hk.Linear(10)(jax.nn.relu(hk.Linear(200)(x)))

  def loss(batch, logits):
    return fedjax.metrics.unreduced_cross_entropy_loss(batch['y'], logits)

  sample = {'x': jnp.zeros((1, 784), jnp.float32), 'y': jnp.zeros((1,), jnp.int32)}
  return (fedjax.create_model_from_haiku(hk.transform(forward), sample, loss), (784,), 10)


def main(argv):
  if len(argv) != 3 or argv[1] not in ('cnn', 'mlp') or not argv[2].isdigit():
    print(f'usage: {argv[0]} cnn|mlp CLIENTS', file=sys.stderr)
    return 2
  import fedjax
  import jax
  import numpy as np

  workload, num_clients = argv[1], int(argv[2])
  model, shape, classes = _model(workload)
  rng = np.random.default_rng(0)
  data = {str(i).encode(): {'x': rng.random((100, *shape), dtype=np.float32),
                            'y': rng.integers(0, classes, 100).astype(np.int32)}
          for i in range(num_clients)}
  federated = fedjax.InMemoryFederatedData(data)
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(0.1), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=20, num_epochs=1))
  state = algorithm.init(model.init(jax.random.PRNGKey(0)))
  clients = [(cid, federated.get_client(cid), jax.random.PRNGKey(i))
             for i, cid in enumerate(sorted(data))]

  def one_round(state):
    state, _ = algorithm.apply(state, clients)
    jax.block_until_ready(state.params)
    return state

  for _ in range(2):
    state = one_round(state)
  print(f'ready jax {jax.__version__}', flush=True)
  for line in sys.stdin:
    if line.strip() != 'round':
      break
    start, cpu_start = time.perf_counter(), time.process_time()
    state = one_round(state)
    print(f'{time.perf_counter() - start:.6f} {time.process_time() - cpu_start:.6f}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
