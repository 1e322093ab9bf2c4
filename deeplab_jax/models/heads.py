"""ASPP encoder head, decoder and logits (SPEC sections 5-6), named as the official variable scopes."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from deeplab_jax.models import layers

BN = layers.BatchNormConfig(momentum=0.9997, epsilon=1e-5)
# TF-slim's default initializer for the head's regular convs (no initializer is given there).
REGULAR_INIT = nn.initializers.xavier_uniform()
# The official split_separable_conv2d initializers.
DEPTHWISE_INIT = nn.initializers.truncated_normal(0.33)
POINTWISE_INIT = nn.initializers.truncated_normal(0.06)


def conv3x3(features: int, rate: int, separable: bool, dtype, name: str) -> nn.Module:
  """A 3x3 conv + BN + ReLU: atrous separable (depthwise, BN, ReLU, pointwise, BN, ReLU) or regular."""
  if separable:
    return layers.SeparableConv(features, 3, rate=rate, activation_inside=True, bn=BN,
                                depthwise_init=DEPTHWISE_INIT, pointwise_init=POINTWISE_INIT,
                                dtype=dtype, name=name)
  return layers.ConvBN(features, 3, rate=rate, activation=nn.relu, bn=BN,
                       kernel_init=REGULAR_INIT, dtype=dtype, name=name)


def conv1x1(features: int, dtype, name: str) -> nn.Module:
  return layers.ConvBN(features, 1, activation=nn.relu, bn=BN, kernel_init=REGULAR_INIT,
                       dtype=dtype, name=name)


class ASPP(nn.Module):
  """[image pooling, 1x1, atrous 3x3 at each rate] -> concat -> 1x1 projection -> dropout."""
  atrous_rates: Sequence[int] = (6, 12, 18)
  separable: bool = True
  channels: int = 256
  dropout_rate: float = 0.1  # keep probability 0.9
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, bn_train: bool):
    size = x.shape[1:3]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = conv1x1(self.channels, self.dtype, "image_pooling")(pooled, bn_train)
    branches = [layers.resize_bilinear(pooled, size),
                conv1x1(self.channels, self.dtype, "aspp0")(x, bn_train)]
    for i, rate in enumerate(self.atrous_rates):
      branches.append(conv3x3(self.channels, rate, self.separable, self.dtype,
                              f"aspp{i + 1}")(x, bn_train))
    y = jnp.concatenate([b.astype(self.dtype) for b in branches], axis=-1)
    y = conv1x1(self.channels, self.dtype, "concat_projection")(y, bn_train)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class Decoder(nn.Module):
  """Project the low-level feature to 48, concat with the upsampled encoder output, two 3x3 convs."""
  separable: bool = True
  low_level_channels: int = 48
  channels: int = 256
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, low_level, bn_train: bool):
    low = conv1x1(self.low_level_channels, self.dtype, "feature_projection0")(low_level, bn_train)
    x = layers.resize_bilinear(x, low.shape[1:3]).astype(self.dtype)
    x = jnp.concatenate([x, low], axis=-1)
    for i in range(2):
      x = conv3x3(self.channels, 1, self.separable, self.dtype, f"decoder_conv{i}")(x, bn_train)
    return x


class Logits(nn.Module):
  """1x1 conv with bias, computed in float32 so the loss sees float32 logits."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return layers.ConvBN(self.num_classes, 1, use_bn=False, use_bias=True,
                         kernel_init=nn.initializers.truncated_normal(0.01), dtype=jnp.float32,
                         name="semantic")(x.astype(jnp.float32), False)
