"""Readers for the files pretrained weights come in: {name: numpy array}, without torch.

safetensors (timm's hub files) and PyTorch's zip `torch.save` files (torchvision's `.pth`) are read
here directly, so converting needs neither torch nor timm; official TF DeepLab checkpoints (a TF1
`model.ckpt` prefix) through the installed TensorFlow. Every path may be local or gs://. A file that
is truncated, corrupt or not what its name says is a WeightsError naming it.
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile

from etils import epath
import ml_dtypes
import numpy as np

from deeplab_jax.errors import WeightsError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """The safetensors layout: an 8-byte little-endian header size, a JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
  data = epath.Path(path).read_bytes()
  if len(data) < 8:
    raise WeightsError(f"{path} is not a safetensors file (only {len(data)} bytes); download it again")
  (header_size,) = struct.unpack("<Q", data[:8])
  if header_size > len(data) - 8:
    raise WeightsError(f"{path} is truncated or not a safetensors file (its header claims "
                       f"{header_size} bytes, the file has {len(data)}); download it again")
  try:
    header = json.loads(data[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise WeightsError(f"{path} is not a safetensors file (its header is not JSON)") from None
  body = memoryview(data)[8 + header_size:]
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
      raise WeightsError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, which is not supported")
    begin, end = entry["data_offsets"]
    if end > len(body):
      raise WeightsError(f"{path} is truncated: tensor {name} ends at byte {end} of a "
                         f"{len(body)}-byte body; download it again")
    tensors[name] = np.frombuffer(body[begin:end], dtype).reshape(entry["shape"]).copy()
  return tensors


# PyTorch zip files: `archive/data.pkl` pickles the objects; tensors point at raw storages
# `archive/data/<key>` through persistent ids. Only the classes below may be named by the pickle:
# a state dict cannot run code here (what torch.load(weights_only=True) allows, without torch).
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                         tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _TorchUnpickler(pickle.Unpickler):
  def __init__(self, file, storages):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(np.dtype(_TORCH_STORAGE_DTYPES[name]))
    raise WeightsError(f"the file pickles {module}.{name}, which a plain state dict does not hold; "
                       f"save `model.state_dict()` (or a safetensors file) instead")

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise WeightsError(f"unsupported storage {pid!r} in the file; save a plain state dict")
    return self._storages(str(key), storage_type.dtype, int(numel))


def read_torch(path) -> dict[str, np.ndarray]:
  """A `torch.save` zip file (torch >= 1.6) holding a state dict, or a training checkpoint that holds
  one under 'state_dict', 'model' or 'state_dict_ema'; DistributedDataParallel's 'module.' prefix is
  dropped."""
  data = epath.Path(path).read_bytes()
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
  except zipfile.BadZipFile:
    hint = ("an old pickle-only torch file: re-save it with torch >= 1.6" if data[:2] == b"\x80\x02"
            else "truncated or not a PyTorch file")
    raise WeightsError(f"{path} is {hint}; download it again or convert it to safetensors") from None
  pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
  if not pickles:
    raise WeightsError(f"{path} is a zip file without data.pkl: not a torch.save file")
  prefix = pickles[0][:-len("data.pkl")]
  byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
  if byteorder != "little":
    raise WeightsError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")

  def storage(key, dtype, numel):
    raw = archive.read(f"{prefix}data/{key}")
    if len(raw) < numel * dtype.itemsize:
      raise WeightsError(f"{path} is truncated (storage {key}); download it again")
    return np.frombuffer(raw, dtype, count=numel)

  try:
    obj = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), storage).load()
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError) as e:
    raise WeightsError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download it "
                       f"again") from None
  for key in ("state_dict", "model", "state_dict_ema"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
  tensors = {}
  for name, value in obj.items():
    if isinstance(value, np.ndarray):
      tensors[name[len("module."):] if name.startswith("module.") else name] = value
  return tensors


def read_tf_checkpoint(prefix) -> dict[str, np.ndarray]:
  """A TF1 name-based checkpoint (`model.ckpt` for model.ckpt.index + .data-*), every variable."""
  import tensorflow as tf
  try:
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
  # A truncated .data file surfaces as IndexError ("Read less bytes than requested").
  except (tf.errors.OpError, ValueError, IndexError) as e:
    detail = " ".join(str(e).split())[:200]
    raise WeightsError(f"{prefix} is not a readable TF checkpoint ({type(e).__name__}: {detail}); give "
                       f"the prefix (model.ckpt for model.ckpt.index and model.ckpt.data-*) of a "
                       f"complete download") from None


def read_pytorch_weights(path) -> dict[str, np.ndarray]:
  """safetensors or torch.save, by content (hub files are often renamed)."""
  with epath.Path(path).open("rb") as f:
    head = f.read(4)
  if head[:2] == b"PK" or head[:2] == b"\x80\x02":
    return read_torch(path)
  return read_safetensors(path)
