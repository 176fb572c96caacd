#!/usr/bin/env python3
"""The CPU benchmark (issue: speed), one run on an idle machine:

1. the machine's limits (`liftoff bench limits`: read bandwidth, int8 multiply-add peak, the
   int8 GEMM's achieved rate);
2. prompt (512 tokens) and decode (128 tokens) speed, liftoff (`generate --format json`) and
   llama.cpp's llama-server (its own `timings`), same GGUF, same prompt text, runs alternated;
   liftoff's decode against the memory-bandwidth bound as in 4 (the mean around each run);
3. serving at concurrency 1, 4, 16, 32 with `liftoff bench run` against `liftoff serve` and
   `llama-server --parallel N` (N = 16 for concurrency up to 16, 32 for 32);
4. dense decode (the GGUF dequantized to f32 and to bf16 at load, `generate --dtype`) against
   the memory-bandwidth bound: the mean read bandwidth (`liftoff bench bandwidth`) over 2 s
   right before and 2 s right after each run (on a shared host it jumps between levels every
   few hundred ms and moves by tens of percent from one minute to the next);

each repeated `--runs` times, medians reported, liftoff's figures also as a fraction of the
machine's limit. Writes docs/bench/cpu.json, the plot, and the tables between the markers in
docs/benchmarks.md.

Usage: benches/cpu.py --liftoff BIN --llama-server BIN --model GGUF [--runs 3] [--isa avx2 --peer-build TEXT]

With `--isa`, liftoff runs that kernel family (`LIFTOFF_CPU_KERNELS`) and the results go to a
section, JSON and plot of their own (`benches/cpu.sh 3 avx2` pairs it with an AVX2-only
llama.cpp, the path of CPUs without AVX-512).
"""
import argparse, datetime, json, math, os, re, statistics, subprocess, sys

from single_stream import post, run_liftoff, run_llama, wait_health  # shared with the older benchmark

# SmolLM2-135M (the default GGUF): multiply-adds per token of the layers' linears
# (30 x (576x960 qkv + 576x576 o + 576x3072 gate/up + 1536x576 down)) and of the LM head.
LAYER_MACS = 30 * (576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576)
HEAD_MACS = 576 * 49152
# Its weights are those multiply-adds' operands, each read once per decoded token (the tied
# embedding counted once, as the LM head; the norms' 35 K values left out).
DENSE_PARAMS = LAYER_MACS + HEAD_MACS
DENSE_DTYPES = {"f32": 4, "bf16": 2}


def markers(isa):
    tag = f"benches/cpu.py {isa}" if isa else "benches/cpu.py"
    return f"<!-- {tag}: begin -->", f"<!-- {tag}: end -->"

TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels; then came stored programs, assemblers and compilers that let people describe what they "
    "wanted instead of how the hardware should do it. Operating systems hid the details of devices, "
    "networks hid the distance between machines, and databases hid the layout of records on disk. "
)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median(xs):
    xs = list(xs)
    if not xs or any(x is None or x != x or x in (float("inf"), float("-inf")) for x in xs):
        raise SystemExit(f"a measurement is missing or not finite: {xs}")
    return statistics.median(xs)


def llama_server(binary, model, parallel, port, threads):
    args = [binary, "-m", model, "-t", str(threads), "-c", str(512 * max(parallel, 8)), "--parallel", str(parallel),
            "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_health(f"http://127.0.0.1:{port}/health", proc)
    return proc


def prompt_of(port, n):
    """A text of exactly `n` tokens (llama.cpp's tokenizer equals liftoff's, see MODELS.md)."""
    ids = post(f"http://127.0.0.1:{port}/tokenize", {"content": TEXT * 40})["tokens"][:n]
    return post(f"http://127.0.0.1:{port}/detokenize", {"tokens": ids})["content"]


def single_stream(a, prompt, new_tokens):
    srv = llama_server(a.llama_server, a.model, 1, a.port, a.threads)
    rows = {"liftoff": [], "llama.cpp": []}
    try:
        def row(measured):
            prompt_tokens, prompt_tok_s, decode_tok_s = measured
            return {"prompt_tokens": prompt_tokens, "prompt_tok_s": prompt_tok_s, "decode_tok_s": decode_tok_s}

        def llama():
            return row(run_llama(a.port, new_tokens, prompt))

        def liftoff():
            return row(run_liftoff(a.liftoff, a.model, new_tokens, prompt=prompt))

        llama(), liftoff()  # warm-up: page cache, first touch
        for _ in range(a.runs):
            rows["llama.cpp"].append(llama())
            # The decode's bandwidth bound, as for the dense decode: the mean read bandwidth of
            # 2 s right before and 2 s right after the run.
            before = bandwidth_series(a)
            r = liftoff()
            after = bandwidth_series(a)
            r["bandwidth_mean"] = mean_of(before, after)
            rows["liftoff"].append(r)
    finally:
        stop(srv)
    return rows


def serving(a, out_dir, sfx=""):
    levels = [1, 4, 16, 32]
    runs = {"liftoff": [], "llama.cpp": []}
    for i in range(a.runs):
        srv = subprocess.Popen([a.liftoff, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", str(a.port),
                                "--management-port", str(a.port + 1), "--max-batch-size", "32"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_health(f"http://127.0.0.1:{a.port}/health", srv)
            path = f"{out_dir}/cpu_serving{sfx}_liftoff_{i}.json"
            subprocess.run([a.liftoff, "bench", "run", "--url", f"http://127.0.0.1:{a.port}", "--label", "liftoff",
                            "--concurrency", ",".join(map(str, levels)), "--out", path], check=True)
            runs["liftoff"].append(json.load(open(path)))
        finally:
            stop(srv)
        parts = []
        for parallel, lv in ((16, [c for c in levels if c <= 16]), (32, [32])):
            srv = llama_server(a.llama_server, a.model, parallel, a.port + 2, a.threads)
            try:
                path = f"{out_dir}/cpu_serving{sfx}_llamacpp_{i}_p{parallel}.json"
                subprocess.run([a.liftoff, "bench", "run", "--url", f"http://127.0.0.1:{a.port + 2}",
                                "--label", "llama.cpp llama-server", "--concurrency", ",".join(map(str, lv)),
                                "--out", path], check=True)
                parts.append(json.load(open(path)))
            finally:
                stop(srv)
        merged = dict(parts[0])
        merged["levels"] = [l for p in parts for l in p["levels"]]
        json.dump(merged, open(f"{out_dir}/cpu_serving{sfx}_llamacpp_{i}.json", "w"), indent=1)
        runs["llama.cpp"].append(merged)
    return levels, runs


def bandwidth_series(a, seconds=2.0):
    """The read-bandwidth loop timed pass by pass for `seconds` (`liftoff bench bandwidth`)."""
    out = subprocess.run([a.liftoff, "bench", "bandwidth", "--seconds", str(seconds)], capture_output=True,
                         text=True, check=True).stdout
    d = json.loads(out)
    for k in ("mean_bytes_per_s", "best_bytes_per_s", "seconds"):
        if not (isinstance(d.get(k), (int, float)) and math.isfinite(d[k]) and d[k] > 0):
            raise SystemExit(f"`liftoff bench bandwidth` gave {k} = {d.get(k)}")
    if not d.get("pass_bytes_per_s"):
        raise SystemExit("`liftoff bench bandwidth` timed no pass")
    return d


def mean_of(*series):
    """All bytes over all time of several `bench bandwidth` stretches together."""
    return sum(s["bytes_per_pass"] * len(s["pass_bytes_per_s"]) for s in series) / sum(s["seconds"] for s in series)


def dense_decode(a, new_tokens=128):
    """Per dtype and run: decode tok/s, the bandwidth around it and the fraction of the bound
    the decode reached. The bound is the mean read bandwidth over 2 s right before and 2 s right
    after the run (all bytes over all time: what a reader streaming through the decode's whole
    time could have had) over the weights' bytes per token. The best single pass is kept too:
    on a shared host the bandwidth jumps between levels every few hundred ms, and a best pass
    measures the high level, not what the decode's seconds offered."""
    rows = {dt: [] for dt in DENSE_DTYPES}
    for _ in range(a.runs):
        for dt, size in DENSE_DTYPES.items():
            before = bandwidth_series(a)
            out = subprocess.run([a.liftoff, "generate", "--model", a.model, "--prompt", "The history of the Roman empire is",
                                  "--temperature", "0", "--max-new-tokens", str(new_tokens), "--ignore-eos",
                                  "--dtype", dt, "--format", "json"], capture_output=True, text=True, check=True)
            tok_s = json.loads(out.stdout)["decode_tokens_per_s"]
            after = bandwidth_series(a)
            if not (isinstance(tok_s, (int, float)) and math.isfinite(tok_s) and tok_s > 0):
                raise SystemExit(f"dense {dt} decode gave {tok_s} tok/s")
            weights = DENSE_PARAMS * size
            mean = mean_of(before, after)
            best = max(before["best_bytes_per_s"], after["best_bytes_per_s"])
            rows[dt].append({"decode_tok_s": tok_s,
                             "bandwidth_before": before["mean_bytes_per_s"], "bandwidth_after": after["mean_bytes_per_s"],
                             "bandwidth_mean": mean,
                             "best_pass_before": before["best_bytes_per_s"], "best_pass_after": after["best_bytes_per_s"],
                             "bound_tok_s": mean / weights, "fraction_of_bound": tok_s * weights / mean,
                             "fraction_of_best_pass": tok_s * weights / best})
    return rows


def level_medians(runs, c):
    ls = [next(l for l in r["levels"] if l["concurrency"] == c) for r in runs]
    # The spread is a property of each run: p99 over p50 of the same run, then the median of
    # those (a ratio of medians would pair one run's p99 with another's p50).
    spreads = [l["itl_ms"]["p99"] / l["itl_ms"]["p50"] for l in ls]
    return {
        "output_tok_s": median(l["output_tokens_per_s"] for l in ls),
        "ttft_p50": median(l["ttft_ms"]["p50"] for l in ls),
        "itl_p50": median(l["itl_ms"]["p50"] for l in ls),
        "itl_p99": median(l["itl_ms"]["p99"] for l in ls),
        "itl_spread": median(spreads),
        "itl_spreads": spreads,
        "failed": sum(l["failed"] for l in ls),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--liftoff", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--out-dir", default="docs/bench")
    ap.add_argument("--doc", default="docs/benchmarks.md")
    ap.add_argument("--isa", help="liftoff's kernel family (LIFTOFF_CPU_KERNELS); results get a section of their own")
    ap.add_argument("--peer-build", default="built for this CPU (native), without AMX",
                    help="how llama.cpp was built, for the table's heading")
    ap.add_argument("--render", metavar="JSON",
                    help="measure nothing: write the section from a run's raw data (its cpu*.json; the plot stays)")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    if a.isa:
        os.environ["LIFTOFF_CPU_KERNELS"] = a.isa
    sfx = f"_{a.isa}" if a.isa else ""
    if a.render:
        render(a, sfx, json.load(open(a.render)))
        return
    limits = json.loads(subprocess.run([a.liftoff, "bench", "limits"], capture_output=True, text=True, check=True).stdout)
    if a.isa and limits["detected_isa"] != a.isa:
        raise SystemExit(f"liftoff runs `{limits['detected_isa']}`, not `{a.isa}`: this CPU lacks it")
    srv = llama_server(a.llama_server, a.model, 1, a.port, a.threads)
    try:
        prompt = prompt_of(a.port, 512)
    finally:
        stop(srv)
    single = single_stream(a, prompt, 128)
    levels, serve = serving(a, a.out_dir, sfx)
    dense = dense_decode(a)
    subprocess.run([a.liftoff, "bench", "plot", f"{a.out_dir}/cpu_serving{sfx}_liftoff_0.json",
                    f"{a.out_dir}/cpu_serving{sfx}_llamacpp_0.json", "--out", f"{a.out_dir}/cpu_serving{sfx}.png"], check=True)

    model_bytes = os.path.getsize(a.model)
    s = {e: {k: median(r[k] for r in rs) for k in ("prompt_tokens", "prompt_tok_s", "decode_tok_s")} for e, rs in single.items()}
    sv = {e: {c: level_medians(rs, c) for c in levels} for e, rs in serve.items()}
    result = {"date": datetime.date.today().isoformat(), "limits": limits, "model_bytes": model_bytes,
              "single_stream_runs": single, "single_stream": s, "serving": sv, "dense_decode_runs": dense,
              "runs": a.runs}
    json.dump(result, open(f"{a.out_dir}/cpu{sfx}.json", "w"), indent=1)
    render(a, sfx, result)


def render(a, sfx, result):
    """Writes the doc's section (between its markers) from one run's raw data."""
    MARK_BEGIN, MARK_END = markers(a.isa)
    limits, model_bytes = result["limits"], result["model_bytes"]
    single, s, dense = result["single_stream_runs"], result["single_stream"], result["dense_decode_runs"]
    # JSON turned the concurrency levels into strings.
    sv = {e: {int(c): v for c, v in lv.items()} for e, lv in result["serving"].items()}
    levels = sorted(sv["liftoff"])
    bw = limits["read_bandwidth_bytes_per_s"]
    isa = limits["detected_isa"]
    # The compute bound is the peak of the kernels the Q4_1 layers run on: AMX takes only Q8_0
    # matrices from 64 rows (`amx::worth_it`), the Q4_1 ones stay on AVX-512 VNNI.
    q4_isa = "avx512vnni" if isa == "amx" else isa
    fam = next(k for k in limits["kernels"] if k["isa"] == q4_isa)
    peak = fam.get("int8_peak_macs_per_s") or float("nan")

    lo, lc = s["liftoff"], s["llama.cpp"]
    out = []
    w = out.append
    w(MARK_BEGIN)
    w(f"Measured {result['date']} by `benches/cpu.sh` on **{limits['cpu']}**, {limits['threads']} threads, "
      f"flags {', '.join(limits['flags'])}; liftoff's kernels: `{isa}`{' (forced)' if a.isa else ''}; llama.cpp "
      f"{a.peer_build}. Median of {result['runs']} runs, liftoff and "
      f"llama.cpp alternated in one session on an idle machine. Raw data: `docs/bench/cpu{sfx}.json`.")
    w("")
    w("**The machine's limits** (`liftoff bench limits`):")
    w("")
    w("| limit | value |")
    w("| --- | ---: |")
    w(f"| memory read bandwidth, all threads (best of 5 passes of 512 MB) | {bw / 1e9:.1f} GB/s |")
    for k in limits["kernels"]:
        if not k["available"]:
            w(f"| {k['isa']} | not on this CPU |")
            continue
        pk = k.get("int8_peak_macs_per_s")
        w(f"| {k['isa']}: int8 multiply-add peak (register loop) | {pk / 1e9:.0f} G/s |" if pk else
          f"| {k['isa']}: int8 multiply-add peak | - |")
        w(f"| {k['isa']}: Q4_1 GEMM 512x1536x576 achieved (a prompt's batch) | {k['gemm_q4_1_512x1536x576_macs_per_s'] / 1e9:.0f} G/s |")
        w(f"| {k['isa']}: Q4_1 GEMM 16x1536x576 achieved (a decode step's at concurrency 16) | {k['gemm_q4_1_16x1536x576_macs_per_s'] / 1e9:.0f} G/s |")
        if k.get("gemm_q8_0_512x1536x576_macs_per_s"):
            w(f"| {k['isa']}: Q8_0 GEMM 512x1536x576 achieved (Q8_0 weights: the LM head, Q8_0 files) | {k['gemm_q8_0_512x1536x576_macs_per_s'] / 1e9:.0f} G/s |")
    w("")
    w(f"**Single stream** (prompt of {lo['prompt_tokens']:.0f} tokens for liftoff, {lc['prompt_tokens']:.0f} for llama.cpp; "
      f"128 tokens decoded, greedy, EOS ignored):")
    w("")
    w("| measure | liftoff | llama.cpp | ratio | liftoff vs the machine's limit |")
    w("| --- | ---: | ---: | ---: | --- |")
    pp_bound = peak / LAYER_MACS
    dec_bw = median(r["bandwidth_mean"] for r in single["liftoff"])
    dec_bound = dec_bw / model_bytes
    dec_fraction = median(r["decode_tok_s"] * model_bytes / r["bandwidth_mean"] for r in single["liftoff"])
    w(f"| prompt tok/s | {lo['prompt_tok_s']:.1f} | {lc['prompt_tok_s']:.1f} | **{lo['prompt_tok_s'] / lc['prompt_tok_s']:.2f}x** | "
      f"{100 * lo['prompt_tok_s'] / pp_bound:.0f} % of the `{q4_isa}` int8 peak ({pp_bound:.0f} tok/s at {LAYER_MACS / 1e6:.0f} M multiply-adds per token) |")
    w(f"| decode tok/s | {lo['decode_tok_s']:.1f} | {lc['decode_tok_s']:.1f} | **{lo['decode_tok_s'] / lc['decode_tok_s']:.2f}x** | "
      f"{100 * dec_fraction:.0f} % of the bandwidth bound (median of the runs; {dec_bound:.0f} tok/s: the "
      f"{model_bytes / 1e6:.0f} MB file once per token at {dec_bw / 1e9:.1f} GB/s, the mean read bandwidth of the "
      f"2 s before and after each run) |")
    w("")
    w("**Serving** (`liftoff bench run`: ~100-token prompts, 64 new tokens, EOS ignored; llama-server "
      "`--parallel 16` up to concurrency 16, `--parallel 32` at 32; liftoff `--max-batch-size 32`; "
      "p99/p50 is each run's own p99 over its own p50, the median of the runs first, then each run's; the compute "
      f"bound is the `{q4_isa}` int8 peak over the layers' and the LM head's multiply-adds per output token, "
      "prompts not counted):")
    w("")
    w("| concurrency | liftoff tok/s | llama.cpp tok/s | ratio | liftoff ITL p50 / p99 ms | p99/p50 (per run) | llama.cpp ITL p50 / p99 ms | TTFT p50 liftoff / llama.cpp ms | liftoff vs compute bound | failed |")
    w("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        L, C = sv["liftoff"][c], sv["llama.cpp"][c]
        # Every output token costs at least the layers and the LM head. The prompts' share is not
        # counted: the benchmark's prompts repeat a dozen topics, so the prefix cache serves most
        # of their blocks, and counting all ~100 tokens put runs above their "bound".
        bound = peak / (LAYER_MACS + HEAD_MACS)
        w(f"| {c} | {L['output_tok_s']:.1f} | {C['output_tok_s']:.1f} | **{L['output_tok_s'] / C['output_tok_s']:.2f}x** | "
          f"{L['itl_p50']:.1f} / {L['itl_p99']:.1f} | {L['itl_spread']:.2f} ({' / '.join(f'{x:.2f}' for x in L['itl_spreads'])}) | "
          f"{C['itl_p50']:.1f} / {C['itl_p99']:.1f} | "
          f"{L['ttft_p50']:.0f} / {C['ttft_p50']:.0f} | {100 * L['output_tok_s'] / bound:.0f} % | {L['failed']} / {C['failed']} |")
    w("")
    w(f"![liftoff and llama-server against concurrency](bench/cpu_serving{sfx}.png)")
    w("")
    w("**Dense decode against the bandwidth bound** (`liftoff generate --dtype f32|bf16` on the same GGUF, "
      "dequantized at load; a 7-token prompt, 128 tokens decoded; the bound is the mean read bandwidth "
      "(`liftoff bench bandwidth`: all bytes over all time) over 2 s right before and 2 s right after each run, "
      "over the weights' bytes per token; the KV cache's reads are not counted in it. The last column puts the "
      "decode against the fastest single pass of those 4 s instead):")
    w("")
    w("| dtype | weights per token | decode tok/s | mean read bandwidth, GB/s | bound, tok/s | fraction of the bound | per run | fraction of the best pass |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for dt, rs in dense.items():
        fr = [r["fraction_of_bound"] for r in rs]
        bws = [r["bandwidth_mean"] for r in rs]
        w(f"| {dt} | {DENSE_PARAMS * DENSE_DTYPES[dt] / 1e6:.0f} MB | {median(r['decode_tok_s'] for r in rs):.1f} | "
          f"{median(bws) / 1e9:.1f} (readings {min(min(r['bandwidth_before'], r['bandwidth_after']) for r in rs) / 1e9:.1f}-"
          f"{max(max(r['bandwidth_before'], r['bandwidth_after']) for r in rs) / 1e9:.1f}) | "
          f"{median(r['bound_tok_s'] for r in rs):.0f} | **{100 * median(fr):.0f} %** | "
          f"{' / '.join(f'{100 * f:.0f} %' for f in fr)} | "
          f"{100 * median(r['fraction_of_best_pass'] for r in rs):.0f} % |")
    w(MARK_END)
    section = "\n".join(out)
    doc = open(a.doc).read()
    if MARK_BEGIN in doc:
        doc = re.sub(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), lambda _: section, doc, flags=re.S)
    else:
        title = f" on the `{a.isa}` path" if a.isa else ""
        doc += f"\n## CPU speed against llama.cpp{title} (benches/cpu.sh)\n\n" + section + "\n"
    open(a.doc, "w").write(doc)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
