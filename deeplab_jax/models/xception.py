"""Modified aligned Xception (SPEC section 2): xception_41, xception_65, xception_71."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from deeplab_jax.models import layers

BN = layers.BatchNormConfig(momentum=0.9997, epsilon=1e-3)
INIT = nn.initializers.truncated_normal(0.09)


@dataclasses.dataclass(frozen=True)
class Block:
  name: str
  depths: tuple[int, int, int]
  skip: str  # "conv" | "sum" | "none"
  stride: int
  units: int = 1
  activation_inside: bool = False


def _entry(extra_stride1_units: bool) -> list[Block]:
  if not extra_stride1_units:
    return [Block("entry_flow_block1", (128,) * 3, "conv", 2),
            Block("entry_flow_block2", (256,) * 3, "conv", 2),
            Block("entry_flow_block3", (728,) * 3, "conv", 2)]
  # Xception-71 puts a stride-1 unit before the 256 and the 728 strided units.
  return [Block("entry_flow_block1", (128,) * 3, "conv", 2),
          Block("entry_flow_block2", (256,) * 3, "conv", 1),
          Block("entry_flow_block3", (256,) * 3, "conv", 2),
          Block("entry_flow_block4", (728,) * 3, "conv", 1),
          Block("entry_flow_block5", (728,) * 3, "conv", 2)]


def _blocks(middle_units: int, extra_stride1_units: bool = False) -> list[Block]:
  return _entry(extra_stride1_units) + [
      Block("middle_flow_block1", (728,) * 3, "sum", 1, units=middle_units),
      Block("exit_flow_block1", (728, 1024, 1024), "conv", 2),
      Block("exit_flow_block2", (1536, 1536, 2048), "none", 1, activation_inside=True),
  ]


# name -> (blocks, the block whose unit_1 2nd separable conv is the decoder's low-level feature)
VARIANTS = {
    "xception_41": (_blocks(8), "entry_flow_block2"),
    "xception_65": (_blocks(16), "entry_flow_block2"),
    "xception_71": (_blocks(16, extra_stride1_units=True), "entry_flow_block3"),
}


def scale_depth(depth: int, multiplier: float) -> int:
  """Channel scaling for slim variants (not in the paper); 1.0 leaves the official widths."""
  if multiplier == 1.0:
    return depth
  return max(8, int(depth * multiplier + 4) // 8 * 8)


class XceptionModule(nn.Module):
  """Three separable convs, the third carrying the stride, plus a conv / sum / no skip."""
  depths: Sequence[int]
  skip: str
  stride: int
  rate: int
  unit_rates: Sequence[int] = (1, 1, 1)
  activation_inside: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    residual, low_level = x, None
    for i, depth in enumerate(self.depths):
      residual = layers.SeparableConv(
          depth, 3, stride=self.stride if i == 2 else 1, rate=self.rate * self.unit_rates[i],
          activation_inside=self.activation_inside, bn=BN, depthwise_init=INIT,
          pointwise_init=INIT, dtype=self.dtype, name=f"separable_conv{i + 1}")(residual, train)
      if i == 1:
        low_level = residual  # After the pointwise BN, before the next ReLU.
    if self.skip == "conv":
      shortcut = layers.ConvBN(self.depths[-1], 1, stride=self.stride, bn=BN, kernel_init=INIT,
                               dtype=self.dtype, name="shortcut")(x, train)
      return residual + shortcut, low_level
    if self.skip == "sum":
      return residual + x, low_level
    return residual, low_level


class XceptionBlock(nn.Module):
  """Units of one block, each with its (stride, rate) from the output-stride schedule."""
  depths: Sequence[int]
  skip: str
  schedule: Sequence[tuple[int, int]]
  unit_rates: Sequence[int] = (1, 1, 1)
  activation_inside: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    low_levels = []
    for u, (stride, rate) in enumerate(self.schedule):
      unit = layers.backbone_unit(XceptionModule)(self.depths, self.skip, stride, rate,
                                                  self.unit_rates, self.activation_inside,
                                                  self.dtype, name=f"unit_{u + 1}")
      x, low = unit(x, train)
      low_levels.append(low)
    return x, low_levels[0]


class Xception(layers.Backbone):
  variant: str = "xception_65"

  @nn.compact
  def __call__(self, x, train: bool):
    blocks, low_level_block = VARIANTS[self.variant]
    d = lambda depth: scale_depth(depth, self.depth_multiplier)
    x = layers.ConvBN(d(32), 3, stride=2, activation=nn.relu, bn=BN, kernel_init=INIT,
                      dtype=self.dtype, name="entry_flow_conv1_1")(x, train)
    x = layers.ConvBN(d(64), 3, activation=nn.relu, bn=BN, kernel_init=INIT, dtype=self.dtype,
                      name="entry_flow_conv1_2")(x, train)
    unit_strides = [b.stride for b in blocks for _ in range(b.units)]
    plan = layers.atrous_schedule(unit_strides, self.output_stride, current_stride=2)
    low_level = None
    for block in blocks:
      schedule, plan = tuple(plan[:block.units]), plan[block.units:]
      # multi_grid multiplies the rates of the last block's three convs only.
      unit_rates = tuple(self.multi_grid) if block.activation_inside else (1, 1, 1)
      x, low = XceptionBlock(tuple(d(c) for c in block.depths), block.skip, schedule, unit_rates,
                             block.activation_inside, self.dtype, name=block.name)(x, train)
      if block.name == low_level_block:
        low_level = low  # unit_1's 2nd separable conv, before the strided 3rd.
    return x, low_level
