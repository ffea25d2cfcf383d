"""Small flax models and their losses."""

from fedjax_sync.models.models import (MODELS, Model, emnist_cnn, get_model,
                                       logistic_regression, mlp)
from fedjax_sync.models.conv import loop_friendly_conv
from fedjax_sync.models.flax_adapter import from_flax
from fedjax_sync.models.lenet import lenet5  # noqa: I001  (after models: it builds on it)
from fedjax_sync.models.sequence import (TokenLayout, causal_transformer, char_lstm,
                                         sequence_metrics, sequence_model, word_lstm)

__all__ = ['MODELS', 'Model', 'TokenLayout', 'causal_transformer', 'char_lstm', 'emnist_cnn',
           'from_flax', 'get_model', 'lenet5', 'logistic_regression', 'loop_friendly_conv', 'mlp',
           'sequence_metrics', 'sequence_model', 'word_lstm']
