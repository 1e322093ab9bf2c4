"""Pretrained files -> our parameter tree, and the converted trees' own Orbax format.

`convert(source_format, arch, path)` returns ({("params"|"batch_stats", ...): array}, info), info
saying which model the tensors fit (backbone, depth multiplier, head fields) and what was left behind.
`save` writes DIR/weights.json and the Orbax tree DIR/state, the `init_from` format "orbax".
"""
from __future__ import annotations

import functools
import json

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deeplab_jax import config as config_lib
from deeplab_jax.errors import WeightsError
from deeplab_jax.weights import formats, mapping, tf_deeplab, timm

SOURCE_FORMATS = ("timm", "tf_deeplab")
INFO_FILE = "weights.json"
STATE_DIR = "state"
_INIT_SIZE = 65


def model_config(backbone: str, depth_multiplier: float = 1.0, head: dict | None = None):
  """The default config with the model fields that decide the parameter shapes of the weights."""
  config = config_lib.default_config()
  config.model.backbone = backbone
  config.model.depth_multiplier = float(depth_multiplier)
  if head:
    count = int(head["atrous_rate_count"])
    if count > len(config_lib.ATROUS_RATES_AT_OS16):
      raise WeightsError(f"the checkpoint has {count} atrous ASPP branches; DeepLab has at most 3")
    config.model.atrous_rates = config_lib.ATROUS_RATES_AT_OS16[:count]  # only the count matters
    config.model.aspp_separable = bool(head["aspp_separable"])
    config.model.use_decoder = bool(head["use_decoder"])
    config.model.decoder_separable = bool(head["decoder_separable"])
    if head.get("num_classes"):
      config.dataset.num_classes = int(head["num_classes"])
  return config


def parameter_shapes(config) -> dict[mapping.Path, jax.ShapeDtypeStruct]:
  """{("params", ...): shape} and batch_stats of `config`'s model, without computing anything."""
  from deeplab_jax.models import create_model
  model = create_model(config)
  init = functools.partial(model.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0),
                             jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, 3), jnp.float32))
  return mapping.flatten({"params": variables["params"], "batch_stats": variables["batch_stats"]})


def convert(source_format: str, arch: str, path) -> tuple[dict, dict]:
  """The tensors of `path` (a timm / torchvision file, or a TF DeepLab checkpoint prefix)."""
  if source_format == "timm":
    return _convert_timm(arch, path)
  if source_format == "tf_deeplab":
    return _convert_tf(arch, path)
  raise WeightsError(f"--from={source_format!r}: choose one of {', '.join(SOURCE_FORMATS)}")


def _convert_timm(arch: str, path) -> tuple[dict, dict]:
  if arch in timm.REFUSED:
    raise WeightsError(f"timm's {arch} is {timm.REFUSED[arch]}; supported: {', '.join(timm.ARCHS)}")
  if arch not in timm.ARCHS:
    raise WeightsError(f"--arch={arch!r} is not a supported timm architecture; choose one of "
                       f"{', '.join(timm.ARCHS)}")
  backbone, multiplier = timm.ARCHS[arch]
  source = formats.read_pytorch_weights(path)
  shapes = {p: s for p, s in parameter_shapes(model_config(backbone, multiplier)).items()
            if p[1] == "backbone"}
  tree, report = mapping.convert(source, shapes, timm.FORMAT, timm.names_for(backbone),
                                 f"{path} (timm {arch})")
  info = {"source_format": "timm", "arch": arch, "source": str(path), "backbone": backbone,
          "depth_multiplier": multiplier, "head": None, "strided_padding": "fixed", "report": report}
  return tree, info


def _convert_tf(arch: str | None, path) -> tuple[dict, dict]:
  source = formats.read_tf_checkpoint(path)
  detected = tf_deeplab.detect(source)
  backbone = detected["backbone"]
  if arch:
    wanted = tf_deeplab.ARCHS.get(arch)
    if wanted is None:
      raise WeightsError(f"--arch={arch!r} is not an official DeepLab backbone; choose one of "
                         f"{', '.join(tf_deeplab.ARCHS)}")
    if wanted != backbone:
      raise WeightsError(f"{path} holds a {detected['scope']} backbone, not {arch}; pass "
                         f"--arch={detected['scope'] if backbone.startswith('x') else backbone}")
  config = model_config(backbone, detected["depth_multiplier"], detected["head"])
  shapes = parameter_shapes(config)
  head = detected["head"]
  if head is None:
    shapes = {p: s for p, s in shapes.items() if p[1] == "backbone"}
  elif head["num_classes"] is None:
    shapes = {p: s for p, s in shapes.items() if p[1] != "logits"}
  tree, report = mapping.convert(source, shapes, tf_deeplab.FORMAT,
                                 tf_deeplab.names_for(backbone, detected["scope"]),
                                 f"{path} (TF DeepLab {detected['scope']})")
  info = {"source_format": "tf_deeplab", "arch": detected["scope"], "source": str(path),
          "backbone": backbone, "depth_multiplier": detected["depth_multiplier"], "head": head,
          "report": report}
  info["strided_padding"] = strided_padding(info)
  return tree, info


def _folder(path) -> epath.Path:
  """Orbax wants absolute paths; gs:// and other URLs are left as they are."""
  path = epath.Path(path)
  return path if "://" in str(path) else path.absolute()


def check_output(output) -> epath.Path:
  """Refuse, before any work, a folder that already holds converted weights."""
  output = _folder(output)
  if (output / INFO_FILE).exists() or (output / STATE_DIR).exists():
    raise WeightsError(f"{output} already holds converted weights; choose another --output or "
                       f"delete it first")
  return output


def save(output, tree: dict, info: dict) -> epath.Path:
  """DIR/weights.json and DIR/state (weights.json last: its presence means the state is whole)."""
  output = check_output(output)
  output.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(output / STATE_DIR, mapping.unflatten(tree))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (output / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
  return output


def _restore_numpy(checkpointer, path, metadata_tree):
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata_tree)
  return checkpointer.restore(path, target)


def load_converted(path) -> tuple[dict, dict]:
  """A `save`d folder: (flat tree of numpy arrays, info)."""
  path = _folder(path)
  info = json.loads((path / INFO_FILE).read_text())
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path / STATE_DIR).item_metadata.tree
    tree = _restore_numpy(checkpointer, path / STATE_DIR, metadata)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise WeightsError(f"{path / STATE_DIR} is not a complete converted checkpoint "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); convert again") from None
  return mapping.flatten(tree), info


def strided_padding(info: dict) -> str:
  """How the network the weights came from padded its strided convs: slim's MobileNetV2 (TF's
  ImageNet and DeepLab model-zoo checkpoints) as TF SAME; slim's Xception and ResNet with
  fixed_padding, as timm's and PyTorch's networks do. Folders converted before this was recorded
  get it from their source format and backbone."""
  if info.get("strided_padding"):
    return info["strided_padding"]
  official_mobilenet = info.get("source_format") == "tf_deeplab" and info.get("backbone") == "mobilenet_v2"
  return "same" if official_mobilenet else "fixed"


def config_flags(info: dict) -> str:
  """The `config.model` overrides that build the network the converted weights came from."""
  flags = [f"--config.model.backbone={info['backbone']}"]
  if info["depth_multiplier"] != 1.0:
    flags.append(f"--config.model.depth_multiplier={info['depth_multiplier']}")
  if strided_padding(info) != "fixed":
    flags.append(f"--config.model.strided_padding={strided_padding(info)}")
  head = info.get("head")
  if head:
    rates = config_lib.ATROUS_RATES_AT_OS16[:head["atrous_rate_count"]]
    if len(rates) != len(config_lib.ATROUS_RATES_AT_OS16):
      flags.append(f"--config.model.atrous_rates=\"{tuple(rates)}\"")
    for field in ("aspp_separable", "use_decoder", "decoder_separable"):
      flags.append(f"--config.model.{field}={head[field]}")
    if head.get("num_classes"):
      flags.append(f"--config.dataset.num_classes={head['num_classes']}")
  return " ".join(flags)
