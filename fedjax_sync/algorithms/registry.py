"""Algorithms by name, each with its own hyperparameters, for the CLI and experiments.

Every registered algorithm declares the hyperparameters it uses (`Hyperparameter`:
name, type, default, short help, valid range or choices). The values travel in
one shared `Hyperparameters` dataclass (unused fields are ignored), so
`build_algorithm(name, loss, Hyperparameters(client_learning_rate=0.1))` and
`Sweep` keep one calling convention; `resolve_hyperparameters` checks and types
user overrides (`--hparam KEY=VALUE`) against the chosen algorithm's list.

Example:
  >>> [h.name for h in algorithm_hyperparameters('fedprox')]
  ['client_learning_rate', 'client_momentum', 'server_learning_rate', 'mu']
  >>> h = resolve_hyperparameters('fedprox', overrides={'mu': '0.1'})
  >>> algorithm = build_algorithm('fedprox', model.loss, h, num_clients=100)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import optax

from fedjax_sync.algorithms.fed_avg import fed_avg, fed_avg_m, fed_prox
from fedjax_sync.algorithms.fed_opt import fed_adagrad, fed_adam, fed_yogi
from fedjax_sync.algorithms.fed_qs import FedQSHyperparameters
from fedjax_sync.algorithms.fed_sgd import fed_sgd
from fedjax_sync.types import Algorithm

_FEDQS = FedQSHyperparameters()


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """Hyperparameters shared by the registered algorithms (unused ones are ignored).

  `server_learning_rate=None` takes each algorithm's default: 1.0 for FedAvg,
  FedAvgM and FedProx, 0.1 for FedSGD, 0.01 for FedAdam/FedYogi/FedAdagrad
  (`algorithm_hyperparameters(name)` lists each algorithm's fields and defaults).
  """

  client_learning_rate: float = 0.01
  client_momentum: float = 0.0
  server_learning_rate: float | None = None
  server_momentum: float = 0.9
  mu: float = 0.01
  tau: float = 1e-3
  b1: float = 0.9
  b2: float = 0.99
  # Client-drift methods (fedjax_sync.algorithms.scaffold/fed_sam/kuramoto).
  scaffold_option: str = 'II'
  sam_rho: float = 0.05
  sagm_alpha: float = 0.001
  kappa: float = 0.005
  kappa_decay: float = 1.0
  # Semi-asynchronous timeline (fedjax_sync.algorithms.fed_buff/fed_qs, simulate.semi_async).
  buffer_size: int | None = None   # each algorithm's own: FedAsync 1, FedBuff and FedQS 10
  max_staleness: int = 32
  restart: str = 'new_model'
  staleness_exponent: float = 0.5
  example_weighted: bool = False
  mixing: float = 0.6
  # FedQS's constants default to the paper's (`FedQSHyperparameters`), not copies of them.
  fedqs_adjust_rate: float = _FEDQS.adjust_rate
  fedqs_max_factor: float = _FEDQS.max_factor
  fedqs_min_learning_rate: float = _FEDQS.min_learning_rate
  fedqs_max_learning_rate: float = _FEDQS.max_learning_rate
  fedqs_momentum_base: float = _FEDQS.momentum_base
  fedqs_momentum_speed: float = _FEDQS.momentum_speed
  fedqs_momentum_cap: float = _FEDQS.momentum_cap
  fedqs_feedback_base: float = _FEDQS.feedback_base
  # Personalized and clustered methods (fedjax_sync.algorithms.apfl/pfedme/per_fed_avg/ifca/
  # hypcluster; their Hyperparameter entries live in those modules).
  apfl_alpha: float = 0.25
  apfl_adaptive_alpha: bool = False
  pfedme_lambda: float = 15.0
  pfedme_inner_steps: int = 5
  pfedme_personal_learning_rate: float = 0.05
  perfedavg_alpha: float = 0.01
  perfedavg_variant: str = 'fo'
  num_clusters: int = 2
  cluster_init_scale: float = 1.0
  # Dynamic-averaging timeline (fedjax_sync.algorithms.fda, simulate.averaging).
  num_workers: int = 5
  threshold: float = 0.5
  estimator: str = 'linear'
  sync_period: int = 10
  weighting: str = 'plain'
  reset_optimizer_on_sync: bool = False
  # Personalization (fedjax_sync.algorithms.ditto/fed_per/fed_rep).
  ditto_lambda: float = 0.1
  head_pattern: str = ''           # FedPer/FedRep personal layers (regex on the path; '': output)
  head_epochs: int = 10            # FedRep τ_h: passes training the head before the body
  # Fairness and client drift (fedjax_sync.algorithms.q_ffl/afl/fed_dyn; fednova, mime and
  # mimelite read the client and server fields above).
  q: float = 1.0
  domain_learning_rate: float = 0.1
  feddyn_alpha: float = 0.01

  def client_optimizer(self) -> optax.GradientTransformation:
    if self.client_momentum:
      return optax.sgd(self.client_learning_rate, momentum=self.client_momentum)
    return optax.sgd(self.client_learning_rate)


_TYPE_NAMES = {bool: 'bool', int: 'int', float: 'float', str: 'str'}
_TRUE, _FALSE = ('true', 'yes', '1'), ('false', 'no', '0')


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """One hyperparameter of an algorithm: a field of `Hyperparameters`, typed and checked.

  Attributes:
    name: the `Hyperparameters` field (and the `--hparam` key).
    type: bool, int, float or str.
    default: the algorithm's default value.
    help: a short description (symbol of the paper where it has one).
    choices: the valid values of a str hyperparameter (empty: any).
    minimum, maximum: bounds of a number (None: unbounded).
    exclusive_minimum, exclusive_maximum: whether the bounds themselves are excluded.
  """

  name: str
  type: type
  default: Any
  help: str
  choices: tuple = ()
  minimum: float | None = None
  maximum: float | None = None
  exclusive_minimum: bool = False
  exclusive_maximum: bool = False

  def __post_init__(self):
    if self.type not in _TYPE_NAMES:
      raise ValueError(f'hyperparameter {self.name!r}: type must be one of bool, int, float, '
                       f'str, got {self.type!r}')
    if self.default is not None:
      self.check(self.default)

  def expected(self) -> str:
    """The valid values in words: 'float > 0', 'one of I, II', 'int in [1, 10]', ..."""
    if self.choices:
      return 'one of ' + ', '.join(map(str, self.choices))
    text = _TYPE_NAMES[self.type]
    if self.type is bool:
      return text + ' (true or false)'
    low, high = self.minimum, self.maximum
    if low is not None and high is not None:
      return (f'{text} in {"(" if self.exclusive_minimum else "["}{low:g}, {high:g}'
              f'{")" if self.exclusive_maximum else "]"}')
    if low is not None:
      return f'{text} {">" if self.exclusive_minimum else "≥"} {low:g}'
    if high is not None:
      return f'{text} {"<" if self.exclusive_maximum else "≤"} {high:g}'
    return text

  def _bad(self, value) -> ValueError:
    return ValueError(f'hyperparameter {self.name} = {value!r} is not valid; expected '
                      f'{self.expected()}')

  def check(self, value) -> Any:
    """`value` if it is valid for this hyperparameter (ints accepted as floats), else ValueError."""
    if self.type is bool:
      if not isinstance(value, bool):
        raise self._bad(value)
      return value
    if self.type is str:
      if not isinstance(value, str) or (self.choices and value not in self.choices):
        raise self._bad(value)
      return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise self._bad(value)
    if self.type is int:
      if not isinstance(value, numbers.Integral):
        raise self._bad(value)
      value = int(value)
    if self.type is float:
      value = float(value)
      if not math.isfinite(value):
        raise self._bad(value)
    low, high = self.minimum, self.maximum
    if low is not None and (value < low or (self.exclusive_minimum and value == low)):
      raise self._bad(value)
    if high is not None and (value > high or (self.exclusive_maximum and value == high)):
      raise self._bad(value)
    if self.choices and value not in self.choices:
      raise self._bad(value)
    return value

  def parse(self, text: str) -> Any:
    """The typed value of `text` (a `--hparam` value), checked; ValueError naming the key."""
    text = text.strip()
    if self.type is bool:
      if text.lower() in _TRUE:
        return True
      if text.lower() in _FALSE:
        return False
      raise self._bad(text)
    if self.type is str:
      return self.check(text)
    try:
      value = int(text) if self.type is int else float(text)
    except ValueError:
      raise self._bad(text) from None
    return self.check(value)


_FIELDS = tuple(f.name for f in dataclasses.fields(Hyperparameters))

# The shared hyperparameters, named once; algorithms list the ones they use.
CLIENT_LEARNING_RATE = Hyperparameter(
    'client_learning_rate', float, 0.01, 'client SGD learning rate η_l', minimum=0.0,
    exclusive_minimum=True)
CLIENT_MOMENTUM = Hyperparameter(
    'client_momentum', float, 0.0, 'client SGD momentum (0: plain SGD)', minimum=0.0)
SERVER_MOMENTUM = Hyperparameter(
    'server_momentum', float, 0.9, 'server momentum β', minimum=0.0)
MU = Hyperparameter('mu', float, 0.01, 'FedProx proximal weight μ', minimum=0.0)
TAU = Hyperparameter('tau', float, 1e-3, 'adaptivity τ (added to √v)', minimum=0.0,
                     exclusive_minimum=True)
B1 = Hyperparameter('b1', float, 0.9, 'first-moment decay β1', minimum=0.0, maximum=1.0)
B2 = Hyperparameter('b2', float, 0.99, 'second-moment decay β2', minimum=0.0, maximum=1.0)
SCAFFOLD_OPTION = Hyperparameter(
    'scaffold_option', str, 'II', 'control variate update: I (extra gradient pass) or II '
    '(from the model difference)', choices=('I', 'II'))
SAM_RHO = Hyperparameter('sam_rho', float, 0.05, 'SAM perturbation radius ρ', minimum=0.0,
                         exclusive_minimum=True)
SAGM_ALPHA = Hyperparameter('sagm_alpha', float, 0.001, 'SAGM gradient-matching weight α',
                            minimum=0.0)
KAPPA = Hyperparameter('kappa', float, 0.005, 'coupling strength κ0', minimum=0.0,
                       exclusive_minimum=True)
KAPPA_DECAY = Hyperparameter('kappa_decay', float, 1.0, 'coupling schedule κ_t = κ0 · decay^t',
                             minimum=0.0, exclusive_minimum=True)
# Fairness and client drift (q-FFL, AFL, FedDyn).
Q_FAIRNESS = Hyperparameter('q', float, 1.0, 'q-FFL fairness exponent q (0: mean of local models)',
                            minimum=0.0)
DOMAIN_LEARNING_RATE = Hyperparameter(
    'domain_learning_rate', float, 0.1, 'AFL step size γ_λ of the domain-weight ascent',
    minimum=0.0)
FEDDYN_ALPHA = Hyperparameter('feddyn_alpha', float, 0.01, 'FedDyn regularization α',
                              minimum=0.0, exclusive_minimum=True)


def server_learning_rate(default: float | None) -> Hyperparameter:
  """The server learning rate η_g with this algorithm's default (None: the builder's own)."""
  return Hyperparameter('server_learning_rate', float, default, 'server learning rate η_g',
                        minimum=0.0, exclusive_minimum=True)


# Every field of `Hyperparameters`, with its defaults (the server learning rate: the builder's).
ALL_SHARED = (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, server_learning_rate(None), SERVER_MOMENTUM,
              MU, TAU, B1, B2, SCAFFOLD_OPTION, SAM_RHO, SAGM_ALPHA, KAPPA, KAPPA_DECAY)


def client_and_server(server_default: float = 1.0) -> tuple[Hyperparameter, ...]:
  """The hyperparameters of client SGD and a server learning rate (FedAvg's three)."""
  return (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, server_learning_rate(server_default))


Builder = Callable[..., Algorithm]


# How simulated time advances for an algorithm, i.e. which driver runs what it builds:
# synchronous rounds (`Algorithm`, `Simulator`), semi-asynchronous aggregations
# (`AsyncAlgorithm`, `SemiAsyncSimulator`), dynamic averaging (`AveragingAlgorithm`,
# `run_averaging`).
SYNCHRONOUS, SEMI_ASYNC, AVERAGING = 'synchronous', 'semi_async', 'averaging'
TIMELINES = (SYNCHRONOUS, SEMI_ASYNC, AVERAGING)


@dataclasses.dataclass(frozen=True)
class _Entry:
  builder: Builder
  description: str
  hyperparameters: tuple[Hyperparameter, ...]
  timeline: str = SYNCHRONOUS


_REGISTRY: dict[str, _Entry] = {}


def register_algorithm(name: str, builder: Builder, description: str,
                       hyperparameters: Sequence[Hyperparameter] | None = None,
                       timeline: str = SYNCHRONOUS) -> None:
  """Registers `builder(loss_fn, hparams: Hyperparameters, **engine_kwargs) -> Algorithm`.

  Args:
    name: the registry name (`--algorithm NAME`).
    builder: reads its values from the `Hyperparameters` it is given.
    description: one line naming the method and its paper (author, year, arXiv id).
    hyperparameters: the fields of `Hyperparameters` the builder reads, with this
      algorithm's defaults. A field the builder reads must be listed: `--hparam`
      refuses every other key. A new kind of hyperparameter is a new field of
      `Hyperparameters`. None lists every field (for builders registered before
      lists existed; prefer an explicit list).
    timeline: 'synchronous' (the builder returns an `Algorithm` for `Simulator`),
      'semi_async' (an `AsyncAlgorithm` for `SemiAsyncSimulator`) or 'averaging'
      (an `AveragingAlgorithm` for `run_averaging`).
  """
  if name in _REGISTRY:
    raise ValueError(f'algorithm {name!r} is already registered')
  if timeline not in TIMELINES:
    raise ValueError(f'algorithm {name!r}: unknown timeline {timeline!r}; valid: '
                     f'{", ".join(TIMELINES)}')
  if hyperparameters is None:
    hyperparameters = ALL_SHARED
  hyperparameters = tuple(hyperparameters)
  names = [h.name for h in hyperparameters]
  for h in hyperparameters:
    if not isinstance(h, Hyperparameter):
      raise TypeError(f'algorithm {name!r}: hyperparameters must be Hyperparameter entries, got '
                      f'{type(h).__name__}')
    if h.name not in _FIELDS:
      raise ValueError(f'algorithm {name!r}: hyperparameter {h.name!r} is not a field of '
                       f'Hyperparameters; valid: {", ".join(_FIELDS)}')
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise ValueError(f'algorithm {name!r}: hyperparameter(s) {", ".join(duplicated)} listed twice')
  _REGISTRY[name] = _Entry(builder, description, hyperparameters, timeline)


def algorithm_names(timeline: str | None = SYNCHRONOUS) -> list[str]:
  """The registered names of one timeline (default: the synchronous algorithms, which
  `Simulator` and `Sweep` run); `timeline=None` names every algorithm."""
  if timeline is not None and timeline not in TIMELINES:
    raise ValueError(f'unknown timeline {timeline!r}; valid: {", ".join(TIMELINES)}')
  return sorted(k for k, v in _REGISTRY.items() if timeline is None or v.timeline == timeline)


def algorithm_descriptions(timeline: str | None = None) -> dict[str, str]:
  """`{name: description}` of every algorithm (or of one timeline); each description
  names the method's paper."""
  return {k: v.description for k, v in sorted(_REGISTRY.items())
          if timeline is None or v.timeline == timeline}


def algorithm_timeline(name: str) -> str:
  """'synchronous', 'semi_async' or 'averaging': the driver that runs algorithm `name`."""
  return _entry(name).timeline


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise ValueError(f'unknown algorithm {name!r}; valid: '
                     f'{", ".join(algorithm_names(None))}')
  return _REGISTRY[name]


def algorithm_hyperparameters(name: str) -> tuple[Hyperparameter, ...]:
  """The hyperparameters algorithm `name` reads, in its listed order, with its defaults."""
  return _entry(name).hyperparameters


def _with_defaults(name: str, hparams: Hyperparameters) -> Hyperparameters:
  """`hparams` with each None field the algorithm reads set to the algorithm's default."""
  filled = {h.name: h.default for h in _entry(name).hyperparameters
            if getattr(hparams, h.name) is None and h.default is not None}
  return dataclasses.replace(hparams, **filled) if filled else hparams


def resolve_hyperparameters(name: str, base: Hyperparameters = Hyperparameters(),
                            overrides: Mapping[str, Any] | None = None) -> Hyperparameters:
  """`base` with `overrides` applied, checked against algorithm `name`'s list.

  Args:
    name: a registered algorithm.
    base: the starting values (e.g. from dedicated command-line flags).
    overrides: `{key: value}`; a str value is parsed with the key's type
      (`'0.1'`, `'true'`, `'II'`), other values are checked as they are.

  Returns:
    The `Hyperparameters` to build with; fields left None (the server learning
    rate) take the algorithm's default, so the result records what runs.

  Raises:
    ValueError: an unknown key (naming the valid ones), or a value of the wrong
      type or out of range (naming the key and the expected type).
  """
  entry = _entry(name)
  specs = {h.name: h for h in entry.hyperparameters}
  values = {}
  for key, value in (overrides or {}).items():
    if key not in specs:
      raise ValueError(f'unknown hyperparameter {key!r} for algorithm {name!r}; valid: '
                       f'{", ".join(specs) or "none"}')
    values[key] = specs[key].parse(value) if isinstance(value, str) else specs[key].check(value)
  return _with_defaults(name, dataclasses.replace(base, **values))


def hyperparameter_values(name: str, hparams: Hyperparameters) -> dict[str, Any]:
  """`{field: value}` of the fields algorithm `name` reads (None filled with its defaults)."""
  hparams = _with_defaults(name, hparams)
  return {h.name: getattr(hparams, h.name) for h in _entry(name).hyperparameters}


def build_algorithm(name: str, loss_fn: Callable, hparams: Hyperparameters = Hyperparameters(),
                    *, timeline: str | None = SYNCHRONOUS, **engine_kwargs) -> Algorithm:
  """Builds a registered algorithm; `engine_kwargs` are e.g. aggregator, execution.

  `timeline` is the kind the caller's driver runs: by default a synchronous
  `Algorithm`; an algorithm of another timeline is a ValueError naming its driver.
  Pass 'semi_async' (`AsyncAlgorithm`), 'averaging' (`AveragingAlgorithm`) or None
  (whatever `algorithm_timeline(name)` says).
  """
  entry = _entry(name)
  if timeline is not None and entry.timeline != timeline:
    drivers = {SYNCHRONOUS: 'Simulator', SEMI_ASYNC: 'SemiAsyncSimulator',
               AVERAGING: 'run_averaging'}
    raise ValueError(f'algorithm {name!r} runs on the {entry.timeline} timeline '
                     f'({drivers[entry.timeline]}), not {timeline}; valid here: '
                     f'{", ".join(algorithm_names(timeline))}')
  return entry.builder(loss_fn, _with_defaults(name, hparams), **engine_kwargs)


def _server_lr(h: Hyperparameters, default: float) -> float:
  return default if h.server_learning_rate is None else h.server_learning_rate


register_algorithm(
    'fedavg', lambda loss, h, **kw: fed_avg(
        loss, h.client_optimizer(), server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw),
    'FedAvg, McMahan et al. 2017 (arXiv 1602.05629)', client_and_server(1.0))
register_algorithm(
    'fedavgm', lambda loss, h, **kw: fed_avg_m(
        loss, h.client_optimizer(), server_learning_rate=_server_lr(h, 1.0),
        server_momentum=h.server_momentum, **kw),
    'FedAvg with server momentum, Hsu et al. 2019 (arXiv 1909.06335)',
    (*client_and_server(1.0), SERVER_MOMENTUM))
register_algorithm(
    'fedprox', lambda loss, h, **kw: fed_prox(
        loss, h.client_optimizer(), mu=h.mu, server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw),
    'FedProx, Li et al. 2020 (arXiv 1812.06127)', (*client_and_server(1.0), MU))
register_algorithm(
    'fedsgd', lambda loss, h, **kw: fed_sgd(
        loss, server_learning_rate=_server_lr(h, 0.1), **kw),
    'FedSGD, McMahan et al. 2017 (arXiv 1602.05629)', (server_learning_rate(0.1),))
for _rule, _builder in (('adam', fed_adam), ('yogi', fed_yogi), ('adagrad', fed_adagrad)):
  register_algorithm(
      f'fed{_rule}', (lambda build: lambda loss, h, **kw: build(
          loss, h.client_optimizer(), server_learning_rate=_server_lr(h, 0.01), b1=h.b1,
          b2=h.b2, tau=h.tau, **kw))(_builder),
      f'Fed{_rule.capitalize()}, Reddi et al. 2021 (arXiv 2003.00295)',
      # Adagrad accumulates squares (no β2).
      (*client_and_server(0.01), B1) + ((B2,) if _rule != 'adagrad' else ()) + (TAU,))
