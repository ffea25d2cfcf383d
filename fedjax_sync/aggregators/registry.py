"""Aggregators by name, and aggregator expressions parsed without `eval`.

`parse_aggregator('chain(clip_by_norm(1.0), trimmed_mean(0.1))')` builds the same
aggregator as the Python call `chain(clip_by_norm(1.0), trimmed_mean(0.1))`. The
expression is read with `ast` and only this grammar is accepted:

    expr     := CALL
    CALL     := NAME '(' [arg {',' arg}] [',' KEYWORD '=' arg ...] ')'
    arg      := CALL | literal
    literal  := number | -number | string | True | False | None
              | '(' literal, ... ')' | '[' literal, ... ']'

where NAME is a registered aggregator (`aggregator_names()`) and keywords are the
constructor's own parameters. Nothing is evaluated: no attribute access, no
operators, no variables, no lambdas. Errors are one-line `ValueError`s naming the
unknown name or argument and the valid ones.
"""

from __future__ import annotations

import ast
import inspect
import math
from typing import Any, Callable

from fedjax_sync.aggregators.attacks import scale_attack, sign_flip_attack
from fedjax_sync.aggregators.base import Aggregator, chain, mean, validate_aggregator, weighted_mean
from fedjax_sync.aggregators.bulyan import bulyan
from fedjax_sync.aggregators.clip import adaptive_clip, clip_by_norm, zero_invalid_updates
from fedjax_sync.aggregators.compress import random_k, stochastic_quantize, terngrad, top_k
from fedjax_sync.aggregators.dp_ftrl import dp_ftrl
from fedjax_sync.aggregators.harmonize import harmonize
from fedjax_sync.aggregators.kuramoto import kuramoto, kuramoto_code
from fedjax_sync.aggregators.privacy import dp_fedavg
from fedjax_sync.aggregators.reduce import norm_bounded_mean
from fedjax_sync.aggregators.rotation import drive, rotated_quantize
from fedjax_sync.aggregators.robust import (coordinate_median, geometric_median, krum, multi_krum,
                                            trimmed_mean)
from fedjax_sync.aggregators.secure import secure_aggregation

__all__ = ['aggregator_names', 'aggregator_signatures', 'canonical_aggregator_expression',
           'parse_aggregator', 'register_aggregator']

# Expressions longer than this are refused before parsing (deep nesting would
# exhaust the parser's recursion; no real chain comes close).
MAX_EXPRESSION_LENGTH = 4000

_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_aggregator(name: str, constructor: Callable[..., Aggregator]) -> None:
  """Makes `constructor(...) -> Aggregator` available by `name` in expressions."""
  if not name.isidentifier():
    raise ValueError(f'aggregator name {name!r} is not a Python identifier')
  if name in _REGISTRY:
    raise ValueError(f'aggregator {name!r} is already registered')
  if not callable(constructor):
    raise TypeError(f'aggregator {name!r}: constructor must be callable, got '
                    f'{type(constructor).__name__}')
  _REGISTRY[name] = constructor


def aggregator_names() -> list[str]:
  """The names usable in `parse_aggregator` expressions, sorted."""
  return sorted(_REGISTRY)


def aggregator_signatures() -> dict[str, str]:
  """`{name: 'name(arg, ...)'}` with each constructor's parameters and defaults."""
  return {name: f'{name}{_signature_text(_REGISTRY[name])}' for name in aggregator_names()}


def _signature_text(constructor) -> str:
  try:
    signature = inspect.signature(constructor)
  except (TypeError, ValueError):
    return '(...)'
  return str(signature.replace(return_annotation=inspect.Signature.empty,
                               parameters=[p.replace(annotation=inspect.Parameter.empty)
                                           for p in signature.parameters.values()]))


class _Refused(ValueError):
  """An expression outside the grammar (becomes the one-line error)."""


def _syntax(node: ast.AST) -> str:
  try:
    text = ast.unparse(node)
  except Exception:  # noqa: BLE001 - only used to quote the offending part
    text = type(node).__name__
  return text if len(text) <= 60 else text[:59] + '…'


def _literal(node: ast.AST) -> Any:
  """A literal argument, or a nested registered call; anything else is refused."""
  if isinstance(node, ast.Call):
    return _call(node)
  if isinstance(node, ast.Constant):
    value = node.value
    if value is None or isinstance(value, (bool, int, str)):
      return value
    if isinstance(value, float):
      if not math.isfinite(value):
        raise _Refused(f'{_syntax(node)} is not a finite number')
      return value
    raise _Refused(f'{_syntax(node)} ({type(value).__name__}) is not a supported literal; '
                   'valid: numbers, strings, True, False, None, tuples and lists of them')
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    operand = node.operand
    if (isinstance(operand, ast.Constant) and isinstance(operand.value, (int, float))
        and not isinstance(operand.value, bool)):
      value = _literal(operand)
      return -value if isinstance(node.op, ast.USub) else value
    raise _Refused(f'{_syntax(node)}: a sign applies to a number only')
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_literal(element) for element in node.elts)
  if isinstance(node, ast.Attribute):
    raise _Refused(f'attribute access {_syntax(node)} is not allowed; valid: a registered '
                   'aggregator call or a literal')
  if isinstance(node, ast.Name):
    if node.id in _REGISTRY:
      raise _Refused(f'{node.id} must be called: write {node.id}(...)')
    raise _Refused(f'unknown name {node.id!r}; valid: literals or calls of '
                   f'{", ".join(aggregator_names())}')
  if isinstance(node, ast.Lambda):
    raise _Refused(f'lambda is not allowed ({_syntax(node)}); valid: a registered aggregator '
                   'call or a literal')
  raise _Refused(f'{type(node).__name__} syntax is not allowed ({_syntax(node)}); valid: '
                 'numbers, strings, True, False, None, tuples, lists and registered '
                 'aggregator calls')


def _call(node: ast.Call) -> Aggregator:
  if isinstance(node.func, ast.Attribute):
    raise _Refused(f'attribute access {_syntax(node.func)} is not allowed; valid aggregators: '
                   f'{", ".join(aggregator_names())}')
  if not isinstance(node.func, ast.Name):
    raise _Refused(f'{_syntax(node.func)} is not an aggregator name; valid: '
                   f'{", ".join(aggregator_names())}')
  name = node.func.id
  if name not in _REGISTRY:
    raise _Refused(f'unknown aggregator {name!r}; valid: {", ".join(aggregator_names())}')
  constructor = _REGISTRY[name]
  signature = inspect.signature(constructor)
  keywords = [p.name for p in signature.parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  args = []
  for arg in node.args:
    if isinstance(arg, ast.Starred):
      raise _Refused(f'{name}(): *{_syntax(arg.value)} is not allowed; write the arguments out')
    args.append(_literal(arg))
  kwargs = {}
  for keyword in node.keywords:
    if keyword.arg is None:
      raise _Refused(f'{name}(): **{_syntax(keyword.value)} is not allowed; write the keyword '
                     'arguments out')
    if keyword.arg not in keywords:
      raise _Refused(f'{name}() has no argument {keyword.arg!r}; valid: '
                     f'{", ".join(keywords) or "no keyword arguments"}')
    kwargs[keyword.arg] = _literal(keyword.value)
  try:
    signature.bind(*args, **kwargs)
  except TypeError as error:
    raise _Refused(f'{name}(): {error}; signature: {name}{_signature_text(constructor)}'
                   ) from None
  try:
    built = constructor(*args, **kwargs)
  except (ValueError, TypeError) as error:
    raise _Refused(f'{_syntax(node)}: {" ".join(str(error).split())}') from None
  if not isinstance(built, Aggregator):
    raise _Refused(f'{name}(...) built a {type(built).__name__}, not an Aggregator')
  return built


def _tree(expression: str) -> ast.Call:
  if not isinstance(expression, str):
    raise ValueError(f'an aggregator expression must be a string, got '
                     f'{type(expression).__name__}')
  if len(expression) > MAX_EXPRESSION_LENGTH:
    raise ValueError(f'aggregator expression of {len(expression)} characters is too long; '
                     f'valid: at most {MAX_EXPRESSION_LENGTH}')
  try:
    tree = ast.parse(expression.strip(), mode='eval')
  except SyntaxError as error:
    raise ValueError(f'aggregator expression {expression!r} is not valid syntax '
                     f'({error.msg}); valid: e.g. chain(clip_by_norm(1.0), trimmed_mean(0.1))'
                     ) from None
  except (RecursionError, MemoryError):
    raise ValueError('aggregator expression is nested too deeply') from None
  return tree.body


def parse_aggregator(expression: str) -> Aggregator:
  """Builds the aggregator written as `expression` (see the module docstring).

  Example:
    >>> parse_aggregator('chain(clip_by_norm(1.0), trimmed_mean(0.1))')

  Raises:
    ValueError: one line naming the unknown aggregator, the bad argument or
      keyword (with the valid ones), the unsupported syntax, or the constructor's
      own complaint about a value; also when the result does not reduce
      `[C, ...]` to `[...]` (a client transform alone).
  """
  body = _tree(expression)
  if not isinstance(body, ast.Call):
    try:
      _literal(body)   # the most precise message for names, attributes, lambdas
    except _Refused as error:
      raise ValueError(f'aggregator expression {expression!r}: {error}') from None
    raise ValueError(f'aggregator expression {expression!r} is not an aggregator call; '
                     'valid: e.g. weighted_mean() or chain(clip_by_norm(1.0), trimmed_mean(0.1))')
  try:
    aggregator = _call(body)
  except _Refused as error:
    raise ValueError(f'aggregator expression {expression!r}: {error}') from None
  except RecursionError:
    raise ValueError('aggregator expression is nested too deeply') from None
  try:
    return validate_aggregator(aggregator)
  except ValueError as error:
    raise ValueError(f'aggregator expression {expression!r}: {" ".join(str(error).split())}'
                     ) from None


def canonical_aggregator_expression(expression: str) -> str:
  """`expression` validated and re-written in one spacing (`ast.unparse`), so two
  spellings of one aggregator compare equal (config.json, `--resume`)."""
  parse_aggregator(expression)
  return ast.unparse(_tree(expression))


for _constructor in (mean, weighted_mean, coordinate_median, trimmed_mean, krum, multi_krum,
                     geometric_median, norm_bounded_mean, clip_by_norm, adaptive_clip,
                     zero_invalid_updates, stochastic_quantize, top_k, random_k, dp_fedavg,
                     secure_aggregation, harmonize, kuramoto, kuramoto_code, sign_flip_attack,
                     scale_attack, chain, bulyan, rotated_quantize, drive, terngrad, dp_ftrl):
  register_aggregator(_constructor.__name__, _constructor)
del _constructor
