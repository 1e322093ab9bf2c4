"""Checkpoint integrity (issue #27): damage done to real checkpoints of the real loop (the session's
trained run: steps 25 and 30 kept). A damaged newest checkpoint is named in one warning line and the
one before restores, in training (which then ends where the run did) and in the readers (infer,
evaluate and export all read through `Predictor.from_workdir`); every checkpoint damaged, or a
damaged step asked for by name, is one error line and changes nothing."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, saved_state
from deeplab_jax import checkpoints, infer, train
from deeplab_jax.errors import CheckpointError

pytestmark = pytest.mark.reliability


def _copy(trained_run, folder):
  source, result = trained_run
  shutil.copytree(source, folder)
  return folder, [f"--workdir={folder}" if a.startswith("--workdir=") else a for a in result.args]


def _largest(step_dir):
  files = [p for p in (step_dir / checkpoints.STATE).rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest(step_dir)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return path


def _empty(step_dir):
  path = _largest(step_dir)
  path.write_bytes(b"")
  return path


def _delete(step_dir):
  path = _largest(step_dir)
  path.unlink()
  return path


def _flip_bit(step_dir):
  """One bit in the middle of the largest file; its size stays the same."""
  path = _largest(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))
  return path


def _break_metadata(step_dir):
  path = step_dir / checkpoints.STATE / "_METADATA"
  path.write_text('{"tree_metadata": {')
  return path


def _remove_commit_marker(step_dir):
  path = step_dir / checkpoints.COMMIT_MARKER
  path.unlink()
  return step_dir


DAMAGES = {"truncated": _truncate, "zero_length": _empty, "deleted_file": _delete,
           "flipped_bit": _flip_bit, "broken_metadata": _break_metadata,
           "no_commit_marker": _remove_commit_marker}


def _listing(folder):
  return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1)
                for p in folder.rglob("*"))


def _assert_variables_equal(predictor, expected):
  params, batch_stats = expected
  got = {"params": predictor.variables["params"], "batch_stats": predictor.variables["batch_stats"]}
  jax.tree.map(np.testing.assert_array_equal, {"params": params, "batch_stats": batch_stats},
               jax.device_get(got))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_named_once_and_the_one_before_is_read(
    trained_run, tmp_path, damage, caplog):
  workdir, _ = _copy(trained_run, tmp_path / "w")
  before_damage = saved_state(workdir, 25)
  damaged = DAMAGES[damage](workdir / "checkpoints" / "30")
  listing = _listing(workdir)
  predictor = infer.Predictor.from_workdir(workdir)
  assert predictor.step == 25
  _assert_variables_equal(predictor, before_damage)
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("the checkpoint at step 30 is damaged ("), warnings
  assert str(workdir / "checkpoints" / "30") in warnings[0]
  if damage in ("truncated", "zero_length", "deleted_file"):  # the file TensorStore could not read
    assert str(damaged) in warnings[0] or str(damaged.parent) in warnings[0], (damaged, warnings[0])
  if damage in ("broken_metadata", "no_commit_marker"):
    assert str(damaged) in warnings[0], (damaged, warnings[0])
  assert warnings[0].endswith("trying step 25")
  assert _listing(workdir) == listing  # a reader moves nothing


def test_a_value_changed_while_every_file_reads_fine_is_caught_by_its_fingerprint(
    trained_run, tmp_path, caplog):
  """Silent corruption: step 30 rewritten with one bit of one kernel flipped, in valid files, next to
  the fingerprints of the true values. It reads without error; only the fingerprint tells."""
  workdir, _ = _copy(trained_run, tmp_path / "w")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        train.abstract_state(config))
  manager = checkpoints.create_manager(workdir, keep=None, async_save=False)
  state = checkpoints.restore(manager, 30, target)
  record = manager.restore(30, args=ocp.args.Composite(
      **{checkpoints.INTEGRITY: ocp.args.JsonRestore()}))[checkpoints.INTEGRITY]
  flipped = np.asarray(state.params["logits"]["semantic"]["kernel"]).copy()
  flipped.reshape(-1).view(np.uint32)[7] ^= np.uint32(1 << 3)  # a low mantissa bit of one weight
  params = jax.tree.map(lambda x: x, state.params)
  params["logits"]["semantic"]["kernel"] = jax.device_put(flipped, device)
  altered = state.replace(params=params)
  shutil.rmtree(workdir / "checkpoints" / "30")
  manager.reload()
  manager.save(30, args=ocp.args.Composite(**{checkpoints.STATE: ocp.args.PyTreeSave(altered),
                                              checkpoints.INTEGRITY: ocp.args.JsonSave(record)}))
  manager.wait_until_finished()

  predictor = infer.Predictor.from_workdir(workdir)
  assert predictor.step == 25
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "(array params/logits/semantic/kernel): its values differ from those saved " \
                                 "(fingerprint mismatch: silent corruption)" in warnings[0], warnings
  with pytest.raises(CheckpointError, match=r"^the checkpoint at step 30 is damaged: .*array "
                                            r"params/logits/semantic/kernel.*; choose another step \(25\)"):
    infer.Predictor.from_workdir(workdir, step=30)


def test_fingerprints_catch_one_flipped_bit_anywhere_and_do_not_depend_on_the_mesh():
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((5, 7, 3)).astype(np.float32),
          "b": rng.integers(0, 9, (11,)).astype(np.int32), "c": np.float32(2.5)}
  base = checkpoints.fingerprints(tree)
  for k in range(0, tree["a"].size, 13):
    for bit in (0, 17, 31):
      changed = tree["a"].copy()
      changed.reshape(-1).view(np.uint32)[k] ^= np.uint32(1 << bit)
      assert checkpoints.fingerprints({**tree, "a": changed})["a"] != base["a"], (k, bit)
  swapped = tree["b"].copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert tree["b"][0] == tree["b"][1] or checkpoints.fingerprints({**tree, "b": swapped})["b"] != base["b"]
  # NumPy (arrays in host memory) and the compiled program (on accelerators, or spread over
  # processes) compute the same integers, for every dtype a state holds.
  import jax.numpy as jnp
  for value in (tree["a"], tree["b"], np.asarray(tree["c"]), rng.integers(0, 255, (4, 9), np.uint8),
                rng.standard_normal((6, 5)).astype(jnp.bfloat16), rng.integers(0, 2, (7,)).astype(bool)):
    on_host = checkpoints._leaf_hash(value.reshape(-1), np)
    compiled = checkpoints._hasher(jnp.asarray(value))(jnp.asarray(value))
    np.testing.assert_array_equal(on_host, np.asarray(compiled), err_msg=str(value.dtype))
  # Sharded over a mesh of every device, the compiled program gives the unsharded value.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(np.tile(tree["a"], (len(jax.devices()), 1, 1)),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  np.testing.assert_array_equal(np.asarray(checkpoints._hasher(sharded)(sharded)),
                                checkpoints._leaf_hash(np.asarray(sharded).reshape(-1), np))


def test_every_checkpoint_damaged_or_a_damaged_step_asked_for_is_one_line_and_changes_nothing(
    trained_run, tmp_path, compile_cache_env):
  """Training over a workdir whose checkpoints are all damaged stops (no run from scratch over it);
  evaluate --step= on a damaged step names it and the fix, and takes no other step. Both commands run
  at once, as real processes."""
  every, train_args = _copy(trained_run, tmp_path / "every")
  (every / "final_metrics.json").unlink()
  for step in (25, 30):
    _truncate(every / "checkpoints" / str(step))
  one, _ = _copy(trained_run, tmp_path / "one")
  _flip_bit(one / "checkpoints" / "30")
  listings = _listing(every), _listing(one)
  env = dict(os.environ, **compile_cache_env)
  runs = [subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for args in (train_args, ["deeplab_jax.evaluate", "--config=configs/shapes.py",
                                              f"--workdir={one}", "--step=30"])]
  (_, train_err), (_, eval_err) = (run.communicate(timeout=300) for run in runs)
  assert runs[0].returncode == CheckpointError.exit_code, train_err[-3000:]
  last = train_err.strip().splitlines()[-1]
  assert last.startswith(f"deeplab_jax: error: every checkpoint in {every / 'checkpoints'} is damaged "
                         f"(step 30: ") and "; step 25: " in last, last
  assert last.endswith("restore the workdir from a copy, or train in a fresh --workdir (nothing was "
                       "changed)"), last
  assert runs[1].returncode == CheckpointError.exit_code, eval_err[-3000:]
  last = eval_err.strip().splitlines()[-1]
  assert last.startswith("deeplab_jax: error: the checkpoint at step 30 is damaged: "), last
  assert str(one / "checkpoints" / "30") in last and last.endswith(
      "; choose another step (25) or leave the step out to take the newest intact one"), last
  assert "Traceback" not in train_err + eval_err
  assert (_listing(every), _listing(one)) == listings


def test_training_resumes_from_the_step_before_a_damaged_newest_and_ends_where_the_run_did(
    trained_run, tmp_path, compile_cache_env):
  """The newest checkpoint cut in half (an interrupted copy of the workdir): the same command warns,
  moves it aside as 30.damaged (kept, never deleted), resumes from 25 and saves 30 again, equal to
  the uninterrupted run's; the `keep` rotation still holds 25."""
  reference, _ = trained_run
  workdir, args = _copy(trained_run, tmp_path / "w")
  (workdir / "final_metrics.json").unlink()
  damaged = _truncate(workdir / "checkpoints" / "30")
  damaged_bytes = damaged.read_bytes()
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **compile_cache_env))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
  assert "the checkpoint at step 30 is damaged (" in result.stderr
  assert f"kept the damaged checkpoint at step 30 as {workdir / 'checkpoints' / '30.damaged'}" in result.stderr
  assert f"resumed from {workdir / 'checkpoints' / '25'}" in result.stderr
  moved = workdir / "checkpoints" / "30.damaged" / damaged.relative_to(workdir / "checkpoints" / "30")
  assert moved.read_bytes() == damaged_bytes
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["25", "30", "30.damaged"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               saved_state(reference, 30), saved_state(workdir, 30))
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 30


def test_weights_from_a_workdir_skip_its_damaged_newest_checkpoint(trained_run, tmp_path, caplog):
  """config.init_from.path=<workdir> reads params and BatchNorm statistics the same careful way."""
  from deeplab_jax.weights import init_from
  workdir, _ = _copy(trained_run, tmp_path / "w")
  _delete(workdir / "checkpoints" / "30")
  tree, info = init_from._load_workdir(workdir)
  assert info["step"] == 25 and any(path[0] == "params" for path in tree)
  params, _ = saved_state(workdir, 25)
  np.testing.assert_array_equal(tree[("params", "logits", "semantic", "kernel")],
                                params["logits"]["semantic"]["kernel"])
  assert any("the checkpoint at step 30 is damaged (" in r.getMessage() and "missing;" in r.getMessage()
             for r in caplog.records)
