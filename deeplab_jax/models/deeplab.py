"""DeepLabv3+ (DeepLabv3 with use_decoder=False): backbone -> ASPP -> [decoder] -> logits."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from deeplab_jax.models import heads, layers
from deeplab_jax.models.mobilenet_v2 import MobileNetV2
from deeplab_jax.models.resnet import VARIANTS as RESNET_VARIANTS, ResNet
from deeplab_jax.models.xception import VARIANTS as XCEPTION_VARIANTS, Xception

BACKBONES = tuple(XCEPTION_VARIANTS) + tuple(RESNET_VARIANTS) + ("mobilenet_v2",)


def make_backbone(name: str, output_stride: int, multi_grid, depth_multiplier: float, dtype):
  kwargs = dict(output_stride=output_stride, multi_grid=tuple(multi_grid),
                depth_multiplier=depth_multiplier, dtype=dtype, name="backbone")
  if name in XCEPTION_VARIANTS:
    return Xception(variant=name, **kwargs)
  if name in RESNET_VARIANTS:
    return ResNet(variant=name, **kwargs)
  if name == "mobilenet_v2":
    return MobileNetV2(**kwargs)
  raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


class DeepLab(nn.Module):
  """Images in [0, 255] (any float or uint8 dtype) -> float32 logits at stride 4 (decoder) or OS.

  `output_stride` changes strides and atrous rates only, so one parameter tree serves OS 8, 16 and 32:
  train with one module and evaluate with `model.clone(output_stride=8, atrous_rates=...)`.
  """
  num_classes: int
  backbone: str = "xception_65"
  output_stride: int = 16
  multi_grid: Sequence[int] = (1, 1, 1)
  atrous_rates: Sequence[int] = (6, 12, 18)
  use_decoder: bool = True
  aspp_separable: bool = True
  decoder_separable: bool = True
  depth_multiplier: float = 1.0
  freeze_bn: bool = False
  dtype: layers.Dtype = jnp.float32
  depthwise_impl: str = "grouped"  # see layers.depthwise_conv2d; parameters do not depend on it
  bn_momentum: Optional[float] = None  # None: each network's own (SPEC); see layers.LayerOptions
  remat: bool = False  # recompute backbone units in the backward pass; see layers.backbone_unit
  platform: Optional[str] = None  # the backend the program is for; see layers.LayerOptions
  strided_padding: str = "fixed"  # "same": TF SAME on strided convs; see layers.LayerOptions

  @nn.compact
  def __call__(self, images, train: bool = False):
    with layers.layer_options(layers.LayerOptions(self.depthwise_impl, self.bn_momentum, self.remat,
                                                  self.platform, self.strided_padding)):
      x = (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0).astype(self.dtype)
      bn_train = train and not self.freeze_bn
      features, low_level = make_backbone(self.backbone, self.output_stride, self.multi_grid,
                                          self.depth_multiplier, self.dtype)(x, bn_train)
      x = heads.ASPP(tuple(self.atrous_rates), self.aspp_separable, dtype=self.dtype,
                     name="aspp")(features, train, bn_train)
      if self.use_decoder:
        x = heads.Decoder(self.decoder_separable, dtype=self.dtype, name="decoder")(
            x, low_level, bn_train)
      return heads.Logits(self.num_classes, name="logits")(x)


def upsample_logits(logits, size):
  """Logits to the label or image size with align_corners geometry, in float32."""
  return layers.resize_bilinear(logits.astype(jnp.float32), size)
