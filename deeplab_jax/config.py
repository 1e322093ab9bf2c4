"""The config schema every `configs/*.py` starts from, and its validation.

Configs override a few fields of `default_config()`; `validate` turns a wrong value into a one-line
`ConfigError` that names the field and the fix.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

BACKBONE_NAMES = ("xception_41", "xception_65", "xception_71", "resnet_50_beta", "resnet_101_beta",
                  "resnet_50", "resnet_101", "mobilenet_v2")
OUTPUT_STRIDES = (8, 16, 32)
DTYPES = ("float32", "bfloat16")
# ASPP rates at output stride 16 (SPEC section 5); other strides scale them by 16 / OS.
ATROUS_RATES_AT_OS16 = (6, 12, 18)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.backbone = "xception_65"
  config.model.output_stride = 16
  config.model.multi_grid = (1, 1, 1)
  # Rates at `output_stride`; None derives them: (6, 12, 18) at OS16, (12, 24, 36) at OS8, (3, 6, 9)
  # at OS32. An empty tuple keeps only the image-pooling and 1x1 branches (official MobileNetV2 head).
  config.model.atrous_rates = config_dict.placeholder(tuple)
  config.model.use_decoder = True
  config.model.aspp_separable = True
  config.model.decoder_separable = True
  config.model.depth_multiplier = 1.0
  config.model.dtype = "float32"
  config.model.freeze_bn = False

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "voc2012_segmentation"
  config.dataset.num_classes = 21
  config.dataset.ignore_label = 255
  return config


def atrous_rates(model_config, output_stride: int | None = None) -> tuple[int, ...]:
  """ASPP rates for `output_stride` (default: the config's own), scaling configured rates by OS."""
  train_os = model_config.output_stride
  output_stride = output_stride or train_os
  if model_config.atrous_rates is None:
    base, base_os = ATROUS_RATES_AT_OS16, 16
  else:
    base, base_os = tuple(model_config.atrous_rates), train_os
  rates = []
  for r in base:
    scaled = r * base_os / output_stride
    if scaled != int(scaled) or scaled < 1:
      raise ConfigError(f"config.model.atrous_rates={tuple(base)} at output stride {base_os} do not "
                        f"scale to whole rates at output stride {output_stride}; set rates that do")
    rates.append(int(scaled))
  return tuple(rates)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError on the first model/dataset value that cannot work."""
  m = config.model
  if m.backbone not in BACKBONE_NAMES:
    raise ConfigError(f"config.model.backbone={m.backbone!r} is not a backbone; choose one of "
                      f"{', '.join(BACKBONE_NAMES)}")
  if m.output_stride not in OUTPUT_STRIDES:
    raise ConfigError(f"config.model.output_stride={m.output_stride} is not supported; use 8, 16 or 32")
  if len(tuple(m.multi_grid)) != 3 or any(int(r) < 1 for r in m.multi_grid):
    raise ConfigError(f"config.model.multi_grid={tuple(m.multi_grid)} must be 3 positive rates, "
                      f"e.g. (1, 2, 4)")
  if m.atrous_rates is not None and any(int(r) < 1 for r in m.atrous_rates):
    raise ConfigError(f"config.model.atrous_rates={tuple(m.atrous_rates)} must be positive integers")
  if m.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={m.dtype!r} is not supported; use 'float32' or 'bfloat16'")
  if not m.depth_multiplier > 0:
    raise ConfigError(f"config.model.depth_multiplier={m.depth_multiplier} must be > 0 (1.0 = paper)")
  if int(config.dataset.num_classes) < 1:
    raise ConfigError(f"config.dataset.num_classes={config.dataset.num_classes} must be >= 1")
