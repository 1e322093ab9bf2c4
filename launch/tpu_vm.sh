#!/usr/bin/env bash
# Train deeplab-jax on a Cloud TPU VM slice (one host or a multi-host pod) from a laptop with gcloud.
#
#   launch/tpu_vm.sh rehearse|create|setup|run|logs|watch|stop|delete|all [options] [-- --config.x=y ...]
#
#   rehearse  compile the config's train and eval steps for --accelerator here, on this machine
#           (python -m deeplab_jax.aot; needs this checkout's requirements, libtpu among them): says
#           whether they fit and how fast they should run, and fails if they do not fit
#   create  rehearse, then the TPU VM (--queued: a queued resource, which waits for capacity; --spot:
#           preemptible); a config that does not fit is refused before anything is created
#   setup   every worker: the repository at this checkout's commit, a venv, requirements, jax[tpu]
#   run     the training command on every worker (--worker=all), in the foreground; the log of each
#           worker is also kept in ~/deeplab_jax.log there
#   logs    follow every worker's log (--collect DIR: copy them into DIR/worker_N.log instead)
#   watch   run, and after a preemption (or any failure) wait for the VM, recreate and set it up if it
#           is gone, and run again: the job resumes from its gs:// workdir; ends when a run exits 0
#   stop, delete  the VM (delete also deletes a queued resource)
#   all     rehearse, create, setup, watch
#
# Options (also as environment variables in capitals: NAME, ZONE, ...):
#   --name=deeplab-jax --zone=us-central2-b --accelerator=v4-16 --runtime=tpu-ubuntu2204-base
#   --spot --queued --config=configs/voc_xception.py --workdir=gs://BUCKET/run (required for run)
#   --repo=URL (default: this checkout's origin) --commit=SHA (default: this checkout's HEAD)
#   --jax_version=0.10.2 --max_restarts=20 --retry_seconds=60 --dry_run (print every command only)
#   --no_rehearsal (create without compiling first, e.g. where libtpu does not install: macOS)
# Everything after -- goes to python -m deeplab_jax.main (config overrides), and to the rehearsal.
set -euo pipefail

NAME=${NAME:-deeplab-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-16}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/voc_xception.py}
WORKDIR=${WORKDIR:-}
JAX_VERSION=${JAX_VERSION:-0.10.2}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
DRY_RUN=${DRY_RUN:-0}
MAX_RESTARTS=${MAX_RESTARTS:-20}
RETRY_SECONDS=${RETRY_SECONDS:-60}
REPO=${REPO:-}
COMMIT=${COMMIT:-}
COLLECT=${COLLECT:-}
REHEARSAL=${REHEARSAL:-1}
PYTHON=${PYTHON:-python}
EXTRA=()

die() { echo "launch/tpu_vm.sh: error: $*" >&2; exit 2; }

ACTION=${1:-}
[[ -n "$ACTION" ]] || die "usage: launch/tpu_vm.sh rehearse|create|setup|run|logs|watch|stop|delete|all [options] [-- overrides]"
shift
while (($#)); do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --runtime=*) RUNTIME=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --repo=*) REPO=${1#*=} ;;
    --commit=*) COMMIT=${1#*=} ;;
    --jax_version=*) JAX_VERSION=${1#*=} ;;
    --max_restarts=*) MAX_RESTARTS=${1#*=} ;;
    --retry_seconds=*) RETRY_SECONDS=${1#*=} ;;
    --collect=*) COLLECT=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --no_rehearsal) REHEARSAL=0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see the top of launch/tpu_vm.sh)" ;;
  esac
  shift
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "$REPO" ]]; then REPO=$(git -C "$HERE" remote get-url origin 2>/dev/null || true); fi
if [[ -z "$COMMIT" ]]; then COMMIT=$(git -C "$HERE" rev-parse HEAD 2>/dev/null || true); fi

# Print a command (shell-quoted); run it unless --dry_run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all_workers() { tpu ssh "$NAME" --worker=all --command="$1"; }

# The config compiled for the slice on this machine, before anything is paid for: the training
# command's own overrides, the train and eval steps, a misfit refused with the batch that fits.
rehearse() {
  if [[ "$REHEARSAL" != 1 ]]; then echo "# (no rehearsal: --no_rehearsal)"; return; fi
  local cmd=("$PYTHON" -m deeplab_jax.aot --config="$CONFIG" --topology="$ACCELERATOR" --nosearch)
  if ((${#EXTRA[@]})); then cmd+=("${EXTRA[@]}"); fi
  (cd "$HERE" && run "${cmd[@]}") || die "the rehearsal of $CONFIG on $ACCELERATOR failed (its last line says why); nothing was created"
}

create() { rehearse; create_vm; }

create_vm() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"
    wait_ready
  else
    tpu create "$NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
}

state() { gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null || echo MISSING; }

wait_ready() {
  if [[ "$DRY_RUN" == 1 ]]; then echo "# (wait until the VM is READY)"; return; fi
  until [[ "$(state)" == READY ]]; do
    echo "waiting for $NAME to be READY (now $(state))"; sleep "$RETRY_SECONDS"
  done
}

setup() {
  [[ -n "$REPO" && -n "$COMMIT" ]] || die "setup needs --repo and --commit (or a git checkout with an origin)"
  # One commit on every host: mismatched code across workers hangs or corrupts a multi-host job.
  on_all_workers "set -e; if [ ! -d deeplab-jax ]; then git clone $(printf '%q' "$REPO") deeplab-jax; fi; \
cd deeplab-jax && git fetch --quiet origin && git checkout --quiet --force $(printf '%q' "$COMMIT") && \
python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -U pip && pip install -q -r requirements.txt && \
pip install -q -U 'jax[tpu]==$JAX_VERSION' && echo \"worker \$(hostname) at \$(git rev-parse HEAD)\""
}

train_command() {
  local cmd
  cmd="python -m deeplab_jax.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  if ((${#EXTRA[@]})); then cmd+=$(printf ' %q' "${EXTRA[@]}"); fi
  # A process left from an earlier run holds the TPU ("TPU in use"): stop it first (the pattern is
  # anchored on the python executable so that it cannot match this very shell's command line). The
  # code must be the setup's commit on every worker, or the processes disagree on the program.
  echo "cd deeplab-jax && . ~/venv/bin/activate && \
test \"\$(git rev-parse HEAD)\" = $(printf '%q' "$COMMIT") || { echo \"worker \$(hostname) is not at $COMMIT: run setup\"; exit 3; }; \
(pkill -f '^[^ ]*python[^ ]* -m deeplab_jax[.]main' && sleep 5 || true); rm -f /tmp/libtpu_lockfile; \
$cmd 2>&1 | tee ~/deeplab_jax.log; exit \${PIPESTATUS[0]}"
}

run_job() {
  [[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// folder: every worker writes there and a restarted VM reads it"
  on_all_workers "$(train_command)"
}

logs() {
  if [[ -n "$COLLECT" ]]; then
    local hosts=1 n endpoints
    if [[ "$DRY_RUN" != 1 ]]; then  # one network endpoint per worker host
      endpoints=$(gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
        --format='value(networkEndpoints[].ipAddress)')
      hosts=$(tr ';' '\n' <<<"$endpoints" | grep -c .)
    fi
    run mkdir -p "$COLLECT"
    for ((n = 0; n < hosts; n++)); do
      tpu scp "$NAME:~/deeplab_jax.log" "$COLLECT/worker_$n.log" --worker="$n"
    done
  else
    on_all_workers "tail -n 200 -F ~/deeplab_jax.log"
  fi
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet
  else
    tpu delete "$NAME" --quiet
  fi
}

watch() {
  local attempt=0
  while true; do
    if run_job && [[ "$DRY_RUN" != 1 ]]; then echo "launch/tpu_vm.sh: the run finished"; return 0; fi
    if [[ "$DRY_RUN" == 1 ]]; then echo "# (after a failed run: recreate if preempted, setup, run again)"; return 0; fi
    attempt=$((attempt + 1))
    ((attempt <= MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS restarts"
    local now
    now=$(state)
    case "$now" in
      READY) echo "the run stopped with the VM up: running again in ${RETRY_SECONDS}s (attempt $attempt)" ;;
      CREATING|STARTING|RESTARTING|REPAIRING) wait_ready ;;
      *) echo "$NAME is $now (preempted?): recreating it"
         delete || true
         create_vm  # rehearsed before the first creation
         wait_ready
         setup ;;
    esac
    sleep "$RETRY_SECONDS"
  done
}

case "$ACTION" in
  rehearse) rehearse ;;
  create) create ;;
  setup) setup ;;
  run) run_job ;;
  logs) logs ;;
  watch) watch ;;
  stop) tpu stop "$NAME" ;;
  delete) delete ;;
  all) create; setup; watch ;;
  *) die "unknown command $ACTION: rehearse|create|setup|run|logs|watch|stop|delete|all" ;;
esac
