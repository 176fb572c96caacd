#!/usr/bin/env python3
"""Many models on few devices: one liftoff server whose memory budget holds a third of N models
(readers added with POST /reader, unloaded least-recently-used first and reloaded on demand),
next to what a user would do without it: one `liftoff serve` process per model.

Traffic: R requests at concurrency C over the N models, uniform and Zipf(1.1), OpenAI
completions of T tokens (`ignore_eos`), the model picked per request from a seeded sequence
so both setups see the same one. Reported per run: output tokens/s, p50/p99 request latency,
loads, unloads and seconds per reload (from /metrics), and the resident memory of the
processes at the end.

Usage: many_models.py --bin target/release/liftoff --models DIR... --out docs/bench
(benches/many_models.sh makes the checkpoints and calls this with the reference venv's python)
"""
import argparse
import asyncio
import json
import os
import random
import time

import httpx

import liftoff_server
from liftoff_server import metric_sum, stop


# Every reader: CPU, 512-token context, batches of 8, 32 MiB of KV cache.
READER = ["--device", "cpu", "--max-sequence-length", "512", "--max-batch-size", "8", "--kv-cache-memory-mib", "32"]


def start(binary, args):
    return liftoff_server.start(binary, READER + args)


def rss_bytes(pid):
    """Resident memory of a process and its children (worker processes)."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def readers(mport):
    groups = httpx.get(f"http://127.0.0.1:{mport}/reader_groups", timeout=10).json()
    return {r["reader_id"]: r for rs in groups.values() for r in rs}


def wait_settled(mport, reader_id):
    deadline = time.time() + 300
    while time.time() < deadline:
        r = readers(mport).get(reader_id)
        if r and r["state"] in ("ready", "unloaded"):
            return r
        if r and r["state"] == "failed":
            raise RuntimeError(f"{reader_id} failed: {r.get('error')}")
        time.sleep(0.05)
    raise RuntimeError(f"{reader_id} did not load")


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        raise ValueError("no samples")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def drive(urls, picks, concurrency, tokens):
    """Sends one request per pick (picks[i] is the model), `concurrency` at a time."""
    latencies, out_tokens, errors = [], 0, []
    queue = list(enumerate(picks))
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            nonlocal out_tokens
            while queue:
                k, m = queue.pop(0)
                url, model = urls[m]
                body = {"prompt": f"Request {k} for model {m}:", "max_tokens": tokens, "temperature": 0,
                        "ignore_eos": True}
                if model:
                    body["model"] = model
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                out_tokens += r.json()["usage"]["completion_tokens"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return {"requests": len(picks), "errors": len(errors), "error_samples": errors[:3],
            "output_tokens": out_tokens, "seconds": seconds, "tokens_per_s": out_tokens / seconds,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99)}


def picks_for(dist, n_models, n_requests, seed):
    rng = random.Random(seed)
    if dist == "uniform":
        weights = [1.0] * n_models
    else:
        weights = [1.0 / (k + 1) ** 1.1 for k in range(n_models)]
        rng.shuffle(weights)
    return rng.choices(range(n_models), weights=weights, k=n_requests)


def one_server(a, models, dist, picks):
    """The many-model server: budget for a third of the models."""
    # The footprint of one reader, measured by a server of its own.
    proc, _, mport = start(a.bin, ["--model", models[0]])
    footprint = next(iter(readers(mport).values()))["memory_bytes"]
    stop(proc)
    fit = max(1, len(models) // 3)
    budget_mib = (fit * footprint + footprint // 2) >> 20
    root = os.path.dirname(os.path.abspath(models[0]))
    proc, port, mport = start(a.bin, ["--model", models[0], "--reader-id", "m0", "--models-memory-mib",
                                      str(budget_mib), "--model-root", root])
    try:
        for i, m in enumerate(models[1:], start=1):
            r = httpx.post(f"http://127.0.0.1:{mport}/reader", timeout=60, json={
                "model_name": m, "device": "cpu", "consumer_group": f"g{i}", "reader_id": f"m{i}",
                "page_cache_size": 32, "max_sequence_length": 512, "max_batch_size": 8})
            r.raise_for_status()
            wait_settled(mport, f"m{i}")
        before = {k: metric_sum(mport, k) for k in
                  ("liftoff_reader_loads_total", "liftoff_reader_unloads_total",
                   "liftoff_reader_load_seconds_sum", "liftoff_reader_load_seconds_count")}
        urls = [(f"http://127.0.0.1:{port}/v1/completions", f"m{i}") for i in range(len(models))]
        result = asyncio.run(drive(urls, picks, a.concurrency, a.tokens))
        after = {k: metric_sum(mport, k) for k in before}
        loads = after["liftoff_reader_load_seconds_count"] - before["liftoff_reader_load_seconds_count"]
        result.update({
            "setup": f"one liftoff server, budget {budget_mib} MiB ({fit} of {len(models)} models)",
            "distribution": dist,
            "loads": after["liftoff_reader_loads_total"] - before["liftoff_reader_loads_total"],
            "unloads": after["liftoff_reader_unloads_total"] - before["liftoff_reader_unloads_total"],
            "seconds_per_reload": ((after["liftoff_reader_load_seconds_sum"] - before["liftoff_reader_load_seconds_sum"])
                                   / loads) if loads else 0.0,
            "footprint_mib": footprint / 2**20,
            "rss_mib": rss_bytes(proc.pid) / 2**20,
        })
        return result
    finally:
        stop(proc)


def per_model_servers(a, models, dist, picks):
    """What a user would do without readers at run time: a server per model."""
    procs = []
    try:
        for i, m in enumerate(models):
            procs.append(start(a.bin, ["--model", m, "--reader-id", f"m{i}"]))
        urls = [(f"http://127.0.0.1:{port}/v1/completions", None) for _, port, _ in procs]
        result = asyncio.run(drive(urls, picks, a.concurrency, a.tokens))
        result.update({"setup": f"{len(models)} liftoff servers, one per model", "distribution": dist,
                       "loads": 0, "unloads": 0, "seconds_per_reload": 0.0,
                       "rss_mib": sum(rss_bytes(p.pid) for p, _, _ in procs) / 2**20})
        return result
    finally:
        for p, _, _ in procs:
            stop(p)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dists = ["uniform", "zipf"]
    setups = sorted({r["setup"] for r in results}, key=lambda s: not s.startswith("one"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, [("tokens_per_s", "output tokens/s"), ("p99_s", "p99 latency (s)"),
                                       ("rss_mib", "resident memory (MiB)")]):
        width = 0.8 / len(setups)
        for j, setup in enumerate(setups):
            ys = [next(r[key] for r in results if r["setup"] == setup and r["distribution"] == d) for d in dists]
            ax.bar([i + j * width for i in range(len(dists))], ys, width, label=setup)
        ax.set_xticks([i + width * (len(setups) - 1) / 2 for i in range(len(dists))], dists)
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    results = []
    for dist in ("uniform", "zipf"):
        picks = picks_for(dist, len(a.models), a.requests, seed=7)
        for run in (one_server, per_model_servers):
            r = run(a, a.models, dist, picks)
            print(json.dumps(r), flush=True)
            if r["errors"]:
                raise RuntimeError(f"{r['setup']}: {r['errors']} requests failed: {r['error_samples']}")
            results.append(r)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "many_models.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(a.out, "many_models.png"))
    print(f"wrote {a.out}/many_models.json and many_models.png")


if __name__ == "__main__":
    main()
