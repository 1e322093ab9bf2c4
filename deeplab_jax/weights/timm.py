"""timm (and torchvision ResNet) ImageNet backbones onto ours, layer for layer.

Which timm models are ours (checked in tests/test_weights.py against timm's own forward):
- `xception41`, `xception65`, `xception71`: timm's aligned Xception (ported from the TF DeepLab
  weights): the same units, strides, activation order, symmetric padding (equal to our explicit rule
  for 3x3 stride 2) and BN epsilon 1e-3.
- `resnet50`, `resnet101` (timm or torchvision; the same names): our `resnet_50` / `resnet_101`
  (7x7 stem, stride on the first unit's 3x3 conv).
- `mobilenetv2_035` ... `mobilenetv2_140`: our `mobilenet_v2` at that depth multiplier, up to the
  320-channel layer (the 1280 conv and classifier are left out, as DeepLab does).
"""
from __future__ import annotations

from deeplab_jax.models import mobilenet_v2, resnet, xception
from deeplab_jax.weights import mapping

# timm name -> (our backbone, depth multiplier)
ARCHS = {
    "xception41": ("xception_41", 1.0), "xception65": ("xception_65", 1.0),
    "xception71": ("xception_71", 1.0),
    "resnet50": ("resnet_50", 1.0), "resnet101": ("resnet_101", 1.0),
    "mobilenetv2_035": ("mobilenet_v2", 0.35), "mobilenetv2_050": ("mobilenet_v2", 0.5),
    "mobilenetv2_075": ("mobilenet_v2", 0.75), "mobilenetv2_100": ("mobilenet_v2", 1.0),
    "mobilenetv2_140": ("mobilenet_v2", 1.4),
}

# timm models that share a name with ours but are other networks: why each is refused.
REFUSED = {
    "xception41p": "pre-activation Xception (BN and ReLU before each conv), another network",
    "xception65p": "pre-activation Xception (BN and ReLU before each conv), another network",
    "xception": "the original (Chollet) Xception, not DeepLab's modified aligned Xception",
    "legacy_xception": "the original (Chollet) Xception, not DeepLab's modified aligned Xception",
    "resnet50d": "a deep 3-conv stem and average-pool shortcuts, which no backbone here has",
    "resnet101d": "a deep 3-conv stem and average-pool shortcuts, which no backbone here has",
    "resnet50c": "a 32-32-64 deep stem, which no backbone here has",
    "resnet101c": "a 32-32-64 deep stem, which no backbone here has",
    "resnet50s": "a 64-64-128 stem like DeepLab's beta ResNet but strides on the first unit of each "
                 "block, not the last; for resnet_50_beta use the official TF DeepLab checkpoint",
    "resnet101s": "a 64-64-128 stem like DeepLab's beta ResNet but strides on the first unit of each "
                  "block, not the last; for resnet_101_beta use the official TF DeepLab checkpoint",
    "resnet50_gn": "GroupNorm instead of BatchNorm",
    "mobilenetv2_110d": "deeper stages than MobileNetV2",
    "mobilenetv2_120d": "deeper stages than MobileNetV2",
}

_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "conv_head.", "bn2.")


def _ignorable(key: str) -> bool:
  """BatchNorm step counters and the ImageNet classifier (DeepLab drops it)."""
  return key.endswith("num_batches_tracked") or key.startswith(_HEAD_PREFIXES)


FORMAT = mapping.Format(
    name="timm",
    bn_leaves={"bn/scale": "weight", "bn/bias": "bias", "bn/mean": "running_mean",
               "bn/var": "running_var"},
    conv_layout=mapping.torch_conv, depthwise_layout=mapping.torch_conv,
    ignorable=_ignorable)


def arch_for(backbone: str, depth_multiplier: float) -> str | None:
  """The timm name of our backbone, or None when timm has none."""
  for arch, spec in ARCHS.items():
    if spec == (backbone, float(depth_multiplier)):
      return arch
  return None


def names_for(backbone: str):
  """A function from one of our backbone conv modules' paths to its timm names."""
  if backbone in xception.VARIANTS:
    return _xception_names(backbone)
  if backbone in ("resnet_50", "resnet_101"):
    return _resnet_names
  if backbone == "mobilenet_v2":
    return _mobilenet_names
  raise AssertionError(backbone)


def _xception_names(variant: str):
  blocks, _ = xception.VARIANTS[variant]
  index, i = {}, 0  # (our block, unit) -> timm's flat block index
  for block in blocks:
    for u in range(block.units):
      index[(block.name, f"unit_{u + 1}")] = i
      i += 1

  def names(module):
    _, block, *rest = module
    if block in ("entry_flow_conv1_1", "entry_flow_conv1_2"):
      p = f"stem.{int(block[-1]) - 1}."
      return mapping.ConvNames(p + "conv.weight", p + "bn.")
    unit, *part = rest
    p = f"blocks.{index[(block, unit)]}."
    if part == ["shortcut"]:
      return mapping.ConvNames(p + "shortcut.conv.weight", p + "shortcut.bn.")
    separable, kind = part  # ("separable_conv2", "depthwise" | "pointwise")
    p += f"stack.conv{separable[-1]}."
    if kind == "depthwise":
      return mapping.ConvNames(p + "conv_dw.weight", p + "bn_dw.")
    return mapping.ConvNames(p + "conv_pw.weight", p + "bn_pw.")

  return names


def _resnet_names(module):
  if module[1:] == ("conv1",):
    return mapping.ConvNames("conv1.weight", "bn1.")
  _, block, unit, conv = module
  p = f"layer{block[len('block'):]}.{int(unit[len('unit_'):]) - 1}."
  if conv == "shortcut":
    return mapping.ConvNames(p + "downsample.0.weight", p + "downsample.1.")
  k = conv[len("conv"):]
  return mapping.ConvNames(p + f"conv{k}.weight", p + f"bn{k}.")


def _mobilenet_layers() -> list[tuple[int, int]]:
  """Our expanded_conv_i -> timm's (stage, index in stage)."""
  return [(s, j) for s, (_, _, n, _) in enumerate(mobilenet_v2.INVERTED_RESIDUALS) for j in range(n)]


_TIMM_BN_EPSILON = 1e-5
_SHIFT = _TIMM_BN_EPSILON - mobilenet_v2.BN.epsilon


def _mobilenet_names(module):
  if module[1:] == ("conv",):
    return mapping.ConvNames("conv_stem.weight", "bn1.", bn_epsilon_shift=_SHIFT)
  _, layer, part = module
  i = 0 if layer == "expanded_conv" else int(layer[len("expanded_conv_"):])
  stage, j = _mobilenet_layers()[i]
  p = f"blocks.{stage}.{j}."
  if i == 0:  # timm's DepthwiseSeparableConv: conv_dw/bn1, conv_pw/bn2
    convs = {"depthwise": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2")}
  else:
    convs = {"expand": ("conv_pw", "bn1"), "depthwise": ("conv_dw", "bn2"),
             "project": ("conv_pwl", "bn3")}
  conv, bn = convs[part]
  return mapping.ConvNames(p + conv + ".weight", p + bn + ".", bn_epsilon_shift=_SHIFT)


assert resnet.BN.epsilon == 1e-5 and xception.BN.epsilon == 1e-3, "timm's epsilons are assumed equal"
