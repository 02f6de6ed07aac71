# Sourced by the CPU recipes (train_default_cpu.sh, distill_default_cpu.sh): how many processes run dgaetok.
#
#   PROCS    processes (default 1). More than one: `torchrun` on this machine, the global batch split between
#            them (DDP over gloo), each with one thread unless THREADS says otherwise. On a 2-core CPU, two
#            one-thread processes train the bundled default's model 1.27x faster than one process with two
#            threads (benchmarks/RESULTS.md, "Processes or threads on a CPU").
#   THREADS  threads of each process (default: all cores for one process, 1 for several).
#   NICE     their niceness (default 10: they train in the background of other work).
#
# A run folder keeps its shards (processes x --accum) for good, so that it resumes exactly; `accum_for` gives
# the --accum that keeps them when it resumes with another PROCS (started with 2, resumed with 1: --accum 2).
procs=${PROCS:-1}
if [ -n "${THREADS:-}" ]; then
  export OMP_NUM_THREADS=$THREADS
elif [ "$procs" -gt 1 ]; then
  export OMP_NUM_THREADS=1
fi

run_dgaetok() {  # dgaetok ARGS..., in $procs processes
  if [ "$procs" -gt 1 ]; then
    nice -n "${NICE:-10}" torchrun --standalone --nproc_per_node "$procs" -m dgaetok.cli "$@"
  else
    nice -n "${NICE:-10}" dgaetok "$@"
  fi
}

accum_for() {  # RUN_DIR -> the --accum for $procs processes (1 for a new run)
  python - "$1/checkpoint.safetensors" "$procs" <<'PY'
import json, os, sys
path, procs = sys.argv[1], int(sys.argv[2])
if not os.path.exists(path):
    print(1)
    sys.exit()
from safetensors import safe_open
with safe_open(path, "pt") as fh:
    saved = json.loads(fh.metadata()["train_config"])
shards = saved.get("shards", saved["world"] * saved.get("accum", 1))
if shards % procs:
    sys.exit(f"{path}: this run has {shards} shard(s) (processes x accum); PROCS={procs} does not divide them")
print(shards // procs)
PY
}
