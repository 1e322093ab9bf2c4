"""MobileNetV2 (SPEC section 4) as DeepLab uses it: through layer_18, 320 x depth_multiplier channels."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deeplab_jax.models import layers

BN = layers.BatchNormConfig(momentum=0.9997, epsilon=1e-3)
INIT = nn.initializers.truncated_normal(0.09)

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2 without the 1280 conv.
INVERTED_RESIDUALS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))
LOW_LEVEL_LAYER = 2  # expanded_conv_2 = official 'layer_4'.


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """The slim MobileNet rounding: nearest multiple of `divisor`, never more than 10% below."""
  min_value = min_value or divisor
  new = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new < 0.9 * value:
    new += divisor
  return new


class InvertedResidual(nn.Module):
  """expand 1x1 (ReLU6) -> depthwise 3x3 (ReLU6) -> project 1x1 (linear), residual when shapes match."""
  features: int
  expansion: int
  stride: int = 1
  rate: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda *a, **k: layers.ConvBN(*a, bn=BN, kernel_init=INIT, dtype=self.dtype, **k)
    cin = x.shape[-1]
    # slim: the expansion size rounds the real input width; t=1 keeps the input width and skips the conv.
    inner = cin if self.expansion == 1 else make_divisible(cin * self.expansion)
    y = x
    if inner > cin:
      y = conv(inner, 1, activation=layers.relu6, name="expand")(y, train)
    y = conv(kernel_size=3, stride=self.stride, rate=self.rate, depthwise=True,
             activation=layers.relu6, name="depthwise")(y, train)
    depthwise_output = y
    y = conv(self.features, 1, name="project")(y, train)
    if self.stride == 1 and cin == self.features:
      y = y + x
    return y, depthwise_output


class MobileNetV2(layers.Backbone):
  """MobileNetV2 features and the official decoder end point 'layer_4/depthwise_output'.

  That low-level feature follows BN and ReLU6 (the official code's choice, unlike Xception and ResNet,
  whose end points precede the activation). multi_grid is unused: the official MobileNetV2 has none.
  """

  @nn.compact
  def __call__(self, x, train: bool):
    d = lambda c: make_divisible(c * self.depth_multiplier)
    x = layers.ConvBN(d(32), 3, stride=2, activation=layers.relu6, bn=BN, kernel_init=INIT,
                      dtype=self.dtype, name="conv")(x, train)
    layers_cfg = [(t, c, s if i == 0 else 1) for t, c, n, s in INVERTED_RESIDUALS for i in range(n)]
    plan = layers.atrous_schedule([s for _, _, s in layers_cfg], self.output_stride,
                                  current_stride=2)
    low_level = None
    for i, ((t, c, _), (stride, rate)) in enumerate(zip(layers_cfg, plan)):
      name = "expanded_conv" if i == 0 else f"expanded_conv_{i}"
      unit = layers.backbone_unit(InvertedResidual)(d(c), t, stride, rate, self.dtype, name=name)
      x, depthwise_output = unit(x, train)
      if i == LOW_LEVEL_LAYER:
        low_level = depthwise_output
    return x, low_level
