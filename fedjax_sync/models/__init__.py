"""Small flax models and their losses."""

from fedjax_sync.models.models import (MODELS, Model, emnist_cnn, get_model,
                                       logistic_regression, mlp)
from fedjax_sync.models.conv import loop_friendly_conv
from fedjax_sync.models.lenet import lenet5  # noqa: I001  (after models: it builds on it)

__all__ = ['MODELS', 'Model', 'emnist_cnn', 'get_model', 'lenet5', 'logistic_regression',
           'loop_friendly_conv', 'mlp']
