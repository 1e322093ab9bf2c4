"""The reliability catalog: what can go wrong, the test that tries it, and what the user sees.

docs/reliability.md's table is `markdown_table()` of this module, checked by
test_reliability.py::test_the_docs_table_is_the_catalog; every test named here must exist and be
marked `reliability`, so `pytest -k reliability` runs the whole catalog. Bad inputs are data: the
test that runs them (test_reliability.py::test_each_bad_input_is_one_line_a_nonzero_exit_and_nothing_written)
reads `BAD_INPUTS`, so a row cannot claim a message the program does not print.
"""
from __future__ import annotations

import dataclasses

from deeplab_jax.errors import CheckpointError, ConfigError, DataError, WeightsError
from deeplab_jax.runtime import OS_ERROR_EXIT

FLAG_EXIT = 2  # absl and config-override errors
DAMAGED = "test_checkpoints.py::test_a_damaged_newest_checkpoint_is_named_once_and_the_one_before_is_read"


@dataclasses.dataclass(frozen=True)
class Fault:
  case: str
  sees: str
  test: str  # file::function


@dataclasses.dataclass(frozen=True)
class BadInput:
  """One command line run as a real process. {tmp}: a fresh folder, {data}: the tiny shapes data
  dir, {workdir}: a finished tiny training workdir, {file}: an empty file. `message` is the start of
  the error line after `deeplab_jax: error: `."""
  case: str
  args: tuple[str, ...]
  exit_code: int
  message: str
  env: tuple[tuple[str, str], ...] = ()


_TRAIN = ("deeplab_jax.main", "--config=configs/shapes.py")
_TINY = ("--config.dataset.data_dir={data}", "--config.dataset.name=synthetic_shapes/tiny")

FAULTS = (
    Fault("`kill -9` at 6 random moments of a run, half of them during an asynchronous checkpoint "
          "write", "the same command resumes from the newest complete checkpoint (a half-written one "
          "is never read); the end equals an uninterrupted run's parameters",
          "test_reliability.py::test_kill_9_at_six_random_moments_resumes_exactly_from_the_last_"
          "complete_checkpoint"),
    Fault("The newest checkpoint's largest file cut to half its size (an interrupted `gsutil cp` or "
          "rsync of the workdir)", "one warning `the checkpoint at step N is damaged (FILE (B bytes; S "
          "when saved): its size differs from the one recorded after the save); trying step M`; training resumes from M (moving N aside as "
          "`N.damaged`, never deleting it) and ends where the uninterrupted run did; infer, evaluate "
          "and export read M and change nothing",
          "test_checkpoints.py::test_training_resumes_from_the_step_before_a_damaged_newest_and_ends_"
          "where_the_run_did"),
    Fault("The same file cut to zero bytes, or deleted", "the same warning naming the file (`0 bytes; S "
          "when saved` or `missing; S bytes when saved`), and step M restores", DAMAGED),
    Fault("One flipped bit inside the newest checkpoint, file sizes unchanged (silent corruption)",
          "it reads without error, but the array's fingerprint, saved with it, differs: the same "
          "warning naming the array (`... (array opt_state/...): its values differ from those saved "
          "(fingerprint mismatch: silent corruption)`), and step M restores", DAMAGED),
    Fault("A value changed while every file reads fine (rewritten with valid files)",
          "the fingerprint names the array, `params/logits/semantic/kernel`, and step M restores",
          "test_checkpoints.py::test_a_value_changed_while_every_file_reads_fine_is_caught_by_its_"
          "fingerprint"),
    Fault("Broken metadata (`_METADATA` overwritten), or a step folder without its commit marker "
          "(`commit_success.txt`)", "the same warning naming the file, or `it has no commit marker "
          "(commit_success.txt): its save or copy did not finish`, and step M restores", DAMAGED),
    Fault("Every checkpoint damaged", "`every checkpoint in WORKDIR/checkpoints is damaged (step 30: "
          "...; step 25: ...); restore the workdir from a copy, or train in a fresh --workdir (nothing "
          "was changed)`, exit 4; no training from scratch, nothing moved or written",
          "test_checkpoints.py::test_every_checkpoint_damaged_or_a_damaged_step_asked_for_is_one_"
          "line_and_changes_nothing"),
    Fault("A damaged step asked for by name (`--step=N` of evaluate, export, infer)",
          "`the checkpoint at step N is damaged: FILE ...; choose another step (M) or leave the step "
          "out to take the newest intact one`, exit 4, no fallback",
          "test_checkpoints.py::test_every_checkpoint_damaged_or_a_damaged_step_asked_for_is_one_"
          "line_and_changes_nothing"),
    Fault("SIGTERM (a spot VM's preemption notice), one or several processes",
          "`preempted (SIGTERM) at step N: saved a checkpoint there; run the same command to resume "
          "from it`, exit 143; the resumed run equals an uninterrupted one",
          "test_distributed.py::test_two_processes_preempted_and_resumed_end_like_one_process_with_"
          "four_devices"),
    Fault("The loss becomes NaN or infinite (a diverging rate)",
          "`the loss became NaN or infinite before step N; training stopped and the last checkpoint "
          "(step M) is intact: lower config.optim.base_lr, ...`, exit 5; every checkpoint written is "
          "finite", "test_reliability.py::test_a_diverging_loss_stops_with_one_line_and_every_"
          "checkpoint_is_finite"),
    Fault("A NaN in an input batch",
          "the step leaves parameters, BatchNorm statistics and optimizer state unchanged and flags "
          "the step; the loop then stops with the line above",
          "test_train.py::test_a_nonfinite_batch_leaves_the_sharded_state_unchanged_and_is_flagged"),
    Fault("The disk fills (or a file-size limit is hit) during an asynchronous checkpoint save",
          "`WORKDIR/checkpoints/N.orbax-checkpoint-tmp/... could not be written: ...; free space, "
          "lift the limit or choose another path`, exit 6, as the last line (Orbax's writer threads "
          "log one line each above it, no tracebacks); the earlier checkpoints restore unchanged",
          "test_reliability.py::test_a_full_disk_during_a_save_is_one_line_and_earlier_checkpoints_"
          "stay_intact"),
    Fault("The checkpoints folder becomes unwritable during a run (permissions; tried as an "
          "unprivileged user, since root ignores file modes)",
          "`WORKDIR/checkpoints/N.orbax-checkpoint-tmp is not accessible (permission denied); choose a "
          "path you can write, or fix its permissions`, exit 6, as the last line; the earlier "
          "checkpoints restore unchanged",
          "test_reliability.py::test_an_unwritable_checkpoint_folder_during_a_run_is_one_line_and_"
          "earlier_checkpoints_stay_intact"),
    Fault("A truncated JPEG or PNG inside a built data set",
          "`1 example(s) of DATASET split train do not decode (a truncated or corrupt image or mask), "
          "first 'NAME'; rebuild the data set from intact files, or set "
          "config.input.skip_undecodable=True ...`, exit 3; with that option the run skips it and "
          "logs `skipping 1 undecodable example(s) ...: NAME`",
          "test_reliability.py::test_a_truncated_image_inside_a_built_data_set_is_named_or_skipped_"
          "and_counted"),
    Fault("A mask value that is neither a class id nor the ignore label, in a built data set",
          "`example 'NAME' of DATASET has mask value V, neither a class id below "
          "config.dataset.num_classes=N nor config.dataset.ignore_label=255; ...`, exit 3 (never a "
          "silent wrong label)",
          "test_reliability.py::test_a_mask_value_outside_the_classes_names_the_example"),
    Fault("An image larger than an exported SavedModel's crop",
          "TensorFlow's `InvalidArgumentError: images must be at most HxW (the eval crop); tile or "
          "resize them`",
          "test_commands.py::test_infer_evaluate_and_export_work_on_a_default_workdir"),
    Fault("Pretrained weights that cannot segment given to `from_pretrained` or `--weights`: ImageNet "
          "weights (a TF backbone checkpoint, a timm file), a tarball without a checkpoint, a "
          "truncated tarball, a checkpoint of no DeepLab, a missing path; or `--weights` with "
          "`--workdir`",
          "one line naming the problem and the fix (e.g. `... holds a mobilenet_v2 backbone without "
          "a DeepLab head (ImageNet weights): it cannot segment; train from it with "
          "--config.init_from.path=PATH --config.init_from.scope=backbone`), nothing written",
          "test_pretrained.py::test_bad_weights_are_one_line_naming_the_fix"),
    Fault("Official TF MobileNetV2 weights (TF SAME padding) under a config with the default "
          "`fixed` padding",
          "`config.init_from.path=PATH was trained with 'same' padding on its strided convs "
          "(MobilenetV2: TF SAME) but config.model.strided_padding='fixed'; add "
          "--config.model.strided_padding=same`, before anything is written",
          "test_weights.py::test_convert_command_then_a_six_class_run_from_a_21_class_model_and_"
          "resume_wins"),
    Fault("Own data: a config value the prepared data contradicts (class count, ignore label)",
          "before the first step, one line naming the value to set (`config.dataset.num_classes=4 but "
          "folder_segmentation/1.0.0 has 3 classes; set it to 3`), nothing written",
          "test_folder_config.py::test_a_value_the_data_contradicts_stops_before_training"),
)

BAD_INPUTS = (
    BadInput("An unknown backbone", (*_TRAIN, "--workdir={tmp}/w", "--config.model.backbone=vgg16"),
             ConfigError.exit_code, "config.model.backbone='vgg16' is not a backbone; choose one of"),
    BadInput("Output stride 12", (*_TRAIN, "--workdir={tmp}/w", "--config.model.output_stride=12"),
             ConfigError.exit_code, "config.model.output_stride=12 is not supported; use 8, 16 or 32"),
    BadInput("Atrous rates that do not scale to the eval output stride",
             (*_TRAIN, "--workdir={tmp}/w", "--config.model.atrous_rates=(3, 5, 7)",
              "--config.eval.output_stride=32"), ConfigError.exit_code,
             "config.model.atrous_rates=(3, 5, 7) at output stride 16 do not scale to whole rates at "
             "output stride 32"),
    BadInput("A crop too small for the output stride",
             (*_TRAIN, "--workdir={tmp}/w", "--config.input.crop_size=(12, 12)"),
             ConfigError.exit_code,
             "config.input.crop_size=(12, 12) is too small for output stride 16: each side needs at "
             "least 17 pixels"),
    BadInput("`num_classes` different from the data set's",
             (*_TRAIN, "--workdir={tmp}/w", *_TINY, "--config.dataset.num_classes=5"),
             ConfigError.exit_code,
             "config.dataset.num_classes=5 but synthetic_shapes/tiny/2.0.0 has 6 classes; set it to 6"),
    BadInput("Mask values >= num_classes that are not the ignore label, when building your data",
             ("deeplab_jax.datasets.prepare", "folder_segmentation", "--manual_dir={tmp}/bad_masks",
              "--data_dir={tmp}/d", "--num_classes=3"), DataError.exit_code,
             "label map {tmp}/bad_masks/masks/a.png has values [7] outside 0..2 and 255"),
    BadInput("A split the data set does not have", (*_TRAIN, "--workdir={tmp}/w", *_TINY,
                                                    "--config.dataset.train_split=tain"),
             ConfigError.exit_code,
             "config.dataset.train_split='tain' is not a split of synthetic_shapes/tiny/2.0.0; it has "
             "train, val"),
    BadInput("A data set that is not prepared", ("deeplab_jax.main", "--config=configs/voc_xception.py",
                                                 "--workdir={tmp}/w", "--config.dataset.data_dir={tmp}"),
             DataError.exit_code, "data set 'voc2012_segmentation' is not prepared in {tmp}"),
    BadInput("Missing manual downloads", ("deeplab_jax.datasets.prepare", "voc2012_segmentation",
                                          "--manual_dir={tmp}", "--data_dir={tmp}/d"),
             DataError.exit_code, "{tmp} lacks VOCtrainval_11-May-2012.tar"),
    BadInput("A config override typo", (*_TRAIN, "--workdir={tmp}/w", "--config.modle.backbone=resnet_50"),
             FLAG_EXIT, "a --config.* override names no field of the config: 'modle' Did you mean \"model\""),
    BadInput("A batch not divisible by the devices",
             (*_TRAIN, "--workdir={tmp}/w", *_TINY, "--config.train.batch_size=6"), ConfigError.exit_code,
             "config.train.batch_size=6 is not divisible by the 4 devices",
             env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=4"),)),
    BadInput("A checkpoint of another model", (*_TRAIN, "--workdir={workdir}", *_TINY,
                                               "--config.model.depth_multiplier=1.0"),
             CheckpointError.exit_code, "the checkpoint at {workdir}/checkpoints/30 has "),
    BadInput("`init_from` pointing at nothing", (*_TRAIN, "--workdir={tmp}/w", *_TINY,
                                                 "--config.init_from.path={tmp}/nothing"),
             WeightsError.exit_code, "config.init_from.path={tmp}/nothing does not exist"),
    BadInput("An infer input folder with no images",
             ("deeplab_jax.infer", "--workdir={workdir}", "--input={tmp}", "--output={tmp}/out"),
             DataError.exit_code, "--input={tmp} holds no .jpg/.png/... images"),
    BadInput("An infer input that does not exist",
             ("deeplab_jax.infer", "--workdir={workdir}", "--input={tmp}/none", "--output={tmp}/out"),
             DataError.exit_code, "--input={tmp}/none does not exist; give an image file or a folder"),
    BadInput("A workdir that is a file", (*_TRAIN, "--workdir={file}"), OS_ERROR_EXIT,
             "{file} already exists as something else; choose another path"),
    BadInput("A config file that does not exist",
             ("deeplab_jax.evaluate", "--config=configs/nope.py", "--workdir={workdir}"), FLAG_EXIT,
             "--config=configs/nope.py could not be loaded ([Errno 2] No such file or directory"),
    BadInput("Exporting a folder that is not a training workdir",
             ("deeplab_jax.export", "--workdir={tmp}", "--output={tmp}/out"), CheckpointError.exit_code,
             "{tmp} holds no config.json: it is not a training workdir"),
    BadInput("A flag without its value", ("deeplab_jax.model_stats", "--config=configs/shapes.py",
                                          "--size"), FLAG_EXIT,
             "Missing value for flag --size; see --helpshort"),
    BadInput("An unknown data set", ("deeplab_jax.datasets.prepare", "pascal", "--manual_dir={tmp}"),
             ConfigError.exit_code, "unknown data set 'pascal'; prepare one of ade20k"),
)

_README_NAMES = {"{tmp}": "DIR", "{data}": "DATA", "{workdir}": "WORKDIR", "{file}": "FILE"}


def readable(text: str) -> str:
  for key, name in _README_NAMES.items():
    text = text.replace(key, name)
  return text


def markdown_table() -> str:
  """docs/reliability.md's table: faults, then bad inputs (each: case, what the user sees, its test)."""
  rows = ["| case | what the user sees | test |", "|---|---|---|"]
  for fault in FAULTS:
    rows.append(f"| {fault.case} | {fault.sees} | `{fault.test.split('::')[1]}` |")
  test = "test_each_bad_input_is_one_line_a_nonzero_exit_and_nothing_written"
  for bad in BAD_INPUTS:
    command = readable(" ".join(bad.args)).replace("|", "\\|")
    env = "".join(f"{k}={v} " for k, v in bad.env)
    rows.append(f"| {bad.case}: `{env}python -m {command}` | `deeplab_jax: error: "
                f"{readable(bad.message)}...`, exit {bad.exit_code}, nothing written | `{test}` |")
  return "\n".join(rows) + "\n"
