"""The device mesh and where arrays live on it: batches split over `data`, parameters by rule.

Every device is on the `data` axis. Parameters are replicated, or with `config.mesh.param_sharding=
"fsdp"` the large ones (and their optimizer state) are split over `data` along their largest divisible
dimension; XLA inserts the gathers. BatchNorm then normalizes over the global batch with no extra code:
the jitted step is written for the global batch and XLA reduces across devices (synchronized BN).
"""
from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from deeplab_jax.errors import ConfigError

DATA = "data"


def create_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(mesh_utils.create_device_mesh((len(devices),), devices=devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, field: str) -> None:
  size = mesh.shape[DATA]
  if batch_size % size:
    raise ConfigError(f"{field}={batch_size} is not divisible by the {size} devices of the data axis; "
                      f"use a multiple of {size}")


def param_spec(shape, data_size: int, mode: str, min_size: int) -> P:
  """Replicated, or split along the largest dimension that `data_size` divides (fsdp)."""
  if mode == "replicated" or data_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % data_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, mode: str = "replicated", min_size: int = 2**18):
  """A NamedSharding per leaf of an abstract (eval_shape) train state."""
  data_size = mesh.shape[DATA]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x.shape, data_size, mode, min_size)), abstract_state)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target sharding (what Orbax restores onto)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's slice of the batch -> one global array per key, split over `data`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array split over `data`, in order: what `to_global` made of its local
  batch, back on the host."""
  shards = {s.index[0].start or 0: s for s in array.addressable_shards}  # one per row range
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
