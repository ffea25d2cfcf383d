"""LeNet-5 (LeCun et al. 1998), the MNIST model of the FDA paper (arXiv 2405.20988).

conv 6@5×5 (same padding on 28×28 inputs) → ReLU → max-pool 2 → conv 16@5×5 → ReLU →
max-pool 2 → dense 120 → ReLU → dense 84 → ReLU → dense `num_classes`. ReLU and max
pooling replace the original's scaled tanh and trainable subsampling, as in the
common modern rendition (61,706 parameters on 28×28×1 inputs with 10 classes).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from fedjax_sync.models.models import Model, _classifier, conv_function


class _LeNet5(nn.Module):
  num_classes: int
  second_padding: str
  fast_cpu_conv: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    if x.ndim == 3:   # [B, H, W] greyscale images get a channel axis
      x = x[..., None]
    conv = conv_function(self.fast_cpu_conv)
    x = nn.relu(nn.Conv(6, (5, 5), padding='SAME', conv_general_dilated=conv)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(16, (5, 5), padding=self.second_padding, conv_general_dilated=conv)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


def lenet5(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, *,
           fast_cpu_conv: bool = True) -> Model:
  """LeNet-5 for `[H, W]` or `[H, W, C]` images.

  The second convolution is 'VALID' (the original 5×5 → 10×10 feature maps on 28×28
  inputs) when the pooled maps are at least 5×5 wide, else 'SAME' (e.g. 8×8 digits).
  `fast_cpu_conv` as in `emnist_cnn`.
  """
  input_shape = tuple(input_shape)
  if len(input_shape) not in (2, 3):
    raise ValueError(f'lenet5 needs [H, W] or [H, W, C] images, got input_shape={input_shape}')
  pooled = min(input_shape[0], input_shape[1]) // 2
  padding = 'VALID' if pooled >= 10 else 'SAME'
  return _classifier(_LeNet5(num_classes, padding, fast_cpu_conv), input_shape, 'lenet5')
