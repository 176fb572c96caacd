#!/usr/bin/env bash
# Tensor parallelism on CPU: the same model served with TP=1 in the launcher's process, TP=1 as
# one worker process (--isolate-workers: the IPC cost alone), and TP=2 (two worker processes and
# the CPU all-reduce). `liftoff bench run` drives each at concurrency 1 and 8; /metrics gives
# the per-step split: launcher step time, rank 0's forward time, and its time in collectives.
#
# Usage: benches/tensor_parallel.sh MODEL_DIR [OUT_JSON]
#   MODEL_DIR: e.g. the cpu-bench checkpoint of scripts/make_bench_checkpoint.py
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: benches/tensor_parallel.sh MODEL_DIR [OUT_JSON]}
OUT=${2:-docs/bench/tensor_parallel.json}
BIN=target/release/liftoff
cargo build --release -p liftoff >&2
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

metrics() { curl -sf http://127.0.0.1:18201/metrics; }

run() { # label, flags...
  local label=$1; shift
  "$BIN" serve --model "$MODEL" --host 127.0.0.1 --port 18200 --management-port 18201 \
    --max-sequence-length 1024 --kv-cache-memory-mib 256 --log-level warn "$@" &
  local pid=$!
  for _ in $(seq 1 240); do curl -sf http://127.0.0.1:18200/health >/dev/null && break; sleep 0.5; done
  for c in 1 8; do
    metrics > "$TMP/$label-$c.before"
    "$BIN" bench run --url http://127.0.0.1:18200 --label "$label" --concurrency "$c" \
      --max-tokens 32 --out "$TMP/$label-$c.json" >&2
    metrics > "$TMP/$label-$c.after"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

run tp1-in-process --tensor-parallel 1
run tp1-worker --tensor-parallel 1 --isolate-workers
run tp2 --tensor-parallel 2

python3 - "$TMP" "$OUT" <<'PY'
import json, sys, os
tmp, out = sys.argv[1], sys.argv[2]
def read(path):
    vals = {}
    for line in open(path):
        if line.startswith("#") or "{" not in line:
            continue
        name = line.split("{")[0]
        vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return vals
rows = []
for label in ["tp1-in-process", "tp1-worker", "tp2"]:
    for c in [1, 8]:
        b, a = read(f"{tmp}/{label}-{c}.before"), read(f"{tmp}/{label}-{c}.after")
        d = {k: a.get(k, 0) - b.get(k, 0) for k in a}
        steps = d.get("liftoff_steps_total", 0) or 1
        bench = json.load(open(f"{tmp}/{label}-{c}.json"))
        level = bench["levels"][0] if "levels" in bench else bench["results"][0]
        step = d.get("liftoff_step_time_seconds_total", 0) / steps * 1000
        compute = d.get("liftoff_worker_compute_time_seconds_total", 0) / steps * 1000
        comm = d.get("liftoff_allreduce_time_seconds_total", 0) / steps * 1000
        rows.append({"config": label, "concurrency": c, "steps": int(steps),
                     "step_ms": round(step, 2),
                     "rank0_forward_ms": round(compute, 2) if compute else None,
                     "allreduce_ms": round(comm, 2) if compute else None,
                     "ipc_ms": round(step - compute, 2) if compute else None,
                     "output_tok_s": level.get("output_tokens_per_s")})
json.dump(rows, open(out, "w"), indent=1)
print("| config | concurrency | steps | step ms | rank-0 forward ms | all-reduce ms | IPC ms | output tok/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    f = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
    print(f"| {r['config']} | {r['concurrency']} | {r['steps']} | {f(r['step_ms'])} | {f(r['rank0_forward_ms'])} | {f(r['allreduce_ms'])} | {f(r['ipc_ms'])} | {f(r['output_tok_s'])} |")
PY
