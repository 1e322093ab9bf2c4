"""PASCAL VOC 2012 segmentation with the SBD extra annotations (SPEC section 10).

Manual download: VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz (or their extracted VOCdevkit/ and
benchmark_RELEASE/ folders) in the manual dir. Splits:
  train      1,464  VOC's SegmentationClass palette PNGs (255 marks borders and "difficult" regions)
  val        1,449  the same
  train_aug 10,582  VOC train + SBD train + SBD val, minus every VOC val image
train_aug takes VOC's mask where VOC has one (finer, with its 255 borders) and SBD's `.mat` mask
otherwise (no 255). Images come from VOC's JPEGImages, which holds every SBD image; SBD's img/ is
the fallback.
"""
from __future__ import annotations

import io

from etils import epath
import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from deeplab_jax.datasets import manual
from deeplab_jax.errors import DataError

NUM_CLASSES = 21
VOC_ARCHIVE, VOC_ROOT = "VOCtrainval_11-May-2012.tar", "VOCdevkit/VOC2012"
SBD_ARCHIVE, SBD_ROOT = "benchmark.tgz", "benchmark_RELEASE/dataset"


def read_sbd_mat(path: epath.Path) -> np.ndarray:
  """Class ids (H, W) from an SBD `cls/*.mat` file (MATLAB struct GTcls with field Segmentation)."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(path.read_bytes()), squeeze_me=True, struct_as_record=False)
    return np.asarray(mat["GTcls"].Segmentation, np.uint8)
  except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
    raise DataError(f"SBD label {path} cannot be read ({type(e).__name__}: {e}); the archive is "
                    f"corrupt, download benchmark.tgz again") from None


class Voc2012Segmentation(tfds.core.GeneratorBasedBuilder):
  """VOC 2012 + SBD semantic segmentation: `train`, `val`, `train_aug`."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "train, val and train_aug (VOC masks preferred over SBD's)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put {VOC_ARCHIVE} (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and {SBD_ARCHIVE} "
      "(http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
      "benchmark.tgz) in the manual dir, or their extracted VOCdevkit/ and benchmark_RELEASE/ folders.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__, features=manual.features("jpeg"),
        supervised_keys=("image", "segmentation"),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        metadata=manual.metadata(NUM_CLASSES))

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    voc = manual.source_root(manual_dir, VOC_ARCHIVE, VOC_ROOT, dl_manager)
    sbd = manual.source_root(manual_dir, SBD_ARCHIVE, SBD_ROOT, dl_manager)
    lists = voc / "ImageSets" / "Segmentation"
    train, val = manual.read_ids(lists / "train.txt"), manual.read_ids(lists / "val.txt")
    sbd_ids = manual.read_ids(sbd / "train.txt") + manual.read_ids(sbd / "val.txt")
    excluded = set(val)
    aug, seen = [], set()
    for image_id in train + sbd_ids:
      if image_id not in excluded and image_id not in seen:
        seen.add(image_id)
        aug.append(image_id)
    with_voc_mask = set(train)
    return {
        "train": self._generate_examples(voc, sbd, train, set(train)),
        "val": self._generate_examples(voc, sbd, val, set(val)),
        "train_aug": self._generate_examples(voc, sbd, sorted(aug), with_voc_mask),
    }

  def _generate_examples(self, voc: epath.Path, sbd: epath.Path, ids, with_voc_mask):
    for image_id in ids:
      image = voc / "JPEGImages" / f"{image_id}.jpg"
      if not image.exists():
        image = sbd / "img" / f"{image_id}.jpg"
      if not image.exists():
        raise DataError(f"no image for {image_id}: neither {voc}/JPEGImages nor {sbd}/img holds "
                        f"{image_id}.jpg; the archives are incomplete, download them again")
      if image_id in with_voc_mask:
        where = voc / "SegmentationClass" / f"{image_id}.png"
        label = manual.read_label_png(where)
      else:
        where = sbd / "cls" / f"{image_id}.mat"
        label = read_sbd_mat(where)
      manual.check_labels(label, NUM_CLASSES, 255, where)
      encoded = image.read_bytes()
      manual.check_sizes(encoded, label, image, where)
      yield image_id, {"image": encoded, "segmentation": manual.encode_png(label),
                       "file_name": image_id}
