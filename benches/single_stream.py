#!/usr/bin/env python3
"""Single-stream prompt and decode speed: liftoff vs llama.cpp's llama-server, same GGUF, same
prompt, runs interleaved in one session. Prints a Markdown table and writes JSON.

llama-server reports its own `timings` (prompt_per_second, predicted_per_second); liftoff's
`generate --format json` reports prompt_tokens_per_s and decode_tokens_per_s measured the same
way (model load and HTTP excluded).

Usage: single_stream.py --liftoff target/release/liftoff --llama-server PATH --model GGUF
"""
import argparse, json, os, statistics, subprocess, sys, time, urllib.request

PROMPT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; then came stored programs, assemblers, and compilers that let people "
    "describe what they wanted instead of how the hardware should do it. Operating systems "
    "hid the details of devices, networks hid the distance between machines, and today "
    "language models hide much of the effort of writing text. Write a short essay on what "
    "the next abstraction might be, and why it matters for ordinary people."
)


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def wait_health(url, proc, secs=120):
    t = time.time()
    while time.time() - t < secs:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("server did not become healthy")


def run_llama(port, n, prompt=PROMPT):
    r = post(f"http://127.0.0.1:{port}/completion", {"prompt": prompt, "n_predict": n, "temperature": 0,
                                                       "ignore_eos": True, "cache_prompt": False})
    t = r["timings"]
    return t["prompt_n"], t["prompt_per_second"], t["predicted_per_second"]


def run_liftoff(binary, model, n, env=None, prompt=PROMPT):
    out = subprocess.run([binary, "generate", "--model", model, "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", str(n), "--ignore-eos", "--format", "json"],
                         capture_output=True, text=True, env=env, check=True)
    v = json.loads(out.stdout)
    return len(v["prompt_token_ids"]), v["prompt_tokens_per_s"], v["decode_tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--liftoff", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()

    server = subprocess.Popen([a.llama_server, "-m", a.model, "-t", str(a.threads), "-c", "4096", "--parallel", "1",
                               "--host", "127.0.0.1", "--port", str(a.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health(f"http://127.0.0.1:{a.port}/health", server)
        configs = {
            "llama.cpp llama-server": lambda: run_llama(a.port, a.new_tokens),
            "liftoff (own int8 GEMM)": lambda: run_liftoff(a.liftoff, a.model, a.new_tokens, dict(os.environ)),
            "liftoff (candle quantized matmul)": lambda: run_liftoff(
                a.liftoff, a.model, a.new_tokens, dict(os.environ, LIFTOFF_DISABLE_FAST_QMATMUL="1")),
        }
        for f in configs.values():  # warm-up (page cache, first-touch)
            f()
        results = {k: [] for k in configs}
        for _ in range(a.runs):
            for k, f in configs.items():
                results[k].append(f())
    finally:
        server.terminate()
        server.wait()

    rows = {}
    for k, rs in results.items():
        rows[k] = {"prompt_tokens": rs[0][0], "prompt_tok_s": statistics.median(r[1] for r in rs),
                   "decode_tok_s": statistics.median(r[2] for r in rs), "runs": rs}
    base = rows["llama.cpp llama-server"]
    print(f"| engine | prompt tokens | prompt tok/s (median of {a.runs}) | decode tok/s (median) | decode vs llama.cpp |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['prompt_tokens']} | {r['prompt_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x |")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
