"""Official TF DeepLab checkpoints (tensorflow/models research/deeplab, TF1 + slim) onto ours.

The ImageNet backbones (`xception_41/65/71`, `resnet_v1_50_beta`, `resnet_v1_101_beta`,
`mobilenet_v2`) and the model zoo's whole segmentation models, whose head is read from the names the
checkpoint holds: `image_pooling`, `aspp0`, `aspp{i}` (`aspp{i}_depthwise` / `_pointwise` when
separable), `concat_projection`, `decoder/feature_projection0`, `decoder/decoder_conv{i}`, and
`logits/semantic`. Our module names are the official scopes, so the mapping is mostly joins.
"""
from __future__ import annotations

import re

from deeplab_jax.errors import WeightsError
from deeplab_jax.weights import mapping

# The backbone's scope in the checkpoint -> our backbone.
SCOPES = {
    "xception_41": "xception_41", "xception_65": "xception_65", "xception_71": "xception_71",
    "resnet_v1_50": "resnet_50_beta", "resnet_v1_101": "resnet_101_beta",
    "MobilenetV2": "mobilenet_v2",
}
# --arch spellings: the official model_variant names and ours.
ARCHS = {"xception_41": "xception_41", "xception_65": "xception_65", "xception_71": "xception_71",
         "resnet_v1_50_beta": "resnet_50_beta", "resnet_v1_101_beta": "resnet_101_beta",
         "mobilenet_v2": "mobilenet_v2", "resnet_50_beta": "resnet_50_beta",
         "resnet_101_beta": "resnet_101_beta"}

_TRAINING_STATE = re.compile(r"(^global_step$|/Momentum(_\d+)?$|/ExponentialMovingAverage$|"
                             r"^beta\d_power)")
_CLASSIFIERS = re.compile(r"^(xception_\d+/logits/|resnet_v1_\d+/logits/|MobilenetV2/Conv_1/|"
                          r"MobilenetV2/Logits/|MobilenetV2/AuxLogits/)")


def _ignorable(key: str) -> bool:
  """Optimizer slots, step counters and the ImageNet classifiers DeepLab drops."""
  return bool(_TRAINING_STATE.search(key) or _CLASSIFIERS.search(key))


FORMAT = mapping.Format(
    name="tf_deeplab",
    bn_leaves={"bn/scale": "gamma", "bn/bias": "beta", "bn/mean": "moving_mean",
               "bn/var": "moving_variance"},
    conv_layout=mapping.tf_conv, depthwise_layout=mapping.tf_depthwise,
    ignorable=_ignorable)


def detect(source: dict) -> dict:
  """What the checkpoint holds: {backbone, scope, depth_multiplier, head: None or the DeepLab
  fields its names imply}. One line if it is no DeepLab checkpoint."""
  scopes = {k.split("/")[0] for k in source}
  found = [s for s in SCOPES if s in scopes]
  if len(found) != 1:
    first = sorted(source)[:1]
    raise WeightsError(f"the checkpoint holds no single official DeepLab backbone scope (one of "
                       f"{', '.join(SCOPES)}; its first variable is {first[0] if first else 'none'})")
  scope = found[0]
  backbone = SCOPES[scope]
  if backbone.startswith("resnet") and f"{scope}/conv1/weights" in source:
    raise WeightsError(f"the checkpoint holds slim's original {scope} (a 7x7 stem, strides on the last "
                       f"unit), which no backbone here has; use {scope}_beta weights (3x3 stem)")
  depth_multiplier = 1.0
  if backbone == "mobilenet_v2":
    last = source.get("MobilenetV2/expanded_conv_16/project/weights")
    if last is None:
      raise WeightsError("the MobileNetV2 checkpoint lacks MobilenetV2/expanded_conv_16/project/"
                         "weights: it is incomplete or another MobileNet")
    depth_multiplier = round(last.shape[-1] / 320, 2)
  info = {"backbone": backbone, "scope": scope, "depth_multiplier": depth_multiplier, "head": None}
  if "concat_projection/weights" in source:
    rates = 0
    while f"aspp{rates + 1}/weights" in source or f"aspp{rates + 1}_depthwise/depthwise_weights" in source:
      rates += 1
    logits = source.get("logits/semantic/weights")
    info["head"] = {
        "atrous_rate_count": rates,
        "aspp_separable": "aspp1_depthwise/depthwise_weights" in source,
        "use_decoder": "decoder/feature_projection0/weights" in source,
        "decoder_separable": "decoder/decoder_conv0_depthwise/depthwise_weights" in source,
        "num_classes": None if logits is None else int(logits.shape[-1]),
    }
  return info


def _split(path_part: str) -> str:
  """Our Xception block name -> the official scope: entry_flow_block1 -> entry_flow/block1."""
  flow, block = path_part.rsplit("_", 1)
  return f"{flow}/{block}"


def names_for(backbone: str, scope: str):
  def names(module):
    head = _head_names(module)
    if head is not None:
      return head
    return _backbone_names(backbone, scope, module[1:])
  return names


def _conv(prefix: str, depthwise: bool = False, bias: bool = False) -> mapping.ConvNames:
  return mapping.ConvNames(prefix + ("/depthwise_weights" if depthwise else "/weights"),
                           None if bias else prefix + "/BatchNorm/",
                           prefix + "/biases" if bias else None)


def _backbone_names(backbone: str, scope: str, module) -> mapping.ConvNames:
  if backbone.startswith("xception"):
    if module[0].startswith("entry_flow_conv"):
      return _conv(f"{scope}/entry_flow/{module[0][len('entry_flow_'):]}")
    block, unit, *part = module
    p = f"{scope}/{_split(block)}/{unit}/xception_module"
    if part == ["shortcut"]:
      return _conv(p + "/shortcut")
    separable, kind = part
    return _conv(f"{p}/{separable}_{kind}", depthwise=kind == "depthwise")
  if backbone.startswith("resnet"):
    if len(module) == 1:  # conv1_1, conv1_2, conv1_3
      return _conv(f"{scope}/{module[0]}")
    block, unit, conv = module
    return _conv(f"{scope}/{block}/{unit}/bottleneck_v1/{conv}")
  if module == ("conv",):
    return _conv("MobilenetV2/Conv")
  layer, part = module
  return _conv(f"MobilenetV2/{layer}/{part}", depthwise=part == "depthwise")


def _head_names(module) -> mapping.ConvNames | None:
  part, *rest = module
  if part == "logits":
    return _conv("logits/semantic", bias=True)
  if part == "aspp":
    if len(rest) == 2:  # a separable branch: aspp1/depthwise -> aspp1_depthwise
      return _conv(f"{rest[0]}_{rest[1]}", depthwise=rest[1] == "depthwise")
    return _conv(rest[0])
  if part == "decoder":
    if len(rest) == 2:
      return _conv(f"decoder/{rest[0]}_{rest[1]}", depthwise=rest[1] == "depthwise")
    return _conv(f"decoder/{rest[0]}")
  return None
