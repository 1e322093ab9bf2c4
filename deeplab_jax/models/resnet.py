"""ResNet v1 backbones (SPEC section 3).

`resnet_*_beta`: DeepLab's 3x3-conv stem, stride on the LAST unit of blocks 1-3, block 4 at stride 1
(TF-slim layout, for official DeepLab checkpoints). `resnet_*`: torchvision/timm layout (7x7 stem, stride
on the FIRST unit of blocks 2-4), for weights from the PyTorch world. Both put the stride on the 3x3 conv.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from deeplab_jax.models import layers
from deeplab_jax.models.xception import scale_depth

# DeepLab's ResNet BatchNorm (feature_extractor.py): decay 0.95, epsilon 1e-5.
BN = layers.BatchNormConfig(momentum=0.95, epsilon=1e-5)
INIT = nn.initializers.he_normal()


@dataclasses.dataclass(frozen=True)
class Variant:
  units: tuple[int, int, int, int]
  beta: bool


VARIANTS = {
    "resnet_50_beta": Variant((3, 4, 6, 3), beta=True),
    "resnet_101_beta": Variant((3, 4, 23, 3), beta=True),
    "resnet_50": Variant((3, 4, 6, 3), beta=False),
    "resnet_101": Variant((3, 4, 23, 3), beta=False),
}
BOTTLENECK_WIDTHS = (64, 128, 256, 512)


def block_strides(variant: Variant) -> list[list[int]]:
  strides = []
  for b, n in enumerate(variant.units):
    if variant.beta:  # Stride 2 on the last unit of blocks 1-3; block 4 keeps stride 1.
      strides.append([1] * (n - 1) + [2 if b < 3 else 1])
    else:  # Stride 2 on the first unit of blocks 2-4.
      strides.append([2 if b > 0 else 1] + [1] * (n - 1))
  return strides


class Bottleneck(nn.Module):
  """1x1, 3x3 (stride, rate), 1x1 + BN; ReLU(residual + shortcut). Also returns the pre-add branch."""
  width: int
  stride: int = 1
  rate: int = 1
  depth_multiplier: float = 1.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    width = scale_depth(self.width, self.depth_multiplier)
    depth = 4 * width
    conv = lambda *a, **k: layers.ConvBN(*a, bn=BN, kernel_init=INIT, dtype=self.dtype, **k)
    if x.shape[-1] != depth:
      shortcut = conv(depth, 1, stride=self.stride, name="shortcut")(x, train)
    else:
      shortcut = x[:, ::self.stride, ::self.stride, :]  # TF's 1x1 max-pool subsample.
    r = conv(width, 1, activation=nn.relu, name="conv1")(x, train)
    r = conv(width, 3, stride=self.stride, rate=self.rate, activation=nn.relu, name="conv2")(r, train)
    r = conv(depth, 1, name="conv3")(r, train)
    return nn.relu(r + shortcut), r


class ResNet(layers.Backbone):
  variant: str = "resnet_101_beta"

  @nn.compact
  def __call__(self, x, train: bool):
    variant = VARIANTS[self.variant]
    d = lambda depth: scale_depth(depth, self.depth_multiplier)
    conv = lambda *a, **k: layers.ConvBN(*a, bn=BN, kernel_init=INIT, activation=nn.relu,
                                         dtype=self.dtype, **k)
    if variant.beta:
      x = conv(d(64), 3, stride=2, name="conv1_1")(x, train)
      x = conv(d(64), 3, name="conv1_2")(x, train)
      x = conv(d(128), 3, name="conv1_3")(x, train)
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")  # TF SAME, as the official code.
    else:
      x = conv(d(64), 7, stride=2, name="conv1")(x, train)
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # PyTorch's padding=1.
    strides = block_strides(variant)
    plan = layers.atrous_schedule([s for b in strides for s in b], self.output_stride,
                                  current_stride=4)
    # Low-level feature: the residual branch of block 1's last stride-1 unit, before add and ReLU
    # (official 'block1/unit_2/bottleneck_v1/conv3'; unit_3 in the torchvision layout).
    low_unit = max(i for i, s in enumerate(strides[0]) if s == 1)
    low_level = None
    for b, units in enumerate(strides):
      schedule, plan = plan[:len(units)], plan[len(units):]
      if b == 3:  # multi_grid multiplies the unit rates of the last block.
        schedule = [(s, r * self.multi_grid[u]) for u, (s, r) in enumerate(schedule)]
      x, branches = ResNetBlock(BOTTLENECK_WIDTHS[b], tuple(schedule), self.depth_multiplier,
                                self.dtype, name=f"block{b + 1}")(x, train)
      if b == 0:
        low_level = branches[low_unit]
    return x, low_level


class ResNetBlock(nn.Module):
  """Bottleneck units named unit_1, unit_2, ... as in the official variable scopes."""
  width: int
  schedule: Sequence[tuple[int, int]]
  depth_multiplier: float = 1.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    branches = []
    for u, (stride, rate) in enumerate(self.schedule):
      unit = layers.backbone_unit(Bottleneck)(self.width, stride, rate, self.depth_multiplier,
                                              self.dtype, name=f"unit_{u + 1}")
      x, branch = unit(x, train)
      branches.append(branch)
    return x, branches
