"""Small fake downloads in the real layouts (tar / tgz / zip structure, palette PNGs, SBD `.mat` files,
Cityscapes `*_gtFine_labelIds.png`), so every builder runs its real reading code in tests.

Image k is filled with the value `image_value(k)` and its label map with `label_pattern(k, ...)`, so a
test can tell which image and which mask ended up in an example.
"""
from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image
import scipy.io


DISTINCT_IMAGES = 34  # image values 7 apart, so JPEG's small errors cannot confuse two images


def image_value(k: int) -> int:
  assert 0 <= k < DISTINCT_IMAGES, k
  return 10 + 7 * k


def label_pattern(k: int, values, shape) -> np.ndarray:
  """A label map that uses every entry of `values`, in an order that depends on k."""
  values = np.asarray(values)
  flat = np.resize(np.roll(values, k), shape[0] * shape[1])
  return flat.reshape(shape).astype(np.uint8)


def _png(array: np.ndarray, palette: bool = False) -> bytes:
  image = Image.fromarray(array)
  if palette:  # as VOC's masks: the pixel values are palette indices (the colors do not matter)
    image = Image.frombytes("P", array.shape[::-1], np.ascontiguousarray(array).tobytes())
    image.putpalette([(i * 37) % 256 for i in range(768)])
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _jpeg(k: int, shape) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((*shape, 3), image_value(k), np.uint8)).save(buffer, format="JPEG",
                                                                          quality=95)
  return buffer.getvalue()


def _mat(label: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {"GTcls": {"Segmentation": label, "Boundaries": np.zeros((1, 1)),
                                      "CategoriesPresent": np.unique(label[label > 0])}})
  return buffer.getvalue()


def _add(archive, name: str, data: bytes) -> None:
  if isinstance(archive, zipfile.ZipFile):
    archive.writestr(name, data)
  else:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _ids(text) -> bytes:
  return "".join(f"{i}\n" for i in text).encode()


VOC_SHAPE = (9, 11)
# train_aug = VOC train + SBD train + SBD val - VOC val = {0, 1, 2, 3} + {7, 8, 9} (4 and 5 are val).
VOC_SPLITS = dict(voc_train=[0, 1, 2, 3], voc_val=[4, 5, 6], sbd_train=[1, 4, 7, 8], sbd_val=[2, 9, 5])


def voc_id(k: int) -> str:
  return f"2008_{k:06d}"


def make_voc(manual_dir, voc_train, voc_val, sbd_train, sbd_val) -> None:
  """VOCtrainval_11-May-2012.tar and benchmark.tgz over image numbers k (ids `voc_id(k)`).

  VOC masks (for VOC train and val images) use ids 0..20 and 255; SBD masks (every SBD image) use
  0..20 only, so a test can tell which one an example got. VOC's JPEGImages holds every image, as the
  real one does.
  """
  os.makedirs(manual_dir, exist_ok=True)
  everything = sorted(set(voc_train) | set(voc_val) | set(sbd_train) | set(sbd_val))
  with tarfile.open(os.path.join(manual_dir, "VOCtrainval_11-May-2012.tar"), "w") as tar:
    root = "VOCdevkit/VOC2012"
    for k in everything:
      _add(tar, f"{root}/JPEGImages/{voc_id(k)}.jpg", _jpeg(k, VOC_SHAPE))
    for k in sorted(set(voc_train) | set(voc_val)):
      label = label_pattern(k, list(range(21)) + [255], VOC_SHAPE)
      _add(tar, f"{root}/SegmentationClass/{voc_id(k)}.png", _png(label, palette=True))
    lists = f"{root}/ImageSets/Segmentation"
    _add(tar, f"{lists}/train.txt", _ids(map(voc_id, voc_train)))
    _add(tar, f"{lists}/val.txt", _ids(map(voc_id, voc_val)))
    _add(tar, f"{lists}/trainval.txt", _ids(map(voc_id, list(voc_train) + list(voc_val))))
  with tarfile.open(os.path.join(manual_dir, "benchmark.tgz"), "w:gz") as tgz:
    root = "benchmark_RELEASE/dataset"
    for k in sorted(set(sbd_train) | set(sbd_val)):
      _add(tgz, f"{root}/img/{voc_id(k)}.jpg", _jpeg(k, VOC_SHAPE))
      _add(tgz, f"{root}/cls/{voc_id(k)}.mat", _mat(label_pattern(k, range(21), VOC_SHAPE)))
    _add(tgz, f"{root}/train.txt", _ids(map(voc_id, sbd_train)))
    _add(tgz, f"{root}/val.txt", _ids(map(voc_id, sbd_val)))


ADE_SHAPE = (13, 12)  # room for all 151 values


def make_ade20k(manual_dir, num_train: int, num_val: int) -> None:
  """ADEChallengeData2016.zip: grayscale annotation PNGs with values 0..150."""
  os.makedirs(manual_dir, exist_ok=True)
  with zipfile.ZipFile(os.path.join(manual_dir, "ADEChallengeData2016.zip"), "w") as zf:
    root = "ADEChallengeData2016"
    for folder, prefix, count, offset in (("training", "ADE_train", num_train, 0),
                                          ("validation", "ADE_val", num_val, 20)):
      for k in range(count):
        name = f"{prefix}_{k + 1:08d}"
        _add(zf, f"{root}/images/{folder}/{name}.jpg", _jpeg(offset + k, ADE_SHAPE))
        _add(zf, f"{root}/annotations/{folder}/{name}.png",
             _png(label_pattern(offset + k, range(151), ADE_SHAPE)))
    _add(zf, f"{root}/objectInfo150.txt", b"Idx\tRatio\tTrain\tVal\tName\n")


CITYSCAPES_SHAPE = (6, 12)
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}


def make_cityscapes(manual_dir, per_city: int = 2) -> None:
  """leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip with label ids 0..33 in every mask.

  The real images are 1024x2048; TFDS's builder stores the files' bytes as they are, so small ones
  exercise the same code.
  """
  os.makedirs(manual_dir, exist_ok=True)
  with zipfile.ZipFile(os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip"), "w") as left, \
      zipfile.ZipFile(os.path.join(manual_dir, "gtFine_trainvaltest.zip"), "w") as fine:
    k = 0
    for split, cities in CITIES.items():
      for city in cities:
        for n in range(per_city):
          stem = f"{city}_{n:06d}_000019"
          image = np.full((*CITYSCAPES_SHAPE, 3), image_value(k), np.uint8)
          _add(left, f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(image))
          label = label_pattern(k, range(34), CITYSCAPES_SHAPE)
          _add(fine, f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", _png(label))
          _add(fine, f"gtFine/{split}/{city}/{stem}_gtFine_color.png", _png(image))
          k += 1


def make_folder(manual_dir, splits: dict[str, int], shape=(10, 14), num_classes: int = 4,
                ignore_label: int = 255, kinds=("jpg", "png"), sizes: dict | None = None) -> None:
  """images/, masks/ and <split>.txt: image k is `image_value(k)` gray, its mask uses every class and
  the ignore label. Images alternate between the formats in `kinds` (a PNG one is RGBA). Image k is
  `shape`, or `sizes[k]` where given."""
  for sub in ("images", "masks"):
    os.makedirs(os.path.join(manual_dir, sub), exist_ok=True)
  default_shape, k = shape, 0
  for split, count in splits.items():
    ids = []
    for _ in range(count):
      name = f"img_{k:04d}"
      kind = kinds[k % len(kinds)]
      shape = (sizes or {}).get(k, default_shape)
      path = os.path.join(manual_dir, "images", f"{name}.{kind}")
      if kind == "jpg":
        with open(path, "wb") as f:
          f.write(_jpeg(k, shape))
      else:
        Image.fromarray(np.full((*shape, 4), image_value(k), np.uint8)).save(path)
      label = label_pattern(k, list(range(num_classes)) + [ignore_label], shape)
      with open(os.path.join(manual_dir, "masks", f"{name}.png"), "wb") as f:
        f.write(_png(label))
      ids.append(name)
      k += 1
    with open(os.path.join(manual_dir, f"{split}.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
