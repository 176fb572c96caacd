#!/usr/bin/env python3
"""liftoff vs transformers on one random bf16 checkpoint, on the GPU: greedy tokens and the
log-probabilities liftoff reports (top 5 per step) against transformers' log-softmax at the same
ids, teacher-forced on liftoff's tokens.

Tolerance: bf16 keeps 8 significant bits, so each matmul output carries ~2^-9 relative
rounding; through 16 layers with different summation orders (cuBLAS vs liftoff's kernels) the
logits of a random model (std ~1) differ by a few 1e-2. A log-probability difference up to
0.1 is that noise; a wrong kernel (a misplaced head, a missing scale) moves them by whole units.
Greedy tokens may part where two logits are closer than the noise; the script reports the
first divergence and compares log-probabilities up to it.

Usage: gpu_logits.py LIFTOFF_BIN CHECKPOINT_DIR
"""
import json, math, subprocess, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The quick brown fox", "In a hole in the ground there lived", "1 2 3 4 5 6"]
NEW = 32
TOL = 0.1


def main():
    binary, ckpt = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    worst, failures = 0.0, 0
    for p in PROMPTS:
        out = subprocess.run([binary, "generate", "--model", ckpt, "--device", "cuda", "--dtype", "bf16",
                              "--max-new-tokens", str(NEW), "--ignore-eos", "--format", "json",
                              "--logprobs", "5", p], check=True, capture_output=True, text=True).stdout
        g = json.loads(out)
        ids, ours = g["prompt_token_ids"], g["token_ids"]
        with torch.no_grad():
            ref_greedy = model.generate(torch.tensor([ids]).cuda(), max_new_tokens=NEW, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            logits = model(torch.tensor([ids + ours]).cuda()).logits[0].float()
        lsm = torch.log_softmax(logits, dim=-1)
        agree = next((i for i, (a, b) in enumerate(zip(ours, ref_greedy)) if a != b), NEW)
        diff = 0.0
        for step, top in enumerate(g["top_logprobs"][:agree]):
            row = lsm[len(ids) - 1 + step]
            for tid, lp in top:
                d = abs(row[tid].item() - lp)
                # Python's max() drops NaN when it is not the first argument: count a NaN or an
                # infinity (on either side) as infinitely wrong.
                diff = diff if d <= diff else (d if math.isfinite(d) else math.inf)
        worst = worst if diff <= worst else diff
        ok = diff <= TOL
        failures += not ok
        print(f"{'ok' if ok else 'FAIL'}  {p!r}: greedy tokens agree for {agree}/{NEW}, "
              f"max |logprob diff| {diff:.3e} over those steps (tolerance {TOL})")
    print(f"worst {worst:.3e}; {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
