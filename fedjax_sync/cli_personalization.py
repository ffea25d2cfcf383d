"""`--personalize-steps K`: personalization evaluation of any run, from the command line.

At every evaluation the global model is fine-tuned for K local SGD steps on each
client's training examples and evaluated on that client's held-out examples
(`fedjax_sync.simulate.personalization`); rows gain `personalized_accuracy_mean`,
`_var`, `_median`, `_worst_decile`, `personalized_loss_mean` and the same statistics
of the global model (`client_*`). Algorithms with personal models (Ditto, FedPer,
FedRep, APFL, FedBN, ...) start each client from its own model
(`Algorithm.personalize`); K = 0 evaluates those personal models as they are.
Naming: `test_*` and `client_*` always describe the global model, `personalized_*`
the personal or fine-tuned ones. Datasets without per-client
held-out examples need `--personalize-holdout F` (the last fraction F of each
client's training examples is held out; the held-out examples then form the test
set). The hook works on every timeline: it reads the model each runner evaluates.
"""

from __future__ import annotations

FLAGS = ('personalize_steps', 'personalize_learning_rate', 'personalize_holdout')


def requested(args) -> bool:
  return getattr(args, 'personalize_steps', None) is not None


def check_options(args) -> None:
  """One-line errors for personalization flags that cannot apply."""
  if requested(args):
    if getattr(args, 'seeds', None) or getattr(args, 'sweep', None):
      raise ValueError('--personalize-steps does not apply to --seeds/--sweep yet (the '
                       'personalized evaluator is not vmapped over members); valid: one run '
                       'per seed/value with --personalize-steps')
    return
  for dest in FLAGS[1:]:
    if getattr(args, dest, None) is not None:
      flag = '--' + dest.replace('_', '-')
      raise ValueError(f'{flag} applies to --personalize-steps K, which was not given; valid: '
                       f'--personalize-steps K {flag} ...')


def hold_out(args, data):
  """`data` with `--personalize-holdout` applied, or a one-line error when the dataset has
  no per-client held-out examples and no holdout was asked for."""
  from fedjax_sync.simulate.personalization import hold_out_client_test

  fraction = getattr(args, 'personalize_holdout', None)
  if fraction is not None:
    if data.test_client is not None:
      raise ValueError(f'--personalize-holdout {fraction}: --dataset {args.dataset!r} already '
                       'has per-client held-out examples; valid: drop --personalize-holdout')
    return hold_out_client_test(data, fraction)
  if requested(args) and data.test_client is None:
    raise ValueError(f'--personalize-steps needs per-client held-out examples and --dataset '
                     f'{args.dataset!r} has none; valid: --personalize-holdout F (e.g. 0.2: '
                     "the last 20%% of each client's training examples are held out)".replace(
                         '%%', '%'))
  return data


def evaluation_hooks(args, runner, model, data, learning_rate: float,
                     personalize=None) -> list:
  """The driver hooks of `--personalize-steps` for `runner` (empty when not requested)."""
  if not requested(args):
    return []
  import jax

  from fedjax_sync.simulate.personalization import personalized_evaluator

  evaluate = personalized_evaluator(
      model, data, steps=args.personalize_steps,
      learning_rate=(args.personalize_learning_rate if args.personalize_learning_rate
                     is not None else learning_rate),
      batch_size=args.batch_size, personalize=personalize)
  key = jax.random.fold_in(jax.random.key(args.seed), 0x9E5)   # no key the rounds use

  # A synchronous run's own evaluation already reports the global model's `client_*`
  # per client (the same figures): the hook leaves those as they are. Its
  # `personalized_*` figures (fine-tuned for K steps) replace the evaluation's own
  # `personalized_accuracy_*` of an algorithm with personal models (K = 0 there).
  own = {k for k in getattr(runner, 'evaluation_names', ()) if not k.startswith('personalized_')}

  def hook(state, units_done):
    params, client_states = runner.evaluated_model(state)
    out = evaluate(params, jax.random.fold_in(key, units_done),
                   client_states if personalize is not None else ())
    return {k: v for k, v in out.items()
            if k not in ('personalized_accuracy', 'client_accuracy') and k not in own}

  return [hook]
