"""The registered algorithms of the semi-asynchronous and dynamic-averaging timelines.

`fedjax-sync run --algorithm fedbuff` (or `build_algorithm(name, loss, hparams,
timeline=None)`) builds these from the shared `Hyperparameters`, like the
synchronous ones; what they build is an `AsyncAlgorithm` (run by
`SemiAsyncSimulator`) or an `AveragingAlgorithm` (run by `run_averaging`), so they
are registered with their timeline and `build_algorithm` refuses to hand them to a
synchronous driver. Engine settings that the drivers need (the buffer size K, the
staleness bound, the number of workers) are hyperparameters too, so that one
`--hparam` list and `list --algorithm NAME` cover everything the run reads.
"""

from __future__ import annotations

from fedjax_sync.algorithms.fda import (WEIGHTINGS, fda, local_sgd, periodic_fed_adam,
                                        periodic_fed_avg_m)
from fedjax_sync.algorithms.fda_estimators import ESTIMATORS
from fedjax_sync.algorithms.fed_buff import fed_async, fed_buff
from fedjax_sync.algorithms.fed_qs import FedQSHyperparameters, fed_qs
from fedjax_sync.algorithms.registry import (AVERAGING, B1, B2, CLIENT_LEARNING_RATE,
                                             CLIENT_MOMENTUM, SEMI_ASYNC, SERVER_MOMENTUM, TAU,
                                             Hyperparameter, Hyperparameters, register_algorithm,
                                             server_learning_rate)
from fedjax_sync.simulate.semi_async import RESTARTS


def buffer_size(default: int) -> Hyperparameter:
  """K, the updates per server aggregation, with this algorithm's default."""
  return Hyperparameter('buffer_size', int, default, 'K: updates buffered per server '
                        'aggregation (must not exceed --num-clients)', minimum=1)


MAX_STALENESS = Hyperparameter(
    'max_staleness', int, 32, 'updates staler than this (τ > bound) are discarded; the '
    'engine keeps bound + 1 global models', minimum=0)
RESTART = Hyperparameter(
    'restart', str, 'new_model', 'where an aggregated client restarts: new_model (at the '
    'aggregation, from the new model) or current_model (when it uploads, as in FedBuff)',
    choices=RESTARTS)
STALENESS_EXPONENT = Hyperparameter(
    'staleness_exponent', float, 0.5, 'a of the staleness weight s(τ) = (1 + τ)^-a (0: none)',
    minimum=0.0)
EXAMPLE_WEIGHTED = Hyperparameter(
    'example_weighted', bool, False, 'weigh updates by their examples n_i instead of 1/K')
MIXING = Hyperparameter('mixing', float, 0.6, 'FedAsync mixing α of w ← (1 − α s(τ)) w + α s(τ) '
                        'w_new', minimum=0.0, maximum=1.0, exclusive_minimum=True)
_QS = FedQSHyperparameters()
FEDQS = (
    Hyperparameter('fedqs_adjust_rate', float, _QS.adjust_rate, 'a: learning-rate step per job',
                   minimum=0.0),
    Hyperparameter('fedqs_max_factor', float, _QS.max_factor, 'cap of F_i = min(f̄/f_i, cap)',
                   minimum=0.0, exclusive_minimum=True),
    Hyperparameter('fedqs_min_learning_rate', float, _QS.min_learning_rate, 'lower bound of η_i',
                   minimum=0.0, exclusive_minimum=True),
    Hyperparameter('fedqs_max_learning_rate', float, _QS.max_learning_rate, 'upper bound of η_i',
                   minimum=0.0, exclusive_minimum=True),
    Hyperparameter('fedqs_momentum_base', float, _QS.momentum_base, 'base of the momentum m_i',
                   minimum=0.0),
    Hyperparameter('fedqs_momentum_speed', float, _QS.momentum_speed, 'speed of m_i = base + '
                   'min(speed (0.1 θ̄/θ_i − 0.1), cap)', minimum=0.0),
    Hyperparameter('fedqs_momentum_cap', float, _QS.momentum_cap, 'cap of m_i', minimum=0.0),
    Hyperparameter('fedqs_feedback_base', float, _QS.feedback_base, 'base (e/2) of the feedback '
                   'weight', minimum=0.0, exclusive_minimum=True),
)
NUM_WORKERS = Hyperparameter('num_workers', int, 5, 'K workers (clients 0..K−1 of the data; '
                             'must not exceed --num-clients)', minimum=1)
THRESHOLD = Hyperparameter('threshold', float, 0.5, 'Θ: synchronize iff the variance estimate '
                           'exceeds it', minimum=0.0)
ESTIMATOR = Hyperparameter('estimator', str, 'linear', 'variance estimator of the RTC',
                           choices=ESTIMATORS)
SYNC_PERIOD = Hyperparameter('sync_period', int, 10, 'τ: synchronize after every τ-th local step',
                             minimum=1)
WEIGHTING = Hyperparameter('weighting', str, 'plain', 'model average at a sync: plain mean or '
                           'drift (∝ ‖u_k‖²)', choices=WEIGHTINGS)
RESET_OPTIMIZER = Hyperparameter('reset_optimizer_on_sync', bool, False,
                                 "restart the workers' local optimizer states at each sync")

ASYNC_ENGINE = (MAX_STALENESS, RESTART)
AVERAGING_COMMON = (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, NUM_WORKERS, WEIGHTING,
                    RESET_OPTIMIZER)


def _only(kwargs: dict, *keys: str) -> dict:
  """The engine options a builder takes (the CLI passes aggregator, num_clients, execution)."""
  return {k: v for k, v in kwargs.items() if k in keys}


def _fed_qs_constants(h: Hyperparameters) -> FedQSHyperparameters:
  return FedQSHyperparameters(
      learning_rate=h.client_learning_rate, adjust_rate=h.fedqs_adjust_rate,
      max_factor=h.fedqs_max_factor, min_learning_rate=h.fedqs_min_learning_rate,
      max_learning_rate=h.fedqs_max_learning_rate, momentum_base=h.fedqs_momentum_base,
      momentum_speed=h.fedqs_momentum_speed, momentum_cap=h.fedqs_momentum_cap,
      feedback_base=h.fedqs_feedback_base)


def _averaging(h: Hyperparameters, kwargs: dict) -> dict:
  return dict(num_workers=h.num_workers, weighting=h.weighting,
              reset_optimizer_on_sync=h.reset_optimizer_on_sync,
              **_only(kwargs, 'aggregator', 'execution'))


register_algorithm(
    'fedbuff', lambda loss, h, **kw: fed_buff(
        loss, h.client_optimizer(), server_learning_rate=h.server_learning_rate,
        staleness_exponent=h.staleness_exponent, example_weighted=h.example_weighted,
        **_only(kw, 'aggregator', 'num_clients')),
    'FedBuff, buffered asynchronous aggregation, Nguyen et al. 2022 (arXiv 2106.06639)',
    (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, server_learning_rate(1.0), buffer_size(10),
     STALENESS_EXPONENT, EXAMPLE_WEIGHTED, *ASYNC_ENGINE), timeline=SEMI_ASYNC)
register_algorithm(
    'fedasync', lambda loss, h, **kw: fed_async(
        loss, h.client_optimizer(), mixing=h.mixing, staleness_exponent=h.staleness_exponent,
        **_only(kw, 'aggregator', 'num_clients')),
    'FedAsync, asynchronous federated optimization, Xie et al. 2019 (arXiv 1903.03934)',
    (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, buffer_size(1), MIXING, STALENESS_EXPONENT,
     *ASYNC_ENGINE), timeline=SEMI_ASYNC)
for _aggregation in ('sgd', 'avg'):
  register_algorithm(
      f'fedqs_{_aggregation}', (lambda aggregation: lambda loss, h, **kw: fed_qs(
          loss, aggregation=aggregation, num_clients=kw.get('num_clients'),
          hparams=_fed_qs_constants(h), server_learning_rate=h.server_learning_rate,
          **_only(kw, 'aggregator')))(_aggregation),
      f'FedQS-{"SGD" if _aggregation == "sgd" else "Avg"}, semi-asynchronous client '
      'adaptation (NeurIPS 2025, arXiv 2510.07664)',
      (Hyperparameter('client_learning_rate', float, _QS.learning_rate, 'initial client '
                      'learning rate η_0 (the paper\'s), then adapted per client', minimum=0.0,
                      exclusive_minimum=True),)
      + ((server_learning_rate(1.0),) if _aggregation == 'sgd' else ())
      + (buffer_size(10), *FEDQS, *ASYNC_ENGINE), timeline=SEMI_ASYNC)

register_algorithm(
    'fda', lambda loss, h, **kw: fda(
        loss, h.client_optimizer(), threshold=h.threshold, estimator=h.estimator,
        **_averaging(h, kw)),
    'FDA, Federated Dynamic Averaging, Theologitis et al. 2024 (arXiv 2405.20988)',
    (*AVERAGING_COMMON, THRESHOLD, ESTIMATOR), timeline=AVERAGING)
register_algorithm(
    'local_sgd', lambda loss, h, **kw: local_sgd(
        loss, h.client_optimizer(), period=h.sync_period, **_averaging(h, kw)),
    'local SGD: FedAvg of all workers every τ local steps, McMahan et al. 2017 '
    '(arXiv 1602.05629)', (*AVERAGING_COMMON, SYNC_PERIOD), timeline=AVERAGING)
register_algorithm(
    'periodic_fedavgm', lambda loss, h, **kw: periodic_fed_avg_m(
        loss, h.client_optimizer(), period=h.sync_period,
        server_learning_rate=h.server_learning_rate, server_momentum=h.server_momentum,
        **_averaging(h, kw)),
    'FedAvgM of all workers every τ local steps, Hsu et al. 2019 (arXiv 1909.06335)',
    (*AVERAGING_COMMON, SYNC_PERIOD, server_learning_rate(1.0), SERVER_MOMENTUM),
    timeline=AVERAGING)
register_algorithm(
    'periodic_fedadam', lambda loss, h, **kw: periodic_fed_adam(
        loss, h.client_optimizer(), period=h.sync_period,
        server_learning_rate=h.server_learning_rate, b1=h.b1, b2=h.b2, tau=h.tau,
        **_averaging(h, kw)),
    'FedAdam of all workers every τ local steps, Reddi et al. 2021 (arXiv 2003.00295)',
    (*AVERAGING_COMMON, SYNC_PERIOD, server_learning_rate(0.01), B1, B2, TAU),
    timeline=AVERAGING)
