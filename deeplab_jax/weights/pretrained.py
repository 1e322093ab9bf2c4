"""Trained DeepLabs from any of the forms weights arrive in, with the config they need: what
`infer.Predictor.from_pretrained` and the commands' `--weights` read.

  a folder written by `python -m deeplab_jax.weights convert`   DIR (weights.json + state/)
  an official TF checkpoint prefix                              DIR/model.ckpt
  an extracted model-zoo folder                                 DIR (holding model.ckpt.index, or
                                                                one folder that does)
  the model zoo's tarball itself, read in place                 deeplabv3_..._2018_01_04.tar.gz

Local or gs://. The network's fields (backbone, width, head, strided-conv padding) come from the
tensors, as `weights convert` detects them; the data set (class names, palette, eval crop) from the
class count, unless `dataset` names it.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile

from etils import epath
import ml_collections
import numpy as np

from deeplab_jax import datasets
from deeplab_jax.errors import WeightsError
from deeplab_jax.weights import convert, mapping

# The official models' class counts -> our data sets. The official ADE20K models count 151 classes,
# 0 being "other", which their training ignored; our ade20k data maps it to the ignore label and
# numbers the 150 others from 0, so its logit is dropped (`_drop_other`).
DATASET_BY_CLASSES = {21: "voc2012_segmentation", 19: "cityscapes", 151: "ade20k"}
ADE20K_OFFICIAL_CLASSES = 151
# Whole images at the official evaluation's crop (the zoo's eval_crop_size); larger ones are tiled.
EVAL_CROP = {"voc2012_segmentation": (513, 513), "cityscapes": (1025, 2049), "ade20k": (513, 513)}
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
BACKBONE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def load(path, *, dataset: str | None = None, config: ml_collections.ConfigDict | None = None
         ) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(config, {"params", "batch_stats"}, info) of the DeepLab at `path`.

  `config`: its data set and eval fields are kept (a user's data dir, split, eval crop) and its model
  fields replaced by the weights'; None starts from the defaults and the data set the class count
  names (`dataset` overrides it)."""
  tree, info, where = _read(path)
  head = info.get("head")
  if not head:
    raise WeightsError(f"{where} holds a {info['backbone']} backbone without a DeepLab head (ImageNet "
                       f"weights): it cannot segment; train from it with --config.init_from.path="
                       f"{path} --config.init_from.scope=backbone")
  if not head.get("num_classes"):
    raise WeightsError(f"{where} holds a DeepLab without its logits layer: it cannot segment; train "
                       f"from it with --config.init_from.path={path} --config.init_from.scope=all")
  classes = int(head["num_classes"])
  if config is None:
    config = convert.model_config("xception_65")
    name = dataset or DATASET_BY_CLASSES.get(classes, "pretrained")  # unknown: class_0, class_1, ...
    config.dataset.name, config.dataset.num_classes = name, classes
    config.eval.crop_size = EVAL_CROP.get(datasets.base_name(name), (513, 513))
  else:
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset.name = dataset or config.dataset.name
  if classes == ADE20K_OFFICIAL_CLASSES and datasets.base_name(config.dataset.name) == "ade20k":
    tree, classes = _drop_other(tree), ADE20K_OFFICIAL_CLASSES - 1
    if int(config.dataset.num_classes) == ADE20K_OFFICIAL_CLASSES:  # the count named it, not a config
      config.dataset.num_classes = classes
  if int(config.dataset.num_classes) != classes:
    raise WeightsError(f"{where} predicts {classes} classes but config.dataset.num_classes="
                       f"{config.dataset.num_classes} ({config.dataset.name}); evaluate it on data with "
                       f"its classes")
  config.model = convert.model_config(info["backbone"], info["depth_multiplier"], head).model
  config.model.strided_padding = convert.strided_padding(info)
  return config, mapping.unflatten(tree), info


def _drop_other(tree: dict) -> dict:
  tree = dict(tree)
  for key in list(tree):
    if key[1] == "logits":
      tree[key] = np.asarray(tree[key])[..., 1:]  # (1, 1, 256, 151) kernel and (151,) bias
  return tree


def _read(path) -> tuple[dict, dict, str]:
  """(flat tree, info, how to name the source in an error) of any of the module's path forms."""
  path = epath.Path(path)
  where = str(path)
  if str(path).endswith(TARBALL_SUFFIXES):
    if not path.exists():
      raise WeightsError(f"{path} does not exist; give a model-zoo tarball, a checkpoint prefix "
                         f"(DIR/model.ckpt) or a folder")
    prefix = _checkpoint_from_tarball(path)
    tree, info = convert.convert("tf_deeplab", None, prefix)
    return tree, info, where
  if path.name.endswith(BACKBONE_FILE_SUFFIXES) and path.exists():
    raise WeightsError(f"{path} is a timm / PyTorch file, which holds an ImageNet backbone without a "
                       f"DeepLab head: it cannot segment; train from it with --config.init_from.path="
                       f"{path} --config.init_from.format=timm")
  if path.is_dir():
    if (path / convert.INFO_FILE).exists():
      tree, info = convert.load_converted(path)
      return tree, info, where
    if (path / "config.json").exists() and (path / "checkpoints").exists():
      raise WeightsError(f"{path} is a training workdir; read it with --workdir (Predictor."
                         f"from_workdir), not --weights")
    prefix = _checkpoint_in_folder(path)
    return (*convert.convert("tf_deeplab", None, prefix), where)
  if epath.Path(f"{path}.index").exists():
    return (*convert.convert("tf_deeplab", None, path), where)
  raise WeightsError(f"{path} does not exist or holds no weights; give a folder written by python -m "
                     f"deeplab_jax.weights convert, a TF checkpoint prefix (DIR/model.ckpt with its "
                     f".index and .data-* files), a model-zoo folder or its .tar.gz")


def _checkpoint_in_folder(folder: epath.Path) -> epath.Path:
  """The prefix of the one TF checkpoint in `folder` or in its one subfolder (the zoo's tarballs
  extract to one folder)."""
  for where in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
    indexes = sorted(p for p in where.iterdir() if p.name.endswith(".index"))
    if len(indexes) == 1:
      return where / indexes[0].name[:-len(".index")]
    if len(indexes) > 1:
      raise WeightsError(f"{where} holds {len(indexes)} checkpoints ({', '.join(p.name for p in indexes)});"
                         f" give the prefix of one, e.g. {where / indexes[0].name[:-len('.index')]}")
  raise WeightsError(f"{folder} holds no TF checkpoint (model.ckpt.index and model.ckpt.data-*) and no "
                     f"converted weights ({convert.INFO_FILE}); give a model-zoo folder, its .tar.gz or "
                     f"a folder written by python -m deeplab_jax.weights convert")


def _checkpoint_from_tarball(path: epath.Path) -> str:
  """The tarball's checkpoint files, streamed into a temporary folder (removed at exit): TF's reader
  needs files, the user need not extract anything. Returns the checkpoint's prefix there."""
  local = tempfile.mkdtemp(prefix="deeplab_jax_zoo_")
  atexit.register(shutil.rmtree, local, True)
  wanted = None
  try:
    with path.open("rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
      for member in archive:  # one pass over the stream: a gs:// object is read once
        name = os.path.basename(member.name)
        if not member.isfile() or ".ckpt" not in name or not (
            name.endswith(".index") or ".data-" in name):
          continue
        prefix = name[:name.index(".index")] if name.endswith(".index") else name[:name.index(".data-")]
        if wanted is None:
          wanted = prefix
        if prefix != wanted:
          continue
        with open(os.path.join(local, name), "wb") as out:
          shutil.copyfileobj(archive.extractfile(member), out)
  except (tarfile.TarError, EOFError, OSError) as e:
    if isinstance(e, OSError) and e.errno is not None:
      raise
    raise WeightsError(f"{path} is truncated or not a tar archive ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:120] or 'unexpected end'}); download it again") from None
  if wanted is None or not os.path.exists(os.path.join(local, f"{wanted}.index")):
    raise WeightsError(f"{path} holds no TF checkpoint (model.ckpt.index and model.ckpt.data-*); give a "
                       f"DeepLab model-zoo tarball")
  return os.path.join(local, wanted)
