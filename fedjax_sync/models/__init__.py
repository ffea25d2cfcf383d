"""Small flax models and their losses."""

from fedjax_sync.models.models import (MODELS, Model, emnist_cnn, get_model,
                                       logistic_regression, mlp)

__all__ = ['MODELS', 'Model', 'emnist_cnn', 'get_model', 'logistic_regression', 'mlp']
