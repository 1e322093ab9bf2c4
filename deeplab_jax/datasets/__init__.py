"""Data sets: TFDS builders (registered on import), what each needs, and how its examples are read.

Every data set reaches the input pipeline as `image` (H, W, 3), `segmentation` (H, W, 1) class ids
(255 ignored) and `file_name`. Ours store exactly that; Cityscapes is TFDS's own builder, so its
`Entry` names its feature keys and the lookup table from label ids to train ids.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import sys

from absl import logging
from etils import epath
import numpy as np

from deeplab_jax import console
from deeplab_jax.datasets import ade20k, cityscapes, folder, manual, shapes, voc  # noqa: F401 (registers)
from deeplab_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Entry:
  """What the pipeline and the prepare command know about one data set."""
  class_names: tuple[str, ...] | None = None
  # (archive, or the folder it extracts to) pairs the manual dir must hold, and where to get them.
  needs: tuple[tuple[str, str | None], ...] = ()
  where: str = ""
  generated: bool = False  # built on first use, no download
  image_key: str = "image"
  label_key: str = "segmentation"
  file_key: str = "file_name"
  label_table: np.ndarray | None = None  # applied to decoded labels (uint8 -> uint8)
  num_classes: int | None = None  # for builders that store no metadata of their own


VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

DATASETS = {
    "synthetic_shapes": Entry(class_names=shapes.CLASS_NAMES, generated=True,
                              num_classes=shapes.NUM_CLASSES),
    "voc2012_segmentation": Entry(
        class_names=VOC_CLASS_NAMES,
        needs=((voc.VOC_ARCHIVE, voc.VOC_ROOT), (voc.SBD_ARCHIVE, voc.SBD_ROOT)),
        where=(f"{voc.VOC_ARCHIVE} from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and "
               f"{voc.SBD_ARCHIVE} from http://www.eecs.berkeley.edu/Research/Projects/CS/vision/"
               f"grouping/semantic_contours/benchmark.tgz")),
    "ade20k": Entry(
        class_names=ade20k.CLASS_NAMES, needs=((ade20k.ARCHIVE, ade20k.ROOT),),
        where=f"{ade20k.ARCHIVE} from http://data.csail.mit.edu/places/ADEchallenge/{ade20k.ARCHIVE}"),
    "cityscapes": Entry(
        class_names=cityscapes.CLASS_NAMES, needs=tuple((a, None) for a in cityscapes.ARCHIVES),
        where=(f"{' and '.join(cityscapes.ARCHIVES)} from https://www.cityscapes-dataset.com/"
               f"downloads/ (free login)"),
        image_key="image_left", label_key="segmentation_label", file_key="image_id",
        label_table=cityscapes.LABEL_TABLE, num_classes=cityscapes.NUM_CLASSES),
    "folder_segmentation": Entry(
        needs=(("images", "images"), ("masks", "masks")),
        where="your own images/ and masks/ folders plus <split>.txt lists (see deeplab_jax/datasets/"
              "folder.py)"),
}

# The name each base name is prepared and loaded under.
TFDS_NAMES = {"cityscapes": cityscapes.NAME}


def base_name(name: str) -> str:
  """'cityscapes/semantic_segmentation' -> 'cityscapes'; 'synthetic_shapes/tiny' -> 'synthetic_shapes'."""
  return name.split("/")[0].split(":")[0]


def entry(name: str) -> Entry:
  """The `Entry` of a data set; an unknown TFDS data set gets the standard feature keys."""
  return DATASETS.get(base_name(name), Entry())


def class_names(name: str, num_classes: int, metadata=None) -> tuple[str, ...]:
  """Names from the data set's stored metadata, its entry, or class_0..class_{n-1}."""
  names = (metadata or {}).get("class_names") or entry(name).class_names
  if names is None or len(names) != num_classes:
    return tuple(f"class_{i}" for i in range(num_classes))
  return tuple(names)


def missing_message(name: str, data_dir: str) -> str:
  """One line: what is missing, where to get it, how to prepare it."""
  known = DATASETS.get(base_name(name))
  if known is None or not known.where:
    return (f"data set {name!r} is not prepared in {data_dir} and no builder for it is registered; "
            f"set config.dataset.name to a prepared TFDS data set or build it with `tfds build`")
  return (f"data set {name!r} is not prepared in {data_dir}: put {known.where} in a manual directory, "
          f"then run `python -m deeplab_jax.datasets.prepare {base_name(name)} --manual_dir=DIR "
          f"--data_dir={data_dir}`")


def missing_files(name: str, manual_dir: epath.Path) -> list[str]:
  """What the manual dir lacks for `name`, each as 'archive (or folder/)'."""
  missing = []
  for archive, inner in entry(name).needs:
    if not manual.present(manual_dir, archive, inner):
      missing.append(archive if not inner or inner == archive else f"{archive} (or its {inner}/ folder)")
  return missing


def prepare(name: str, manual_dir: str | None, data_dir: str | None, **builder_kwargs) -> dict:
  """Build `name` (what `python -m deeplab_jax.datasets.prepare` runs); returns {split: examples}.

  Checks the manual dir first, so a missing archive is one line naming it and where to get it.
  `builder_kwargs` (num_classes, ignore_label) are for folder_segmentation only.
  """
  import tensorflow_datasets as tfds
  if name not in DATASETS:
    raise ConfigError(f"unknown data set {name!r}; prepare one of {', '.join(sorted(DATASETS))}")
  known = DATASETS[name]
  download_config = None
  if not known.generated:
    if not manual_dir:
      raise ConfigError(f"{name} needs --manual_dir, the folder that holds {known.where}")
    manual = epath.Path(manual_dir).expanduser()
    missing = missing_files(name, manual)
    if missing:
      raise DataError(f"{manual} lacks {', '.join(missing)}; get {known.where} into it and run again")
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual))
  if name != "folder_segmentation":
    builder_kwargs = {}
  data_dir = str(epath.Path(data_dir).expanduser()) if data_dir else None
  # A build that fails (a bad mask, a missing image) leaves nothing behind that it created.
  created = [p for p in (epath.Path(data_dir),) if data_dir and not p.exists()]
  builder = tfds.builder(TFDS_NAMES.get(name, name), data_dir=data_dir, **builder_kwargs)
  home = epath.Path(builder.data_dir).parent.parent if builder.builder_config else epath.Path(
      builder.data_dir).parent  # <data_dir>/<name>[/<config>]/<version>
  created += [home] if not home.exists() else []
  try:
    download_and_prepare(builder, download_config, bars=sys.stderr.isatty())
  except BaseException:
    for path in reversed(created):
      if path.exists():
        path.rmtree()
    raise
  console.open_log(builder.data_dir, "prepare.log")  # once built: a failed build leaves nothing
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def download_and_prepare(builder, download_config=None, *, bars: bool) -> None:
  """`builder.download_and_prepare` without TFDS's console noise: its progress bars only if `bars`
  (off a terminal they print a line a second), its "Downloading and preparing dataset ..." prints
  into the log."""
  import tensorflow_datasets as tfds
  printed = io.StringIO()
  if not bars:
    tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(printed):
      builder.download_and_prepare(download_config=download_config)
  finally:
    if not bars:
      tfds.enable_progress_bar()
    if printed.getvalue().strip():
      logging.info("TFDS: %s", printed.getvalue().strip())
