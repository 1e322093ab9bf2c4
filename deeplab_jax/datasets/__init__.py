"""Data sets: TFDS builders (registered on import), class names, and how to prepare each.

Builders that generate their data (the synthetic default) are built on first use; the others need a
manual download, and `missing_message` says which files and which command.
"""
from __future__ import annotations

from deeplab_jax.datasets import shapes

# Data sets whose builder makes the data itself: `input_pipeline.load_builder` prepares them on first use.
GENERATED = ("synthetic_shapes",)

CLASS_NAMES = {
    "synthetic_shapes": shapes.CLASS_NAMES,
    "voc2012_segmentation": (
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
        "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
        "train", "tvmonitor"),
    "cityscapes": (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
        "bicycle"),
}

_DOWNLOADS = {
    "voc2012_segmentation": (
        "VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and SBD's "
        "benchmark.tgz (http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
        "semantic_contours/benchmark.tgz)"),
    "cityscapes": ("leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
                   "(https://www.cityscapes-dataset.com/downloads/, login needed)"),
    "ade20k": "ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/)",
}


def base_name(name: str) -> str:
  """'cityscapes/semantic_segmentation' -> 'cityscapes'; 'synthetic_shapes/tiny' -> 'synthetic_shapes'."""
  return name.split("/")[0].split(":")[0]


def class_names(name: str, num_classes: int) -> tuple[str, ...]:
  names = CLASS_NAMES.get(base_name(name))
  if names is None or len(names) != num_classes:
    return tuple(f"class_{i}" for i in range(num_classes))
  return tuple(names)


def missing_message(name: str, data_dir: str) -> str:
  """One line: what is missing, where to get it, how to prepare it."""
  files = _DOWNLOADS.get(base_name(name))
  if files is None:
    return (f"data set {name!r} is not prepared in {data_dir} and no builder for it is registered; "
            f"set config.dataset.name to a prepared TFDS data set or build it with `tfds build`")
  return (f"data set {name!r} is not prepared in {data_dir}: download {files} into a manual directory, "
          f"then run `python -m deeplab_jax.datasets.prepare {base_name(name)} --manual_dir=DIR "
          f"--data_dir={data_dir}` (the builder and the prepare command arrive with issue #4)")
