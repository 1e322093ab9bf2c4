"""Orbax checkpoints of the train state in `<workdir>/checkpoints`: save, keep the last K, restore onto
whatever mesh the current run has (a state saved on 8 devices restores on 1)."""
from __future__ import annotations

from etils import epath
import jax
import orbax.checkpoint as ocp

from deeplab_jax.errors import CheckpointError


def create_manager(workdir, *, keep: int | None = 3, async_save: bool = True,
                   create: bool = True) -> ocp.CheckpointManager:
  """Readers (inference) pass `keep=None` (never delete) and `create=False` (never make the folder)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _model_shapes(tree) -> dict[str, tuple]:
  """{'params/backbone/.../kernel': shape} of the params and batch_stats in a state-like tree."""
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names and names[0] in ("params", "batch_stats"):
      shapes["/".join(names)] = tuple(leaf.shape)
  return shapes


def check_fits(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """Compare the model's parameter shapes before reading any data, so a mismatch is one clear line
  (and no half-started asynchronous reads are left behind)."""
  stored = _model_shapes(manager.item_metadata(step))
  wanted = _model_shapes({"params": abstract_state.params, "batch_stats": abstract_state.batch_stats})
  where = manager.directory / str(step)
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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """The state at `step`, placed per the shardings carried by `abstract_state`'s leaves."""
  check_fits(manager, step, abstract_state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    detail = " ".join(str(e).split())[:300]
    raise CheckpointError(
        f"the checkpoint at {manager.directory / str(step)} does not fit this config's model "
        f"({detail}); train in a fresh --workdir or use the config it was trained with") from None
