"""A Stack Overflow-sized population with the word LSTM: host bytes per client, one round's time.

342,477 clients (TFF's Stack Overflow training population) with heavy-tailed sizes
and GENERATED token data (`fedjax_sync.data.generated_stackoverflow`: Zipf words,
not real text; for scale and timing only), held in the flat `FederatedData` layout
as uint16 tokens. Measured: the build time, host bytes per client, the time to
sample 50 clients without replacement, and FedAvg rounds of 50 clients with Reddi
et al. 2021's word LSTM (vocabulary 10,000 + PAD/BOS/EOS/OOV, embedding 96, LSTM
670, dense 96; `fedjax_sync.models.word_lstm`), `local_steps` steps of batch 16
per client (one compiled round; the first call includes compilation). Run:

    python experiments/stackoverflow_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import numpy as np
import optax

import fedjax_sync as fs
from fedjax_sync import reporting
from fedjax_sync.data.batching import sample_clients
from fedjax_sync.data.stackoverflow import STACKOVERFLOW_CLIENTS, generated_stackoverflow


def run(run_dir: str, *, quick: bool = False, local_steps: int = 2, rounds: int = 2) -> dict:
  num_clients = 20_000 if quick else STACKOVERFLOW_CLIENTS
  clients_per_round = 50
  reporting.prepare_run_dir(run_dir, allow_existing=True)
  t0 = time.perf_counter()
  data = generated_stackoverflow(num_clients, seed=0)
  build_s = time.perf_counter() - t0
  model = fs.models.word_lstm((data.train['x'].shape[1],), data.num_classes,
                              **({'hidden_size': 64} if quick else {}))
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.3))
  config = fs.SimulationConfig(num_rounds=rounds, clients_per_round=clients_per_round,
                               local_work=fs.LocalWork(batch_size=16, steps=local_steps),
                               eval_every=rounds, per_client_eval=False)
  sim = fs.Simulator(algorithm, model, data, config)
  counts = jax.numpy.asarray(data.counts.astype(np.int32))
  sample = jax.jit(lambda k: sample_clients(k, counts, clients_per_round))
  sample(jax.random.key(0)).block_until_ready()
  t0 = time.perf_counter()
  for i in range(20):
    sample(jax.random.key(i + 1)).block_until_ready()
  sample_ms = 1000 * (time.perf_counter() - t0) / 20
  state = sim.init()
  round_s = []
  for r in range(rounds):
    t0 = time.perf_counter()
    state, metrics = sim.run_rounds(state, r, 1)
    jax.block_until_ready(state)
    round_s.append(time.perf_counter() - t0)
  result = {
      'clients': data.num_clients, 'sentences': data.num_examples,
      'sentences_per_client': {'mean': float(data.counts.mean()),
                               'median': float(np.median(data.counts)),
                               'p99': float(np.percentile(data.counts, 99)),
                               'max': int(data.counts.max())},
      'host_bytes_per_client': data.host_bytes_per_client(),
      'build_s': build_s, 'sample_50_ms': sample_ms,
      'round_s_first_incl_compile': round_s[0], 'round_s': round_s[1:],
      'clients_per_round': clients_per_round, 'local_steps': local_steps, 'batch_size': 16,
      'model_parameters': int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
      'train_loss_last_round': float(np.asarray(metrics['train_loss'])[-1]),
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      'data': 'GENERATED tokens (Zipf words), not Stack Overflow text', 'quick': quick}
  reporting.write_config(run_dir, {'study': 'stackoverflow_scale', 'quick': quick,
                                   'local_steps': local_steps, 'rounds': rounds})
  with open(os.path.join(run_dir, 'result.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--run-dir',
                      default=f'runs/stackoverflow_scale-{time.strftime("%Y%m%d-%H%M%S")}')
  parser.add_argument('--local-steps', type=int, default=2)
  args = parser.parse_args()
  print(json.dumps(run(args.run_dir, quick=args.quick, local_steps=args.local_steps), indent=2))
  sys.exit(0)
