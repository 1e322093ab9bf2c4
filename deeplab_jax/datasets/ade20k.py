"""ADE20K, the SceneParsing benchmark's 150 classes (SPEC section 10), from ADEChallengeData2016.zip.

Splits `train` (20,210) and `validation` (2,000). Annotation value 0 ("other objects") becomes 255
(ignored) and 1..150 become 0..149, as the official DeepLab setup trains on it. TFDS's `scene_parse150`
reads the instance maps instead, hence this builder.
"""
from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.datasets import manual
from deeplab_jax.errors import DataError

NUM_CLASSES = 150
ARCHIVE, ROOT = "ADEChallengeData2016.zip", "ADEChallengeData2016"
SPLITS = {"train": "training", "validation": "validation"}
# 0 -> 255, k -> k - 1; the unused values 151..255 map to 255 and are refused by the value check first.
LABEL_TABLE = np.concatenate([[255], np.arange(NUM_CLASSES), np.full(255 - NUM_CLASSES, 255)]).astype(
    np.uint8)

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing (150 classes, 0 = other -> 255): `train`, `validation`."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "150 classes, label 0 mapped to 255 and 1..150 to 0..149."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put {ARCHIVE} (http://data.csail.mit.edu/places/ADEchallenge/{ARCHIVE}) or its extracted "
      f"{ROOT}/ folder in the manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__, features=manual.features("jpeg"),
        supervised_keys=("image", "segmentation"),
        homepage="http://sceneparsing.csail.mit.edu/", metadata=manual.metadata(NUM_CLASSES))

  def _split_generators(self, dl_manager):
    root = manual.source_root(epath.Path(dl_manager.manual_dir), ARCHIVE, ROOT, dl_manager)
    return {split: self._generate_examples(root, folder) for split, folder in SPLITS.items()}

  def _generate_examples(self, root: epath.Path, folder: str):
    images, annotations = root / "images" / folder, root / "annotations" / folder
    if not images.is_dir():
      raise DataError(f"{images} is missing; {ARCHIVE} is incomplete, download it again")
    for image in sorted(images.glob("*.jpg")):
      where = annotations / f"{image.stem}.png"
      raw = manual.read_label_png(where)
      manual.check_labels(raw, NUM_CLASSES + 1, 255, where)
      encoded = image.read_bytes()
      manual.check_sizes(encoded, raw, image, where)
      yield image.stem, {"image": encoded, "segmentation": manual.encode_png(LABEL_TABLE[raw]),
                         "file_name": image.stem}
