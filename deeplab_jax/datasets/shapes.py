"""Synthetic shapes: the embedded default data set, generated locally from a seed (no download).

Each image holds 2-5 shapes of 5 classes (circle, rectangle, triangle, ring, cross) in random colors,
sizes and rotations, later shapes occluding earlier ones, on a textured, noisy background. Color carries
no class information, so a model has to learn shape. Class 0 is background.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

CLASS_NAMES = ("background", "circle", "rectangle", "triangle", "ring", "cross")
NUM_CLASSES = len(CLASS_NAMES)
SIZE_RANGE = (0.1, 0.3)  # a shape's half-extent, as a fraction of the image's shorter side
NUM_SHAPES = (2, 5)  # inclusive range of shapes per image
ROTATION_RANGE = (0.0, 2 * np.pi)  # radians
MAX_OVERLAP = 1.0  # the most of a new shape that may lie on earlier shapes (occlusion)
CENTER_MARGIN = 0.5  # shape centers keep this many half-extents from the border
# Sides close to the eval crop (129): padding the eval input with a large gray border shifts the ASPP
# image-pooling context away from training's (measured: mean IoU 0.38 against 0.35 with 96-160 px
# images and a 161 crop).
IMAGE_SIZES = (112, 128)


def _background(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """A random base color, fine color stripes (the texture), smooth blotches and grain.

  The stripes' periods (4-12 px) are what tells background from the smooth shapes locally; without a
  local cue figure and ground can only be told apart by reasoning over whole regions, which a small
  network learns far too slowly for a CPU demo.
  """
  h, w = y.shape
  image = np.broadcast_to(rng.uniform(40, 215, 3).astype(np.float32), (h, w, 3)).copy()
  for _ in range(rng.integers(1, 4)):
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.5, 1.6)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    image += wave[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
  coarse = rng.normal(0, 20, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
  image += np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(coarse[..., c])).resize(
      (w, h), Image.BILINEAR)) for c in range(3)], -1)  # smooth blotches, not blocks
  return image + rng.normal(0, 25, image.shape).astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  h, w = y.shape
  size = rng.uniform(*SIZE_RANGE) * min(h, w)
  # Centers CENTER_MARGIN half-extents inside the image: shapes may be cut by the border, but not mostly.
  m = CENTER_MARGIN * size
  cy, cx = rng.uniform(m, h - m), rng.uniform(m, w - m)
  theta = rng.uniform(*ROTATION_RANGE)
  u = np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)
  v = -np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)
  r = np.hypot(u, v)
  name = CLASS_NAMES[cls]
  if name == "circle":
    return r < size
  if name == "rectangle":
    aspect = rng.uniform(0.4, 1.0)
    return (np.abs(u) < size) & (np.abs(v) < size * aspect)
  if name == "triangle":  # equilateral: three half-planes at 120 degrees
    inside = np.ones_like(u, bool)
    for k in range(3):
      a = theta + 2 * np.pi * k / 3
      inside &= (np.cos(a) * (x - cx) + np.sin(a) * (y - cy)) < size * 0.6
    return inside
  if name == "ring":
    return (r < size) & (r > size * rng.uniform(0.45, 0.7))
  if name == "cross":
    arm = size * rng.uniform(0.25, 0.4)
    return ((np.abs(u) < size) & (np.abs(v) < arm)) | ((np.abs(v) < size) & (np.abs(u) < arm))
  raise ValueError(cls)


def generate_example(rng: np.random.Generator, height: int, width: int):
  """One (image uint8 HxWx3, label uint8 HxW) pair."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = _background(rng, y, x)
  label = np.zeros((height, width), np.uint8)
  for _ in range(rng.integers(NUM_SHAPES[0], NUM_SHAPES[1] + 1)):
    cls = int(rng.integers(1, NUM_CLASSES))
    for _ in range(20):
      mask = _shape_mask(rng, cls, y, x)
      if (mask & (label > 0)).sum() <= MAX_OVERLAP * mask.sum():
        break
    else:
      continue  # no placement within the occlusion bound: one shape fewer
    color = rng.uniform(0, 255, 3).astype(np.float32)
    # A gentle gradient across the shape so that it is not one flat color either.
    gradient = (np.cos(rng.uniform(0, 2 * np.pi)) * x + np.sin(rng.uniform(0, 2 * np.pi)) * y)
    shade = color + (gradient / max(height, width))[..., None] * rng.uniform(-60, 60, 3)
    image[mask] = shade[mask]
    label[mask] = cls
  image += rng.normal(0, 4, image.shape).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8), label


def generate_split(seed: int, num_examples: int):
  """Deterministic examples of varied sizes: the same seed always gives the same images."""
  rng = np.random.default_rng(seed)
  for _ in range(num_examples):
    h, w = (int(v) for v in rng.integers(IMAGE_SIZES[0], IMAGE_SIZES[1] + 1, 2))
    yield generate_example(rng, h, w)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  num_train: int = 2000
  num_val: int = 200


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over `generate_split`, so the default trains through the same reader as VOC.

  Built locally on first use (`input_pipeline.load_builder`); "tiny" is for tests and smoke runs.
  """
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Five shape classes on textured backgrounds; train seed 0, val seed 1.",
      "1.1.0": "Image sides 112-128 px (were 96-160).",
  }
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="2,000 train and 200 val images, 112-128 px sides."),
      ShapesConfig(name="tiny", num_train=48, num_val=12, description="For tests."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "segmentation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "segmentation"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples("train", 0, self.builder_config.num_train),
            "val": self._generate_examples("val", 1, self.builder_config.num_val)}

  def _generate_examples(self, split: str, seed: int, num_examples: int):
    for i, (image, label) in enumerate(generate_split(seed, num_examples)):
      name = f"{split}_{i:05d}"
      yield name, {"image": image, "segmentation": label[..., None], "file_name": name}
