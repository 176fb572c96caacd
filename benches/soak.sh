#!/usr/bin/env bash
# The soak test at full size: 10,000 requests (or $1) at concurrency 32 against one server on
# the default model, streaming and not, random lengths, 30 % of clients hanging up mid-stream,
# 10 % bad requests (tests/soak.rs). Prints the report and writes it into docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
scripts/fetch_default_model.sh >/dev/null
LOG=$(mktemp)
LIFTOFF_SOAK_REQUESTS="$N" cargo test --release --test soak -- --nocapture | tee "$LOG"
python3 - "$LOG" <<'PY'
import datetime, json, platform, re, sys
line = next(l for l in open(sys.argv[1]) if l.startswith("SOAK "))
r = json.loads(line[5:])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
rows = "\n".join(f"| {o['kind']} | {o['status']} | {o['count']} |" for o in r["outcomes"])
section = f"""<!-- benches/soak.sh: begin -->
Measured {datetime.date.today()} by `benches/soak.sh {r['requests']}` on {cpu} (default model, `--max-batch-size 32`):
{r['requests']} requests at concurrency {r['concurrency']} in {r['seconds']:.0f} s.

| client | status | requests |
| --- | ---: | ---: |
{rows}

Afterwards: {r['running_after']:.0f} running, {r['waiting_after']:.0f} waiting, {r['kv_blocks_used_after']:.0f} KV blocks held
({r['kv_blocks_cached_after']:.0f} free blocks still caching prefixes), {r['cancelled']:.0f} streams cancelled by their
client. Resident memory {r['rss_kib_at_baseline']/1024:.0f} MiB after {r['baseline_after_requests']} requests,
{r['rss_kib_after']/1024:.0f} MiB at the end ({r['rss_growth']*100:+.2f} %).
<!-- benches/soak.sh: end -->"""
path = "docs/reliability.md"
doc = open(path).read()
doc = re.sub(r"<!-- benches/soak.sh: begin -->.*<!-- benches/soak.sh: end -->", lambda m: section, doc, flags=re.S)
open(path, "w").write(doc)
print(f"wrote {path}")
PY
