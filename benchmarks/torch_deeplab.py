"""The same DeepLabv3+ in PyTorch, as the speed reference for benchmarks/compare_torch.py.

Built from deeplab_jax's own block table and atrous schedule (models/xception.py, layers.py), so the
two cannot drift: same layers, strides, rates, channels, BatchNorm placement and align_corners
resizes, and `parameter_count()` equals the JAX model's. Every 3x3 conv here pads symmetrically by
its rate, which is what the official fixed_padding rule gives for 3x3 kernels at strides 1 and 2.
Only what the benchmark needs: Xception backbones, separable or regular ASPP and decoder.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from deeplab_jax.models import layers, xception


def resize(x: torch.Tensor, size) -> torch.Tensor:
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ConvBN(nn.Sequential):
  def __init__(self, cin, cout, kernel=1, stride=1, rate=1, eps=1e-3, relu=False, depthwise=False):
    padding = rate * (kernel - 1) // 2
    mods = [nn.Conv2d(cin, cout, kernel, stride, padding, rate, groups=cin if depthwise else 1,
                      bias=False), nn.BatchNorm2d(cout, eps=eps)]
    super().__init__(*mods, *([nn.ReLU()] if relu else []))


class SeparableConv(nn.Module):
  """activation_inside=False: ReLU, depthwise, BN, pointwise, BN; True: dw, BN, ReLU, pw, BN, ReLU."""

  def __init__(self, cin, cout, stride=1, rate=1, activation_inside=False, eps=1e-3):
    super().__init__()
    self.pre_relu = not activation_inside
    self.depthwise = ConvBN(cin, cin, 3, stride, rate, eps, relu=activation_inside, depthwise=True)
    self.pointwise = ConvBN(cin, cout, 1, 1, 1, eps, relu=activation_inside)

  def forward(self, x):
    return self.pointwise(self.depthwise(F.relu(x) if self.pre_relu else x))


class XceptionModule(nn.Module):
  def __init__(self, cin, depths, skip, stride, rate, activation_inside):
    super().__init__()
    convs, c = [], cin
    for i, depth in enumerate(depths):
      convs.append(SeparableConv(c, depth, stride if i == 2 else 1, rate, activation_inside))
      c = depth
    self.convs = nn.ModuleList(convs)
    self.skip = skip
    if skip == "conv":
      self.shortcut = nn.Sequential(nn.Conv2d(cin, depths[-1], 1, stride, bias=False),
                                    nn.BatchNorm2d(depths[-1], eps=1e-3))

  def forward(self, x):
    residual, low = x, None
    for i, conv in enumerate(self.convs):
      residual = conv(residual)
      if i == 1:
        low = residual
    if self.skip == "conv":
      return residual + self.shortcut(x), low
    return (residual + x if self.skip == "sum" else residual), low


class Xception(nn.Module):
  def __init__(self, variant="xception_65", output_stride=16):
    super().__init__()
    blocks, self.low_level_block = xception.VARIANTS[variant]
    self.stem = nn.Sequential(ConvBN(3, 32, 3, 2, relu=True), ConvBN(32, 64, 3, relu=True))
    plan = layers.atrous_schedule([b.stride for b in blocks for _ in range(b.units)], output_stride,
                                  current_stride=2)
    units, names, c = [], [], 64
    for block in blocks:
      for u in range(block.units):
        stride, rate = plan.pop(0)
        units.append(XceptionModule(c, block.depths, block.skip, stride, rate, block.activation_inside))
        names.append(block.name if u == 0 else None)
        c = block.depths[-1]
    self.units, self.names, self.channels = nn.ModuleList(units), names, c

  def forward(self, x):
    x, low_level = self.stem(x), None
    for unit, name in zip(self.units, self.names):
      x, low = unit(x)
      if name == self.low_level_block:
        low_level = low
    return x, low_level


def blocks_low_level_channels(variant: str) -> int:
  blocks, name = xception.VARIANTS[variant]
  return next(b.depths[1] for b in blocks if b.name == name)


def conv3x3(cin, cout, rate, separable):
  if separable:
    return SeparableConv(cin, cout, 1, rate, activation_inside=True, eps=1e-5)
  return ConvBN(cin, cout, 3, 1, rate, 1e-5, relu=True)


class DeepLabV3Plus(nn.Module):
  def __init__(self, num_classes=21, variant="xception_65", output_stride=16, atrous_rates=(6, 12, 18),
               aspp_separable=True, decoder_separable=True):
    super().__init__()
    self.backbone = Xception(variant, output_stride)
    c = self.backbone.channels
    self.image_pooling = ConvBN(c, 256, eps=1e-5, relu=True)
    self.aspp0 = ConvBN(c, 256, eps=1e-5, relu=True)
    self.aspp = nn.ModuleList(conv3x3(c, 256, r, aspp_separable) for r in atrous_rates)
    self.projection = ConvBN(256 * (2 + len(atrous_rates)), 256, eps=1e-5, relu=True)
    self.dropout = nn.Dropout(0.1)
    self.feature_projection = ConvBN(blocks_low_level_channels(variant), 48, eps=1e-5, relu=True)
    self.decoder = nn.Sequential(conv3x3(304, 256, 1, decoder_separable),
                                 conv3x3(256, 256, 1, decoder_separable))
    self.logits = nn.Conv2d(256, num_classes, 1)

  def forward(self, images):
    x = images * (2.0 / 255.0) - 1.0
    features, low_level = self.backbone(x)
    size = features.shape[2:]
    pooled = self.image_pooling(features.mean(dim=(2, 3), keepdim=True))
    branches = [resize(pooled, size), self.aspp0(features)] + [b(features) for b in self.aspp]
    x = self.dropout(self.projection(torch.cat(branches, 1)))
    low = self.feature_projection(low_level)
    x = self.decoder(torch.cat([resize(x, low.shape[2:]), low], 1))
    return self.logits(x)


def parameter_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def buffer_count(model: nn.Module) -> int:
  """BatchNorm running means and variances (the counters excluded)."""
  return sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
