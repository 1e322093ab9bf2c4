"""DeepLab models: `create_model(config)` builds one from the `config.model` schema."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deeplab_jax import config as config_lib
from deeplab_jax.models.deeplab import BACKBONES, DeepLab, upsample_logits

assert set(BACKBONES) == set(config_lib.BACKBONE_NAMES), "backbone registry and config disagree"


def create_model(config, output_stride: int | None = None, *, platform: str | None = None,
                 num_devices: int | None = None) -> DeepLab:
  """The DeepLab of `config`, optionally at another output stride (same parameters, rescaled rates).

  `platform` and `num_devices` describe where it will run ("cpu", "tpu", "gpu"; default: this
  process's backend and devices): they pick the formulations ("auto" depthwise, the CPU's patch
  matmuls), so a program compiled ahead of time for a TPU is the one the TPU would run.
  """
  config_lib.validate(config)
  m = config.model
  platform = platform or jax.default_backend()
  num_devices = num_devices or jax.device_count()
  output_stride = output_stride or m.output_stride
  if output_stride not in config_lib.OUTPUT_STRIDES:
    raise config_lib.ConfigError(f"output stride {output_stride} is not supported; use 8, 16 or 32")
  return DeepLab(
      num_classes=int(config.dataset.num_classes),
      backbone=m.backbone,
      output_stride=int(output_stride),
      multi_grid=tuple(int(r) for r in m.multi_grid),
      atrous_rates=config_lib.atrous_rates(m, output_stride),
      use_decoder=bool(m.use_decoder),
      aspp_separable=bool(m.aspp_separable),
      decoder_separable=bool(m.decoder_separable),
      depth_multiplier=float(m.depth_multiplier),
      freeze_bn=bool(m.freeze_bn),
      dtype=jnp.dtype(m.dtype),
      depthwise_impl=resolve_depthwise_impl(m.depthwise_impl, platform, num_devices),
      bn_momentum=None if m.get("bn_momentum") is None else float(m.bn_momentum),
      remat=bool(m.get("remat", False)),
      platform=platform,
      strided_padding=m.get("strided_padding", "fixed"),  # workdirs written before it: "fixed"
  )


def resolve_depthwise_impl(impl: str, platform: str | None = None, num_devices: int | None = None) -> str:
  """'auto' picks what measured fastest per backend (benchmarks/README.md).

  CPU: the native kernel on one device (it falls back to "shift" when not built or not float32);
  over several devices "shift", which XLA partitions like any other op. TPU: "shift", whose train
  step the TPU compiler predicts 1.7x faster than the grouped conv's (Xception-65, 513x513, v5e:
  30.9 -> 17.5 GB moved per image; deeplab_jax.aot). GPUs: "grouped", whose cuDNN convolutions the
  GPU compiler counts at 6.5 GB per image against 11.8 for "shift" (H100, bfloat16; not yet timed).
  """
  platform = platform or jax.default_backend()
  num_devices = num_devices or jax.device_count()
  if impl == "native" and platform != "cpu":  # a CPU library: its math, as another program
    return "shift"
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "shift"
  if platform != "cpu":
    return "grouped"
  return "native" if num_devices == 1 else "shift"


__all__ = ["BACKBONES", "DeepLab", "create_model", "resolve_depthwise_impl", "upsample_logits"]
