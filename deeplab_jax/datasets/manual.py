"""What the manual-download builders share: finding an archive or its extracted folder, reading and
checking label maps, the common features.

Builders accept either the archive as downloaded or the folder it extracts to, so a user who already
unpacked VOC does not need the 2 GB tar again.
"""
from __future__ import annotations

import io

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from deeplab_jax.errors import DataError


def features(image_format: str | None = "jpeg") -> tfds.features.FeaturesDict:
  """`image` (H, W, 3), `segmentation` (H, W, 1) class ids, `file_name`: the same for every data set."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
      "segmentation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "file_name": tfds.features.Text(),
  })


def metadata(num_classes: int, ignore_label: int = 255, **extra) -> tfds.core.MetadataDict:
  """Stored beside the data, so a config whose class count does not fit is caught before training."""
  return tfds.core.MetadataDict(num_classes=int(num_classes), ignore_label=int(ignore_label), **extra)


def source_root(manual_dir: epath.Path, archive: str, inner: str, dl_manager) -> epath.Path:
  """`inner` inside `manual_dir/archive` (extracted by TFDS), or `manual_dir/inner` if already unpacked."""
  unpacked = manual_dir / inner
  if unpacked.is_dir():
    return unpacked
  path = manual_dir / archive
  if not path.exists():
    raise DataError(f"{path} is missing (nor is {unpacked} there); see `python -m "
                    f"deeplab_jax.datasets.prepare --help` for where to download it")
  root = epath.Path(dl_manager.extract(path)) / inner
  if not root.is_dir():
    raise DataError(f"{path} does not hold {inner}/: it is not the expected archive, or it is "
                    f"corrupt; download it again")
  return root


def present(manual_dir: epath.Path, archive: str, inner: str | None) -> bool:
  """What `source_root` accepts: the archive, or (when there is one) its extracted folder."""
  return (manual_dir / archive).exists() or bool(inner and (manual_dir / inner).is_dir())


def read_ids(path: epath.Path) -> list[str]:
  """A split list (one image id per line, VOC style)."""
  if not path.exists():
    raise DataError(f"split list {path} is missing; the archive is incomplete, download it again")
  return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_label_png(path: epath.Path) -> np.ndarray:
  """Class ids (H, W) from a palette ('P') or grayscale ('L') PNG; a color mask is refused."""
  if not path.exists():
    raise DataError(f"label map {path} is missing; the data is incomplete, download or add it")
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
      if image.mode not in ("P", "L"):
        raise DataError(f"label map {path} is a {image.mode} image; masks must hold class ids as a "
                        f"palette or grayscale PNG, not colors")
      return np.asarray(image, np.uint8)
  except (OSError, SyntaxError) as e:
    raise DataError(f"label map {path} cannot be read ({e}); replace the file") from None


def check_labels(label: np.ndarray, num_classes: int, ignore_label: int, where) -> np.ndarray:
  """Labels are class ids or `ignore_label`; anything else is a corrupt file or a wrong class count."""
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != ignore_label)]
  if bad.size:
    raise DataError(f"label map {where} has values {bad.tolist()[:5]} outside 0..{num_classes - 1} "
                    f"and {ignore_label}; fix the file or set num_classes / ignore_label to match")
  return label


def check_sizes(encoded_image: bytes, label: np.ndarray, image_path, label_path) -> None:
  """The image (size read from its header) and its label map cover the same pixels."""
  try:
    with Image.open(io.BytesIO(encoded_image)) as image:
      width, height = image.size
  except (OSError, SyntaxError) as e:
    raise DataError(f"image {image_path} cannot be read ({e}); replace the file") from None
  if (height, width) != label.shape[:2]:
    raise DataError(f"image {image_path} is {height}x{width} but its label map {label_path} is "
                    f"{label.shape[0]}x{label.shape[1]}; they must match pixel for pixel")


def encode_png(label: np.ndarray) -> bytes:
  """A single-channel PNG of class ids (what the `segmentation` feature stores)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(label, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()

