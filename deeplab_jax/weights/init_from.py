"""`config.init_from`: start a new run from pretrained weights (never a resumed one: resume wins).

  config.init_from.path    a converted folder (python -m deeplab_jax.weights convert), a training
                           workdir (its latest checkpoint), or, with format timm / tf_deeplab, the
                           original file, converted on the fly
  config.init_from.format  "orbax" | "timm" | "tf_deeplab"
  config.init_from.scope   "backbone" (ImageNet weights: the heads keep their init) | "all"

Strict: every parameter in the scope must come from the source in the same shape, except the logits,
which keep their init when the class count differs (a 21-class VOC model fine-tuned to 6 classes). The
report (logged, printed, and written to <workdir>/init_from.json) lists what was loaded, what was left
at its init and why, and what the source held that this model does not use.
"""
from __future__ import annotations

import json

from absl import logging
from etils import epath
import jax
import numpy as np

from deeplab_jax.errors import WeightsError
from deeplab_jax.weights import convert, mapping, timm

REPORT_FILE = "init_from.json"
PADDING_NAMES = {"same": "TF SAME", "fixed": "the official fixed_padding rule"}


def load_source(init, model_config) -> tuple[dict, dict]:
  """(flat {path: numpy array}, info) from `init.path` in `init.format`."""
  path = epath.Path(init.path)
  if not path.exists() and not (init.format == "tf_deeplab" and path.parent.exists()):
    raise WeightsError(f"config.init_from.path={path} does not exist; give a folder written by python -m "
                       f"deeplab_jax.weights convert, a training workdir, or the original file")
  if init.format == "timm":
    m = model_config.model
    arch = timm.arch_for(m.backbone, m.depth_multiplier)
    if arch is None:
      raise WeightsError(f"config.model.backbone={m.backbone!r} (depth multiplier "
                         f"{m.depth_multiplier}) has no timm counterpart; timm weights fit "
                         f"{', '.join(sorted({b for b, _ in timm.ARCHS.values()}))}")
    return convert.convert("timm", arch, path)
  if init.format == "tf_deeplab":
    return convert.convert("tf_deeplab", None, path)
  if (path / convert.INFO_FILE).exists():
    return convert.load_converted(path)
  if (path / "checkpoints").exists():
    return _load_workdir(path)
  raise WeightsError(f"config.init_from.path={path} holds neither converted weights ({convert.INFO_FILE}) "
                     f"nor a training workdir (checkpoints/); convert a file first with python -m "
                     f"deeplab_jax.weights convert, or set config.init_from.format")


def _load_workdir(path) -> tuple[dict, dict]:
  from deeplab_jax import checkpoints
  manager = checkpoints.create_manager(path, keep=None, async_save=False, create=False)
  restored = checkpoints.newest_variables(manager)
  if restored is None:
    raise WeightsError(f"config.init_from.path={path} has a checkpoints/ folder without a finished "
                       f"checkpoint; give a workdir that trained at least one checkpoint")
  return mapping.flatten(restored.state), {"source_format": "orbax", "source": str(path),
                                           "step": int(restored.step)}


def _is_logits(path: mapping.Path) -> bool:
  return len(path) > 1 and path[1] == "logits"


def _in_scope(path: mapping.Path, scope: str) -> bool:
  return scope == "all" or path[1] == "backbone"


def plan(source: dict, targets: dict, scope: str, where: str) -> tuple[dict, dict, list]:
  """({path: array to load}, {path: why left at init}, [unused source paths]); WeightsError on the
  first parameter in scope that the source lacks or holds in another shape."""
  loaded, left = {}, {}
  has_heads = any(p[1] in ("aspp", "decoder") for p in source)
  for path in sorted(targets):
    shape = tuple(targets[path].shape)
    if not _in_scope(path, scope):
      left[path] = f"outside scope '{scope}'"
      continue
    value = source.get(path)
    if _is_logits(path) and (value is None or tuple(value.shape) != shape):
      left[path] = ("not in the source" if value is None else
                    f"the source's is {tuple(value.shape)} (another class count), this model's {shape}")
      continue
    if value is None:
      if path[1] == "backbone":
        hint = ("the source's backbone is another network or width; match config.model.backbone and "
                "depth_multiplier to it")
      elif not has_heads:
        hint = "it holds only a backbone: set config.init_from.scope=backbone"
      else:
        hint = ("the source model has other head settings; match config.model.aspp_separable, "
                "use_decoder, decoder_separable and atrous_rates to it")
      raise WeightsError(f"{where} has no {mapping.name(path)}: {hint}")
    if tuple(value.shape) != shape:
      raise WeightsError(f"{where} has {mapping.name(path)} of shape {tuple(value.shape)} but this "
                         f"model needs {shape}: the source is another backbone, width or head; match "
                         f"config.model to it")
    loaded[path] = value
  extra = sorted(p for p in source if p not in targets and _in_scope(p, scope) and not _is_logits(p))
  if extra:
    raise WeightsError(f"{where} has {mapping.name(extra[0])}, which this model lacks: the source is "
                       f"a deeper or other network; match config.model.backbone to it")
  unused = sorted(p for p in source if p not in loaded)
  return loaded, left, unused


def prepare(config, abstract_variables) -> tuple[dict, dict]:
  """Read `config.init_from` and match it against the model's variables, from shapes alone (before
  anything is compiled): ({path: array to load}, report). WeightsError on the first misfit."""
  init = config.init_from
  source, info = load_source(init, config)
  where = f"config.init_from.path={init.path}"
  padding, wanted = config.model.get("strided_padding", "fixed"), convert.strided_padding(info)
  if info.get("source_format") in convert.SOURCE_FORMATS and padding != wanted:
    # The other padding shifts every stride-2 conv's grid by a pixel on even sizes: the weights
    # would start from features they were not trained on.
    raise WeightsError(f"{where} was trained with {wanted!r} padding on its strided convs "
                       f"({info.get('arch')}: {PADDING_NAMES[wanted]}) but config.model.strided_padding="
                       f"{padding!r}; add --config.model.strided_padding={wanted}")
  loaded, left, unused = plan(source, mapping.flatten(abstract_variables), init.scope, where)
  report = {"path": str(init.path), "format": init.format, "scope": init.scope,
            "source": {k: v for k, v in info.items() if k != "report"},
            "loaded_tensors": len(loaded), "loaded_values": int(sum(v.size for v in loaded.values())),
            "left_at_init": {mapping.name(p): why for p, why in left.items()},
            "unused": [mapping.name(p) for p in unused]}
  return loaded, report


def apply(state, loaded: dict):
  """`state` (a freshly initialized TrainState, on any mesh) with `loaded` in its params and
  batch_stats; the optimizer state stays as initialized (SGD momentum starts at zero)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def place(path, leaf):
    key = mapping.key_names(path)
    if key not in loaded:
      return leaf
    value = np.asarray(loaded[key], leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

  variables = jax.tree_util.tree_map_with_path(place, variables)
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def write_report(report: dict, workdir) -> None:
  """Log the report and write it to <workdir>/init_from.json (process 0)."""
  _log(report)
  if jax.process_index() == 0:
    (epath.Path(workdir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def _log(report: dict) -> None:
  left = report["left_at_init"]
  outside = sum(1 for why in left.values() if why.startswith("outside"))
  named = {k: v for k, v in left.items() if not v.startswith("outside")}
  line = (f"initialized from {report['path']} ({report['format']}, scope {report['scope']}): "
          f"{report['loaded_tensors']} tensors ({report['loaded_values']:,} values) loaded, "
          f"{outside} outside the scope left at init, {len(report['unused'])} source tensors unused")
  logging.info(line)
  print(f"deeplab_jax: {line}", flush=True)
  for name, why in named.items():
    logging.info("left at init: %s (%s)", name, why)
    print(f"deeplab_jax:   left at init: {name} ({why})", flush=True)
