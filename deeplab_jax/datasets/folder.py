"""Your own data: a folder of images, a folder of PNG masks and split lists.

  MANUAL_DIR/images/<id>.jpg (or .jpeg, .png)   RGB, grayscale or RGBA (converted to RGB when read)
  MANUAL_DIR/masks/<id>.png                     class ids as a grayscale or palette PNG, same size
  MANUAL_DIR/<split>.txt                        one <id> per line; each file is a split (train.txt ...)
  MANUAL_DIR/classes.txt                        optional: one class name per line

Built by `python -m deeplab_jax.datasets.prepare folder_segmentation --manual_dir=MANUAL_DIR
--data_dir=DATA_DIR --num_classes=N [--ignore_label=255]`. Every mask value must be a class id below
`num_classes` or `ignore_label`; both are stored with the data and checked against the training config.
Keep one data dir per data set of your own: the builder's name is always `folder_segmentation`.
"""
from __future__ import annotations

import collections
import re

from etils import epath
import tensorflow_datasets as tfds

from deeplab_jax.datasets import manual
from deeplab_jax.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderSegmentation(tfds.core.GeneratorBasedBuilder):
  """Images + PNG masks + split lists from a folder; class count and ignore label given when built."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images, PNG masks and <split>.txt lists from the manual dir."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def __init__(self, *, num_classes: int | None = None, ignore_label: int = 255, **kwargs):
    # None when an already-built data set is loaded: its stored metadata then says.
    self._num_classes, self._ignore_label = num_classes, int(ignore_label)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = (tfds.core.MetadataDict() if self._num_classes is None else
                manual.metadata(self._num_classes, self._ignore_label))
    return self.dataset_info_from_configs(
        description=__doc__, features=manual.features(None), supervised_keys=("image", "segmentation"),
        metadata=metadata)

  def _split_generators(self, dl_manager):
    if self._num_classes is None or not 1 <= self._num_classes <= 256:
      raise ConfigError(f"num_classes={self._num_classes} is not a class count; building "
                        f"folder_segmentation needs --num_classes between 1 and 256")
    if not 0 <= self._ignore_label <= 255:
      raise ConfigError(f"ignore_label={self._ignore_label} does not fit a uint8 mask; use 0..255")
    root = epath.Path(dl_manager.manual_dir)
    for folder in ("images", "masks"):
      if not (root / folder).is_dir():
        raise DataError(f"{root / folder} is missing; {self.name} needs images/, masks/ and "
                        f"<split>.txt lists in {root}")
    lists = sorted(root.glob("*.txt"))
    splits = {path.stem: path for path in lists if path.name != "classes.txt"}
    if not splits:
      raise DataError(f"no split lists in {root}: write train.txt and val.txt (one image id per line)")
    for split in splits:
      if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise DataError(f"split list {splits[split]} has a name TFDS cannot use as a split; rename it "
                        f"to letters, digits and _ only")
    names = root / "classes.txt"
    if names.exists():
      class_names = [line.strip() for line in names.read_text().splitlines() if line.strip()]
      if len(class_names) != self._num_classes:
        raise DataError(f"{names} names {len(class_names)} classes but num_classes="
                        f"{self._num_classes}; make them agree")
      self.info.metadata["class_names"] = class_names
    split_ids = {split: manual.read_ids(path) for split, path in splits.items()}
    for split, ids in split_ids.items():
      repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
      if repeated:
        raise DataError(f"split list {splits[split]} names {repeated[:3]} more than once; list each "
                        f"image once")
    self.info.metadata["largest_image"] = {}
    return {split: self._generate_examples(root, ids, split) for split, ids in split_ids.items()}

  def _generate_examples(self, root: epath.Path, ids, split: str):
    # Each split's largest (height, width), stored with the data: training says before its first
    # step whether validation images will go through the sliding window (train._sliding_window_line).
    largest = self.info.metadata["largest_image"].setdefault(split, [0, 0])
    for image_id in ids:
      candidates = [root / "images" / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
      image = next((path for path in candidates if path.exists()), None)
      if image is None:
        raise DataError(f"no image for {image_id!r} in {root / 'images'} (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}); add it or remove the id from the split list")
      where = root / "masks" / f"{image_id}.png"
      label = manual.check_labels(manual.read_label_png(where), self._num_classes,
                                  self._ignore_label, where)
      encoded = image.read_bytes()
      manual.check_sizes(encoded, label, image, where)
      largest[:] = [max(largest[0], label.shape[0]), max(largest[1], label.shape[1])]
      yield image_id, {"image": encoded, "segmentation": manual.encode_png(label),
                       "file_name": image_id}
