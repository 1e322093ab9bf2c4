#!/usr/bin/env bash
# Several deeplab-jax processes on one machine with the explicit flags (--coordinator_address,
# --num_processes, --process_id): one process per GPU on a multi-GPU node (each sees one GPU), or a
# multi-process rehearsal on a CPU. One process over all of a node's GPUs needs no script at all:
# python -m deeplab_jax.main --config=... --workdir=... uses every local device.
#
#   launch/local_processes.sh N --config=configs/voc_xception.py --workdir=DIR [--config.x=y ...]
#
# PORT (default 12355) is the coordinator's; GPUS_PER_PROCESS=1 gives process i the GPU(s) i (set 0
# on a CPU). SIGTERM or Ctrl-C is passed to every process (each saves the same step and exits 143);
# the exit status is the first non-zero one, 0 when all finished.
set -uo pipefail

N=${1:?usage: launch/local_processes.sh N --config=... --workdir=... [overrides]}
shift
PORT=${PORT:-12355}
GPUS_PER_PROCESS=${GPUS_PER_PROCESS:-1}
PYTHON=${PYTHON:-python}
pids=()

# shellcheck disable=SC2317,SC2329  # called by the trap
forward() {
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap forward TERM INT

for ((i = 0; i < N; i++)); do
  env=()
  if ((GPUS_PER_PROCESS > 0)); then
    first=$((i * GPUS_PER_PROCESS))
    env=(CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))")
  fi
  env "${env[@]}" "$PYTHON" -m deeplab_jax.main "$@" --coordinator_address="localhost:$PORT" \
    --num_processes="$N" --process_id="$i" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # wait returns early when a trapped signal arrives: wait again until this process has ended.
  while true; do
    wait "$pid"
    code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if ((code != 0 && status == 0)); then status=$code; fi
done
exit "$status"
