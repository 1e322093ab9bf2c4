"""The reliability catalog's faults, in real processes on tiny configs: kill -9 at random moments,
a diverging loss, a full disk during a save, a corrupt image inside a built data set. Each asserts
what the user sees and that nothing is lost. `pytest -k reliability` runs these with the catalog's
cases in other files (tests/reliability_catalog.py lists them all; docs/reliability.md's table is its copy)."""
import ast
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import REPO, TINY_FLAGS, TRAINED_STEPS, run_module, saved_state
import reliability_catalog
from deeplab_jax.errors import DataError, NonFiniteLossError

pytestmark = pytest.mark.reliability

def _args(workdir, data_dir, *extra):
  return ["deeplab_jax.main", "--config=configs/shapes.py", f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}", *TINY_FLAGS, *extra]


class _Run:
  """A training process whose stderr is read on a thread, so the test can wait for a line."""

  def __init__(self, args, env):
    self.process = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    self.lines = []
    self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
    self.reader.start()

  def wait_for(self, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and self.process.poll() is None:
      if any(text in line for line in list(self.lines)):
        return True
      time.sleep(0.01)
    return False

  def kill(self):
    self.process.send_signal(signal.SIGKILL)
    self.process.wait()
    self.reader.join(10)


def _steps(checkpoints):
  """(finalized steps, names of half-written step folders) in a checkpoints folder."""
  names = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _writes_since(checkpoints, since: float) -> list[str]:
  """Half-written step folders created at or after `since`: a write under way now, not one that a
  killed run left behind (those stay until that step is saved again)."""
  found = []
  for name in _steps(checkpoints)[1]:
    try:
      if (checkpoints / name).stat().st_ctime >= since:
        found.append(name)
    except FileNotFoundError:  # finalized (renamed) meanwhile
      pass
  return found


def test_kill_9_at_six_random_moments_resumes_exactly_from_the_last_complete_checkpoint(
    trained_run, tiny_data_dir, tmp_path, compile_cache_env):
  """Every other kill lands during an asynchronous checkpoint write: the run's second one, so its
  first has finalized and the run got somewhere. The others land at a random moment of up to 3 s
  after training starts (loading the compiled step, training, evaluating, writing). Each restart must
  resume from the newest finalized checkpoint (never a half-written one), and the end must equal the
  uninterrupted run's parameters (the session's trained run: the same flags but for how often it
  saves, which changes no value). Six kills (ten until the suite outgrew 10 minutes): each restart
  costs about 20 s (starting Python, JAX and TensorFlow, restoring, loading the compiled step), and
  three kills of each kind still cover both."""
  env = dict(os.environ, **compile_cache_env)
  reference, _ = trained_run
  flags = [f"--config.train.steps={TRAINED_STEPS}", "--config.eval.every_steps=10",
           "--config.checkpoint.every_steps=2"]
  workdir = tmp_path / "killed"
  checkpoints = workdir / "checkpoints"
  rng = random.Random(17)
  kills, in_write, resumed_from = 0, 0, []
  while kills < 6:
    before, _ = _steps(checkpoints)
    started = time.time() - 1.0  # file times are coarser than time.time()
    run = _Run(_args(workdir, tiny_data_dir, *flags), env)
    assert run.wait_for("training steps"), "".join(run.lines)[-3000:]
    resumed = [line for line in run.lines if "resumed from" in line]
    if before:  # a restart: from the newest finalized step, never a temporary folder
      assert resumed and resumed[-1].rstrip().endswith(str(checkpoints / str(before[-1]))), resumed
      resumed_from.append(before[-1])
    if kills % 2 == 0:
      deadline = time.time() + 60
      while time.time() < deadline and run.process.poll() is None and not (
          _writes_since(checkpoints, started) and _steps(checkpoints)[0][-1:] > before[-1:]):
        time.sleep(0.002)
    else:
      time.sleep(rng.uniform(0.0, 3.0))
    writing = bool(_writes_since(checkpoints, started))
    assert run.process.poll() is None, f"the run ended before kill {kills + 1}: lower the kill delays"
    run.kill()
    kills += 1
    in_write += writing
  finished = run_module(_args(workdir, tiny_data_dir, *flags), env=env)
  assert finished.returncode == 0, finished.stderr[-3000:]
  print(f"kill -9: {kills} kills, {in_write} during an asynchronous checkpoint write; restarts resumed "
        f"from steps {resumed_from}")
  assert in_write >= 3, in_write
  # The kills interrupted a run that progressed: restarts came from ever later checkpoints.
  assert resumed_from == sorted(resumed_from) and len(set(resumed_from)) >= 3, resumed_from
  expected = saved_state(reference, TRAINED_STEPS)
  got = saved_state(workdir, TRAINED_STEPS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), expected, got)
  assert not _steps(checkpoints)[1], "a temporary checkpoint folder was left after the finished run"


def test_a_diverging_loss_stops_with_one_line_and_every_checkpoint_is_finite(
    tiny_data_dir, tmp_path, compile_cache_env):
  """A rate of 1e6 makes the loss infinite within a few steps: the run stops with exit 5 and one
  line naming the last checkpoint, and every checkpoint written restores with finite values."""
  env = dict(os.environ, **compile_cache_env)
  flags = ["--config.train.steps=12", "--config.checkpoint.every_steps=1", "--config.eval.every_steps=1000"]
  diverging = run_module(_args(tmp_path, tiny_data_dir, *flags, "--config.optim.base_lr=1e6"), env=env)
  assert diverging.returncode == NonFiniteLossError.exit_code, diverging.stderr[-3000:]
  last = diverging.stderr.strip().splitlines()[-1]
  assert last.startswith("deeplab_jax: error: the loss became NaN or infinite before step "), last
  steps, temporary = _steps(tmp_path / "checkpoints")
  assert steps and not temporary and not (tmp_path / "final_metrics.json").exists()
  for step in steps:
    for tree in saved_state(tmp_path, step):
      assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)), step
  assert f"the last checkpoint (step {steps[-1]}) is intact" in last


# Sets the file-size limit, then becomes the command (argv[2:]). A shim rather than preexec_fn:
# Python code run between fork and exec in this multithreaded (JAX) process can deadlock.
_LIMITED = ("import os, resource, signal, sys; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # writes past it fail with EFBIG
            "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
            "os.execv(sys.argv[2], sys.argv[2:])")


def _rewound(trained_run, workdir):
  """A copy of the session's trained workdir without its last checkpoint, and the command that
  trained it, pointed at the copy: rerun, it restores the checkpoint before, trains the last steps
  again and saves, on the compiled step already in the cache (the step count is compiled into the
  learning-rate schedule, so any other count would compile a new step)."""
  source, result = trained_run
  shutil.copytree(source, workdir)
  steps, _ = _steps(workdir / "checkpoints")
  shutil.rmtree(workdir / "checkpoints" / str(steps[-1]))
  (workdir / "final_metrics.json").unlink()
  args = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in result.args]
  return args, steps[-2]


def _save_fails(workdir, step, expected, result, message):
  """The run stopped on its save with one line, the last, and no traceback; step is still there."""
  assert result.returncode == reliability_catalog.OS_ERROR_EXIT, result.stderr[-3000:]
  # Orbax's writer threads log one line each above it (no tracebacks); nothing comes after it.
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"deeplab_jax: error: {workdir / 'checkpoints'}") and message in last, last
  assert _steps(workdir / "checkpoints")[0] == [step]
  assert not (workdir / "final_metrics.json").exists()
  jax.tree.map(np.testing.assert_array_equal, expected, saved_state(workdir, step))


# Sets the file-size limit, then becomes the command (argv[2:]). A shim rather than preexec_fn:
# Python code run between fork and exec in this multithreaded (JAX) process can deadlock.
_LIMITED = ("import os, resource, signal, sys; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # writes past it fail with EFBIG
            "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
            "os.execv(sys.argv[2], sys.argv[2:])")


def test_a_full_disk_during_a_save_is_one_line_and_earlier_checkpoints_stay_intact(
    trained_run, tmp_path, compile_cache_env):
  """Files may not grow past 64 KiB (RLIMIT_FSIZE: what a full disk looks like to a writer): the
  resumed run's next checkpoint cannot be written. One line names the path and the fix, and the
  checkpoint already there still restores."""
  workdir = tmp_path / "w"
  args, step = _rewound(trained_run, workdir)
  expected = saved_state(workdir, step)
  # The limit would truncate compiled-program cache entries too: a private copy of the cache.
  cache = tmp_path / "xla_cache"
  shutil.copytree(compile_cache_env["JAX_COMPILATION_CACHE_DIR"], cache)
  result = subprocess.run([sys.executable, "-c", _LIMITED, str(64 * 1024), sys.executable, "-m", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache)))
  _save_fails(workdir, step, expected, result, "could not be written")


def _bound_by_file_modes() -> list[str]:
  """A command prefix under which file modes bind: none for a user; for root (whom modes do not
  stop), a user namespace in which root's files belong to an unprivileged user."""
  if os.geteuid() != 0:
    return []
  prefix = ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
  if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
    pytest.skip("running as root, and no user namespace (unshare --user) to drop the privilege in")
  return prefix


def test_an_unwritable_checkpoint_folder_during_a_run_is_one_line_and_earlier_checkpoints_stay_intact(
    trained_run, tmp_path, compile_cache_env):
  """The checkpoints folder loses its write permission (a remount, a shared disk's quota policy, a
  chmod): the resumed run's next save fails; one line names the path and the fix."""
  workdir = tmp_path / "w"
  args, step = _rewound(trained_run, workdir)
  expected = saved_state(workdir, step)
  (workdir / "checkpoints").chmod(0o555)
  try:
    result = subprocess.run([*_bound_by_file_modes(), sys.executable, "-m", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **compile_cache_env))
  finally:
    (workdir / "checkpoints").chmod(0o755)
  _save_fails(workdir, step, expected, result, "is not accessible (permission denied)")


def _folder_data(root, corrupt: bool):
  """A folder_segmentation manual dir: 6 train and 2 val images, one train JPEG cut in half."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  ids = [f"im{k}" for k in range(8)]
  for name in ids:
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / "images" / f"{name}.jpg")
    Image.fromarray(rng.integers(0, 3, (40, 48), np.uint8)).save(root / "masks" / f"{name}.png")
  if corrupt:
    path = root / "images" / "im3.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  (root / "train.txt").write_text("\n".join(ids[:6]) + "\n")
  (root / "val.txt").write_text("\n".join(ids[6:]) + "\n")


def test_a_truncated_image_inside_a_built_data_set_is_named_or_skipped_and_counted(
    tmp_path, compile_cache_env, caplog):
  """The builder stores image files as they are, so a truncated JPEG is only found when training
  decodes it: one line naming the example (exit 3, no checkpoint). With
  config.input.skip_undecodable the pipeline leaves it out and logs the count and name."""
  from conftest import tiny_config
  from deeplab_jax import datasets, input_pipeline
  _folder_data(tmp_path / "manual", corrupt=True)
  datasets.prepare("folder_segmentation", str(tmp_path / "manual"), str(tmp_path / "tfds"),
                   num_classes=3)
  flags = ["--config.dataset.name=folder_segmentation", f"--config.dataset.data_dir={tmp_path / 'tfds'}",
           "--config.dataset.num_classes=3", "--config.dataset.train_split=train",
           "--config.dataset.eval_split=val", "--config.eval.crop_size=(65, 65)",
           *(f for f in TINY_FLAGS if not f.startswith("--config.dataset.name=")),
           "--config.train.steps=4", "--config.checkpoint.every_steps=2", "--config.eval.every_steps=1000"]
  failed = run_module(["deeplab_jax.main", "--config=configs/shapes.py", f"--workdir={tmp_path / 'w'}",
                       *flags], env=dict(os.environ, **compile_cache_env))
  last = failed.stderr.strip().splitlines()[-1]
  assert failed.returncode == DataError.exit_code, failed.stderr[-3000:]
  assert last == ("deeplab_jax: error: 1 example(s) of folder_segmentation/1.0.0 split train do not "
                  "decode (a truncated or corrupt image or mask), first 'im3'; rebuild the data set "
                  "from intact files, or set config.input.skip_undecodable=True to skip them (counted "
                  "in the log)"), last
  assert not _steps(tmp_path / "w" / "checkpoints")[0]

  config = tiny_config(tmp_path / "tfds")
  config.dataset.name, config.dataset.num_classes = "folder_segmentation", 3
  config.input.skip_undecodable = True
  builder = input_pipeline.load_builder(config)
  batches = input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config), builder, "train")
  assert [next(batches)["image"].shape for _ in range(6)] == [(2, 33, 33, 3)] * 6  # 3 epochs of 5
  assert ("skipping 1 undecodable example(s) of folder_segmentation/1.0.0 split train "
          "(config.input.skip_undecodable): im3") in caplog.text
  # The split is scanned once per process, not again for each new pipeline (each evaluation).
  input_pipeline.train_dataset(builder, config)
  assert caplog.text.count("undecodable example(s) of folder_segmentation/1.0.0 split train") == 1


def test_a_mask_value_outside_the_classes_names_the_example(tiny_data_dir):
  """A data set without stored class metadata, read with too few classes: the first mask value
  outside them stops the pipeline with the example's name, never a silent wrong label."""
  import tensorflow_datasets as tfds
  from conftest import tiny_config
  from deeplab_jax import input_pipeline
  config = tiny_config(tiny_data_dir)
  config.dataset.num_classes = 2
  builder = tfds.builder(config.dataset.name, data_dir=str(tiny_data_dir))
  with pytest.raises(DataError) as e:
    list(input_pipeline.eval_batches(builder, config))
  assert re.fullmatch(
      r"example 'val_000\d\d' of synthetic_shapes/tiny/2\.0\.0 has mask value [2-5], neither a class id "
      r"below config\.dataset\.num_classes=2 nor config\.dataset\.ignore_label=255; fix its mask, or the "
      r"config if those values are wrong", str(e.value)), str(e.value)


def _fill(template: str, places: dict) -> str:
  for key, value in places.items():
    template = template.replace(key, str(value))
  return template


def test_each_bad_input_is_one_line_a_nonzero_exit_and_nothing_written(trained_workdir, tmp_path):
  """Every BAD_INPUTS row as a real process, all at once: the last stderr line is the row's message,
  the exit code its code, no traceback, and no file appears (the finished workdir is unchanged)."""
  workdir, data_dir = trained_workdir
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  before = sorted(str(p) for p in workdir.rglob("*"))
  running = []
  for k, bad in enumerate(reliability_catalog.BAD_INPUTS):
    folder = tmp_path / f"case_{k}"
    folder.mkdir()
    if "bad_masks" in " ".join(bad.args):
      _folder_data(folder / "bad_masks", corrupt=False)
      Image.fromarray(np.full((40, 48), 7, np.uint8)).save(folder / "bad_masks" / "masks" / "a.png")
      Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(folder / "bad_masks" / "images" / "a.jpg")
      (folder / "bad_masks" / "train.txt").write_text("a\n")
    places = {"{tmp}": folder, "{data}": data_dir, "{workdir}": workdir, "{file}": a_file}
    listing = sorted(str(p) for p in folder.rglob("*"))
    env = dict(os.environ, DEEPLAB_JAX_ALLOCATOR="system", **dict(bad.env))  # each exits before a step
    process = subprocess.Popen([sys.executable, "-m", *(_fill(a, places) for a in bad.args)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running.append((bad, places, listing, process))
  for bad, places, listing, process in running:
    _, err = process.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    want = f"deeplab_jax: error: {_fill(bad.message, places)}"
    assert process.returncode == bad.exit_code and last.startswith(want), (bad.case, last, err[-1500:])
    assert "Traceback" not in err, (bad.case, err[-3000:])
    assert sorted(str(p) for p in places["{tmp}"].rglob("*")) == listing, bad.case
  assert sorted(str(p) for p in workdir.rglob("*")) == before
  assert a_file.read_text() == ""


def test_the_docs_table_is_the_catalog_and_its_tests_are_marked():
  readme = (pathlib.Path(REPO) / "docs" / "reliability.md").read_text()
  start, end = "<!-- reliability catalog: tests/reliability_catalog.py -->\n", "<!-- end of catalog -->"
  assert start in readme and end in readme, "docs/reliability.md lost the catalog's markers"
  table = readme[readme.index(start) + len(start):readme.index(end)]
  assert table == reliability_catalog.markdown_table(), (
      "docs/reliability.md's table differs from tests/reliability_catalog.py: paste "
      "`python -c 'import sys; sys.path.insert(0, \"tests\"); import reliability_catalog; "
      "print(reliability_catalog.markdown_table(), end=\"\")'`")
  assert len(reliability_catalog.BAD_INPUTS) >= 15
  for fault in reliability_catalog.FAULTS:
    path, name = fault.test.split("::")
    tree = ast.parse((pathlib.Path(REPO) / "tests" / path).read_text())
    module_marked = "pytestmark = pytest.mark.reliability" in ast.unparse(tree)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert name in functions, fault.test
    marked = any("reliability" in ast.unparse(d) for d in functions[name].decorator_list)
    assert module_marked or marked, f"{fault.test} is not marked reliability"
