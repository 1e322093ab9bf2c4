"""Orbax checkpoints of the train state in `<workdir>/checkpoints`: save, keep the last K, restore onto
whatever mesh the current run has (a state saved on 8 devices restores on 1)."""
from __future__ import annotations

from etils import epath
import orbax.checkpoint as ocp

from deeplab_jax.errors import CheckpointError


def create_manager(workdir, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """The state at `step`, placed per the shardings carried by `abstract_state`'s leaves."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    detail = " ".join(str(e).split())[:300]
    raise CheckpointError(
        f"the checkpoint at {manager.directory / str(step)} does not fit this config's model "
        f"({detail}); train in a fresh --workdir or use the config it was trained with") from None
