"""Orbax checkpoints of the train state in `<workdir>/checkpoints`: save with a fingerprint of every
array, keep the last K, restore onto whatever mesh the current run has (a state saved on 8 devices
restores on 1), and skip a damaged newest checkpoint for the newest one that reads back intact.

Orbax's atomic save protects against a crash during our own save, not against damage after it (an
interrupted `gsutil cp` or rsync of a workdir, a full disk elsewhere, a half-synced bucket, a flipped
bit): `restore_newest` checks the commit marker, the file sizes recorded after the save, the
metadata, the arrays' readability and their fingerprints, and takes the newest step that passes all."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import re
import sys

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deeplab_jax.errors import CheckpointError

STATE, INTEGRITY = "default", "integrity"  # the items of a step folder ("default": older checkpoints' only one)
COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, local paths and gs:// alike
DAMAGED = ".damaged"  # `<step>.damaged`: a damaged step moved aside (orbax lists only numeric names)
FINGERPRINT = "uint32x2-position-weighted-sums-v1"
SIZES = "file_sizes.json"  # {path in the step folder: bytes}, written once the step's save finished


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's own handler and format, with one writer per array: orbax's default splits each
  replicated array into one slice per replica so that several hosts share its writing, and slices
  them with one small compiled op per array shape; the first save of the shapes state on 4 CPU
  devices blocked training for 9.3 s doing so (2,088 slices), 0.25 s with one writer. The largest
  state here (Xception-65 with momentum, 330 MB) is written in the background either way."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      *((t, ocp.type_handlers.ScalarHandler()) for t in (int, float, bytes, np.number)),
      (str, ocp.type_handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def create_manager(workdir, *, keep: int | None = 3, async_save: bool = True,
                   create: bool = True) -> ocp.CheckpointManager:
  """Readers (inference) pass `keep=None` (never delete) and `create=False` (never make the folder)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_handlers={STATE: _state_handler(),
                                              INTEGRITY: ocp.JsonCheckpointHandler()})


# --- fingerprints ----------------------------------------------------------------------------------

def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


_M1, _A1, _X2, _M2 = 0x9E3779B1, 0x7F4A7C15, 0x5BD1E995, 0x85EBCA6B


def _leaf_hash(x, xp=jnp):
  """Two uint32 sums of the array's bits, each bit pattern weighted by an odd function of its
  position: a single flipped bit anywhere changes both (2^k times an odd weight is never 0 modulo
  2^32), swapped entries change them, and integer sums wrap exactly in any order, so the value is
  the same on any mesh, sharding or number of processes that holds the array. `xp`: jnp (on the
  array's devices) or np (in host memory); both compute the same integers."""
  u32 = xp.uint32
  if x.dtype == xp.bool_:
    x = x.astype(xp.uint8)
  unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32, 8: xp.uint32}[x.dtype.itemsize]
  bits = (jax.lax.bitcast_convert_type(x, unsigned) if xp is jnp else x.view(unsigned))
  bits = bits.reshape(-1).astype(u32)
  position = xp.arange(bits.size, dtype=u32)
  w1 = (position * u32(_M1) + u32(_A1)) | u32(1)
  w2 = ((position ^ u32(_X2)) * u32(_M2)) | u32(1)
  mixed = bits ^ (bits >> u32(15))
  return xp.stack([xp.sum(bits * w1, dtype=u32), xp.sum(mixed * w2, dtype=u32)])


_hashers: dict = {}


def _hasher(x):
  """`_leaf_hash` jitted with its result replicated over the array's mesh (every process reads it).
  One program per array shape, not one for the whole state: the Xception-65 state's 1,174 arrays
  have 38 shapes, and one program over all of them took 17 s to compile on 2 CPU cores."""
  sharding = getattr(x, "sharding", None)
  mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
  if mesh not in _hashers:
    _hashers[mesh] = jax.jit(_leaf_hash, out_shardings=None if mesh is None else
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return _hashers[mesh]


def _in_host_memory(x) -> bool:
  return isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and x.is_fully_addressable and
                                       all(d.platform == "cpu" for d in x.devices()))


def fingerprints(tree) -> dict[str, str]:
  """{array name: 16 hex digits} of every array in `tree`. Arrays already in this process's host
  memory are hashed by NumPy (no compile: one program per shape cost 3.8 s for the shapes state on
  2 cores, at every start); arrays on accelerators, or spread over processes, where they are."""
  named = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    named.append((path, x))
  values = [_leaf_hash(np.asarray(x).reshape(-1), np) if _in_host_memory(x) else
            _hasher(jnp.asarray(x))(jnp.asarray(x)) for _, x in named]
  values = jax.device_get(values)
  return {_name(path): f"{int(a):08x}{int(b):08x}" for (path, _), (a, b) in zip(named, values)}


# --- save ------------------------------------------------------------------------------------------

def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """The state and, in the same atomic step folder, its fingerprints (computed before the write).
  Orbax waits here for the previous save to finish, so that one's file sizes are recorded now."""
  record = {"fingerprint": FINGERPRINT, "arrays": fingerprints(state)}
  manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state),
                                                INTEGRITY: ocp.args.JsonSave(record)}), force=True)
  record_sizes(manager, exclude=step)


def _files(folder: epath.Path) -> list[epath.Path]:
  """Every file under `folder` (epath refuses recursive globs, for gs:// listing costs)."""
  found = []
  for path in folder.iterdir():
    found.extend(_files(path) if path.is_dir() else [path])
  return found


def record_sizes(manager: ocp.CheckpointManager, exclude: int | None = None,
                 only: int | None = None) -> None:
  """Write the newest finished steps' file sizes next to them (process 0), so that a file cut short
  or lost later (an interrupted copy) is named on restore before anything is read. Call after
  `wait_until_finished` for the last one; `only`: that step alone. Outside orbax's atomic commit: a
  step without the record (a run killed before its next save) still restores, damage to it is found
  by reading, and training records it once it has read the step back intact."""
  if jax.process_index() != 0:
    return
  steps = [only] if only is not None else sorted(
      (s for s in manager.all_steps() if s != exclude), reverse=True)[:2]
  for step in steps:
    folder = manager.directory / str(step)
    if (folder / SIZES).exists() or not (folder / COMMIT_MARKER).exists():
      continue
    try:
      sizes = {str(p.relative_to(folder)): p.stat().length for p in _files(folder)}
      (folder / SIZES).write_text(json.dumps(sizes, sort_keys=True))
    except Exception as e:  # noqa: BLE001 - OSError, or TensorFlow's for gs://: best effort only
      logging.warning("could not record the file sizes of %s (%s)", folder, e)


# --- restore ---------------------------------------------------------------------------------------

class _Damaged(Exception):
  """A checkpoint that cannot be read back as it was written: "file or array: why"."""

  def __init__(self, what: str, why: str):
    super().__init__(f"{what}: {why}")


def _model_shapes(tree) -> dict[str, tuple]:
  """{'params/backbone/.../kernel': shape} of the params and batch_stats in a state-like tree."""
  return {_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if path and _name(path[:1]) in ("params", "batch_stats")}


def _stored_metadata(manager, step: int):
  where = manager.directory / str(step)
  try:
    return manager.item_metadata(step)[STATE]
  except Exception as e:  # noqa: BLE001 - unreadable metadata is damage, whatever orbax raised
    raise _Damaged(str(_file_in(e, where) or where / STATE / "_METADATA"), _short(e)) from None


def check_fits(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """Compare the model's parameter shapes before reading any data, so a mismatch is one clear line
  (and no half-started asynchronous reads are left behind)."""
  stored = _model_shapes(_stored_metadata(manager, step))
  wanted = _model_shapes({"params": abstract_state.params, "batch_stats": abstract_state.batch_stats})
  where = manager.directory / str(step)
  if not stored:
    raise _Damaged(str(where / STATE / "_METADATA"), "it lists no parameters")
  for name in sorted(wanted):
    if name not in stored:
      raise CheckpointError(f"the checkpoint at {where} has no {name}: it was trained with another "
                            f"model config; use that config (its workdir's config.json)")
    if stored[name] != wanted[name]:
      raise CheckpointError(f"the checkpoint at {where} has {name} of shape {stored[name]} but this "
                            f"config's model needs {wanted[name]}; use the config it was trained with")
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise CheckpointError(f"the checkpoint at {where} has {extra[0]}, which this config's model lacks; "
                          f"use the config it was trained with")


def _short(e: BaseException) -> str:
  """The innermost cause's message (TensorStore's own, under orbax's wrapper), on one line."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return " ".join(str(e).split())[:300] or type(e).__name__


def _recorded_sizes(where: epath.Path) -> dict[str, int]:
  try:
    return json.loads((where / SIZES).read_text()) if (where / SIZES).exists() else {}
  except (OSError, ValueError):
    return {}


def _size_damage(where: epath.Path) -> str | None:
  """A file missing or of another size than recorded after the save ("path (why)"), or None."""
  for name, size in sorted(_recorded_sizes(where).items()):
    path = where / name
    if not path.exists():
      return f"{path} (missing; {size} bytes when saved)"
    if path.stat().length != size:
      return f"{path} ({path.stat().length} bytes; {size} when saved)"
  return None


def _file_in(e: BaseException, where: epath.Path) -> str | None:
  """The damaged file or array an error points at: an empty file (a step without recorded sizes),
  else the array TensorStore could not read."""
  if not _recorded_sizes(where) and where.exists():
    for path in sorted(_files(where)):
      if path.stat().length == 0:
        return f"{path} (empty)"
  found = re.search(r'Error reading "([^"/]+)[^"]*"', _short(e))
  return f"{where / STATE} (array {found.group(1).replace('.', '/')})" if found else None


@contextlib.contextmanager
def _abandoned_reads_quiet():
  """A failed restore leaves orbax's other array reads as coroutines that raised and were never
  awaited; Python prints each one's traceback when it is collected (135 for one damaged file of the
  shapes state). The one warning line says it all: collect them here, without printing."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (asyncio.iscoroutine(unraisable.object) and isinstance(unraisable.exc_value, Exception)):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


def _read(manager, step: int, abstract_state, *, partial: bool = False):
  """The state at `step` (with `partial`, only the arrays `abstract_state` names, as host arrays),
  verified: _Damaged on a missing commit marker, unreadable metadata or arrays, or a fingerprint
  that differs from the one saved."""
  where = manager.directory / str(step)
  if not (where / COMMIT_MARKER).exists():
    raise _Damaged(str(where), f"it has no commit marker ({COMMIT_MARKER}): its save or copy did "
                               f"not finish")
  # Files cut short or lost are found from their recorded sizes before orbax reads anything: a
  # failed orbax read leaves TensorStore callbacks that print one traceback each (hundreds).
  if (damage := _size_damage(where)) is not None:
    raise _Damaged(damage, "its size differs from the one recorded after the save")
  if not partial:
    check_fits(manager, step, abstract_state)
  verified = (where / INTEGRITY).exists()
  restore_args = (jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_state)
                  if partial else ocp.checkpoint_utils.construct_restore_args(abstract_state))
  args = {STATE: ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args,
                                        partial_restore=partial)}
  if verified:
    args[INTEGRITY] = ocp.args.JsonRestore()
  damage = None
  with _abandoned_reads_quiet():
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
      state = jax.block_until_ready(restored[STATE])
    except Exception as e:  # noqa: BLE001 - the shapes fit (check_fits): what fails now is the files
      damage = _Damaged(str(_file_in(e, where) or where / STATE), _short(e))
  if damage is not None:
    raise damage
  if not verified:
    logging.info("%s was written before checkpoints carried fingerprints: not verified", where)
    return state
  record = restored[INTEGRITY]
  if not isinstance(record, dict) or record.get("fingerprint") != FINGERPRINT:
    raise _Damaged(str(where / INTEGRITY), "its fingerprint record is unreadable")
  stored = record.get("arrays", {})
  for name, value in fingerprints(state).items():
    if stored.get(name) != value:
      raise _Damaged(f"{where / STATE} (array {name})",
                     "its values differ from those saved (fingerprint mismatch: silent corruption)")
  return state


def _all_agree(ok: bool) -> bool:
  """Every process restores the same step: damage seen by one (a file only it reads) counts for all."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


@dataclasses.dataclass
class Restored:
  state: object
  step: int


def steps(manager) -> list[int]:
  """Every step a checkpoint folder exists for, newest first, damaged or not: orbax's finalized
  steps and numeric folders it skips (gs:// ones without a commit marker), which `_read` reports."""
  steps = set(manager.all_steps())
  if manager.directory.exists():
    steps |= {int(p.name) for p in manager.directory.iterdir() if p.name.isdigit()}
  return sorted(steps, reverse=True)


def _move_aside(manager, step: int) -> epath.Path:
  source = manager.directory / str(step)
  target, k = manager.directory / f"{step}{DAMAGED}", 1
  while target.exists():
    k += 1
    target = manager.directory / f"{step}{DAMAGED}-{k}"
  source.rename(target)
  return target


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """The state at exactly `step`, placed per the shardings carried by `abstract_state`'s leaves; a
  damaged one is a CheckpointError naming the file, never a fallback."""
  try:
    return _read(manager, step, abstract_state)
  except _Damaged as e:
    others = [s for s in steps(manager) if s != step]
    hint = (f"choose another step ({', '.join(map(str, others))}) or leave the step out to take the "
            f"newest intact one" if others else "restore the workdir from a copy")
    raise CheckpointError(f"the checkpoint at step {step} is damaged: {e}; {hint}") from None


def restore_newest(manager: ocp.CheckpointManager, abstract_state, *,
                   move_aside: bool = False) -> Restored | None:
  """The newest checkpoint that reads back intact (None in a workdir that has none). Each damaged
  newer one is one warning line and is skipped; `move_aside` (training, whose later saves and `keep`
  rotation must not count it) then renames it `<step>.damaged`, never deleting it. Every checkpoint
  damaged: a CheckpointError and nothing moved, so that no run starts from scratch over them."""
  return _newest(manager, lambda step: _read(manager, step, abstract_state), move_aside)


def newest_variables(manager: ocp.CheckpointManager) -> Restored | None:
  """{"params", "batch_stats"} as host arrays from the newest intact checkpoint, whatever model
  wrote it (pretrained weights from a workdir: the shapes are checked by the caller)."""
  def read(step):
    metadata = _stored_metadata(manager, step)
    target = {k: jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata[k])
              for k in ("params", "batch_stats") if k in metadata}
    if "params" not in target:
      raise _Damaged(str(manager.directory / str(step) / STATE / "_METADATA"), "it lists no parameters")
    return _read(manager, step, target, partial=True)
  return _newest(manager, read, move_aside=False)


def _newest(manager, read, move_aside: bool) -> Restored | None:
  candidates, skipped = steps(manager), []
  if not candidates and manager.directory.exists() and any(
      DAMAGED in p.name for p in manager.directory.iterdir()):
    raise CheckpointError(f"{manager.directory} holds only checkpoints moved aside as damaged "
                          f"(<step>{DAMAGED}); restore the workdir from a copy, or train in a fresh "
                          f"--workdir")
  for step in candidates:
    try:
      state, ok, damage = read(step), True, None
    except _Damaged as e:
      state, ok, damage = None, False, e
    if _all_agree(ok):
      break
    skipped.append((step, str(damage or "another process could not read it")))
    older = [s for s in candidates if s < step]
    logging.warning("the checkpoint at step %d is damaged (%s); %s", step, skipped[-1][1],
                    f"trying step {older[0]}" if older else "no older one is left")
  else:
    if not candidates:
      return None
    listing = "; ".join(f"step {s}: {why}" for s, why in skipped)
    raise CheckpointError(f"every checkpoint in {manager.directory} is damaged ({listing}); restore "
                          f"the workdir from a copy, or train in a fresh --workdir (nothing was "
                          f"changed)")
  if move_aside:  # training, which may write: a step just read back intact gets its sizes now
    record_sizes(manager, only=step)  # if its run ended before recording them (killed)
  if skipped and move_aside:
    for bad, _ in skipped:
      if jax.process_index() == 0:
        logging.warning("kept the damaged checkpoint at step %d as %s", bad, _move_aside(manager, bad))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"deeplab_jax_moved_aside_{step}")
    manager.reload()
  return Restored(state, step)
