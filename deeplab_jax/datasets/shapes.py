"""Synthetic shapes: the embedded default data set, generated locally from a seed (no download).

Each image holds 2-5 objects on a textured, noisy background; later objects occlude earlier ones.
An object's class is its *material*, the pattern on its surface: stripes, checks, dots, a grid of
thin lines, or plain (smooth). Its outline is drawn at random (ellipse, rectangle, triangle, polygon,
blob) whatever its class, and both of its colors are random, so neither color nor outline tells the
class. The background is a smooth blotchy field with long waves under strong grain.

What a model must learn: which of five patterns covers a pixel's neighborhood, whatever their colors,
orientation and scale (periods 6-12 px, x0.75-1.25 with augmentation), how it differs from the grainy
background, and where each outline runs, to the pixel, where objects overlap. Why that is learnable in
minutes: every cue is local, inside a ~15 px window that the first few convolutions see, so the
network needs no long-range reasoning; the earlier design (class = outline, e.g. ring vs circle,
triangle vs rectangle, on striped backgrounds) needed whole-object reasoning and took ~10,000 steps
to learn.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

CLASS_NAMES = ("background", "stripes", "checks", "dots", "grid", "plain")
NUM_CLASSES = len(CLASS_NAMES)
OUTLINES = ("ellipse", "rectangle", "triangle", "polygon", "blob")
SIZE_RANGE = (0.12, 0.3)  # an object's half-extent, as a fraction of the image's shorter side
NUM_OBJECTS = (2, 5)  # inclusive range of objects per image
MAX_OVERLAP = 0.6  # the most of a new object that may lie on earlier ones (occlusion)
CENTER_MARGIN = 0.5  # centers keep this many half-extents from the border
PERIOD_RANGE = (6.0, 12.0)  # pixels per pattern period
MIN_CONTRAST = 60.0  # least distance (0-255 RGB) between an object's two colors
BACKGROUND_GRAIN = 14.0  # standard deviation of the background's per-pixel noise
OBJECT_GRAIN = 4.0
# Sides close to the eval crop (129): padding the eval input with a large gray border shifts the ASPP
# image-pooling context away from training's.
IMAGE_SIZES = (112, 128)


def _background(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """A random base color, smooth blotches, long waves (periods 20-60 px) and strong grain."""
  h, w = y.shape
  image = np.broadcast_to(rng.uniform(40, 215, 3).astype(np.float32), (h, w, 3)).copy()
  for _ in range(rng.integers(1, 3)):
    angle, period = rng.uniform(0, np.pi), rng.uniform(20, 60)
    wave = np.sin(2 * np.pi / period * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 7))
    image += wave[..., None] * rng.uniform(-30, 30, 3).astype(np.float32)
  coarse = rng.normal(0, 25, (h // 10 + 2, w // 10 + 2, 3)).astype(np.float32)
  image += np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(coarse[..., c])).resize(
      (w, h), Image.BILINEAR)) for c in range(3)], -1)  # smooth blotches, not blocks
  return image + rng.normal(0, BACKGROUND_GRAIN, image.shape).astype(np.float32)


def _outline(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """A random outline's mask: the class does not depend on it."""
  h, w = y.shape
  size = rng.uniform(*SIZE_RANGE) * min(h, w)
  m = CENTER_MARGIN * size
  cy, cx = rng.uniform(m, h - m), rng.uniform(m, w - m)
  theta = rng.uniform(0, 2 * np.pi)
  u = np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)
  v = -np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)
  kind = OUTLINES[rng.integers(len(OUTLINES))]
  if kind == "ellipse":
    return (u / size) ** 2 + (v / (size * rng.uniform(0.5, 1.0))) ** 2 < 1
  if kind == "rectangle":
    return (np.abs(u) < size) & (np.abs(v) < size * rng.uniform(0.45, 1.0))
  angle = np.arctan2(v, u)
  r = np.hypot(u, v)
  if kind == "blob":  # a wobbly radius
    k, amp = rng.integers(2, 5), rng.uniform(0.15, 0.3)
    return r < size * (1 - amp + amp * np.sin(k * angle + rng.uniform(0, 7)))
  sides = 3 if kind == "triangle" else int(rng.integers(5, 7))
  # A regular polygon: the distance to the nearest side's normal direction.
  sector = 2 * np.pi / sides
  local = np.mod(angle, sector) - sector / 2
  return r * np.cos(local) < size * (0.6 if sides == 3 else 0.85)


def _pattern(rng: np.random.Generator, cls: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """A float (H, W) field in [0, 1]: where the object's second color shows, for class `cls`."""
  theta = rng.uniform(0, np.pi)
  u = np.cos(theta) * x + np.sin(theta) * y + rng.uniform(0, 100)
  v = -np.sin(theta) * x + np.cos(theta) * y + rng.uniform(0, 100)
  period = rng.uniform(*PERIOD_RANGE)
  name = CLASS_NAMES[cls]
  if name == "stripes":
    return (np.mod(u, period) < period / 2).astype(np.float32)
  if name == "checks":
    cell = period / 2
    return (np.mod(np.floor(u / cell) + np.floor(v / cell), 2) == 1).astype(np.float32)
  if name == "dots":
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    return (np.hypot(du, dv) < period * 0.3).astype(np.float32)
  if name == "grid":
    line = max(1.5, period * 0.18)
    return ((np.mod(u, period) < line) | (np.mod(v, period) < line)).astype(np.float32)
  if name == "plain":  # a smooth shading across the object instead of a pattern
    return np.clip(0.5 + 0.5 * np.sin(u / (8 * period)), 0, 1).astype(np.float32) * 0.5
  raise ValueError(cls)


def _two_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  a = rng.uniform(0, 255, 3)
  while True:
    b = rng.uniform(0, 255, 3)
    if np.linalg.norm(a - b) >= MIN_CONTRAST * np.sqrt(3):
      return a.astype(np.float32), b.astype(np.float32)


def generate_example(rng: np.random.Generator, height: int, width: int):
  """One (image uint8 HxWx3, label uint8 HxW) pair."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = _background(rng, y, x)
  label = np.zeros((height, width), np.uint8)
  for _ in range(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1)):
    cls = int(rng.integers(1, NUM_CLASSES))
    for _ in range(20):
      mask = _outline(rng, y, x)
      if mask.any() and (mask & (label > 0)).sum() <= MAX_OVERLAP * mask.sum():
        break
    else:
      continue  # no placement within the occlusion bound: one object fewer
    first, second = _two_colors(rng)
    mix = _pattern(rng, cls, y, x)[..., None]
    surface = first * (1 - mix) + second * mix
    surface += rng.normal(0, OBJECT_GRAIN, surface.shape).astype(np.float32)
    image[mask] = surface[mask]
    label[mask] = cls
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
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Five shape classes on textured backgrounds; train seed 0, val seed 1.",
      "1.1.0": "Image sides 112-128 px (were 96-160).",
      "2.0.0": "Classes are surface patterns (stripes, checks, dots, grid, plain) on random outlines "
               "and colors, over a blotchy, wavy, grainy background (issue 17: learnable in minutes).",
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
