#!/usr/bin/env python3
"""Structured output's cost: output tokens/s at concurrency C with every request constrained by
a JSON schema (OpenAI `response_format`) against the same requests unconstrained (EOS ignored,
so both keep the batch full), on one liftoff server, runs alternated; plus the mask work per
constrained step from /metrics.

Usage: structured.py --bin target/release/liftoff [--concurrency 16] [--requests 48] [--runs 3]
"""
import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

import liftoff_server
from liftoff_server import metric_sum

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["products"],
    "properties": {"products": {
        "type": "array", "minItems": 4, "maxItems": 4,
        "items": {"type": "object", "additionalProperties": False, "required": ["name", "price", "tags"],
                  "properties": {"name": {"type": "string", "maxLength": 24},
                                 "price": {"type": "number", "minimum": 0, "maximum": 1000},
                                 "tags": {"type": "array", "minItems": 2, "maxItems": 2,
                                          "items": {"type": "string", "maxLength": 10}}}}}},
}


async def run(port, n, concurrency, constrained, max_tokens):
    queue = list(range(n))
    tokens, errors, invalid, truncated = 0, 0, 0, 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            nonlocal tokens, errors, invalid, truncated
            while queue:
                i = queue.pop(0)
                body = {"messages": [{"role": "user", "content": f"List four products for shop {i} as JSON."}],
                        "max_tokens": max_tokens, "temperature": 0}
                if constrained:
                    body["response_format"] = {"type": "json_schema",
                                               "json_schema": {"name": "shop", "schema": SCHEMA}}
                else:
                    body["ignore_eos"] = True
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                v = r.json()
                tokens += v["usage"]["completion_tokens"]
                if constrained and v["choices"][0]["finish_reason"] == "length":
                    truncated += 1
                elif constrained:
                    try:
                        json.loads(v["choices"][0]["message"]["content"])
                    except ValueError:
                        invalid += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        secs = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "errors": errors, "invalid": invalid,
            "truncated": truncated}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--out", default="docs/bench/structured.json")
    a = ap.parse_args()
    proc, port, mport = liftoff_server.start(
        a.bin, ["--device", "cpu", "--max-batch-size", str(a.concurrency), "--max-sequence-length", "1024"])
    try:
        asyncio.run(run(port, a.concurrency, a.concurrency, True, 32))  # warm-up (and the compiler)
        free, constrained = [], []
        steps0, mask0 = metric_sum(mport, "liftoff_constrained_steps_total"), metric_sum(mport, "liftoff_constrained_mask_seconds_total")
        for _ in range(a.runs):
            free.append(asyncio.run(run(port, a.requests, a.concurrency, False, a.max_tokens)))
            constrained.append(asyncio.run(run(port, a.requests, a.concurrency, True, a.max_tokens)))
            print(json.dumps({"free": free[-1], "constrained": constrained[-1]}), flush=True)
        steps = metric_sum(mport, "liftoff_constrained_steps_total") - steps0
        mask = metric_sum(mport, "liftoff_constrained_mask_seconds_total") - mask0
        steps_all = metric_sum(mport, "liftoff_steps_total")
        step_time = metric_sum(mport, "liftoff_step_time_seconds_total") / max(steps_all, 1)
    finally:
        liftoff_server.stop(proc)
    if any(r["errors"] or r["invalid"] for r in free + constrained):
        raise RuntimeError(f"failed or invalid requests: {free + constrained}")
    med = lambda rs: statistics.median(r["tokens_per_s"] for r in rs)  # noqa: E731
    summary = {
        "concurrency": a.concurrency, "requests_per_run": a.requests, "runs": a.runs,
        "free_tokens_per_s": med(free), "constrained_tokens_per_s": med(constrained),
        "ratio": med(constrained) / med(free),
        "mask_ms_per_constrained_step": 1e3 * mask / steps if steps else 0.0,
        "mean_step_ms": 1e3 * step_time,
        "runs_detail": {"free": free, "constrained": constrained},
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs_detail"}))


if __name__ == "__main__":
    main()
