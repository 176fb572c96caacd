#!/usr/bin/env python3
"""The baseline of the GPU serving benchmark: transformers' `generate`, batch 1, greedy, bf16,
on the same checkpoint and prompt length, plus the bandwidth bound of single-stream decode
(weight bytes / the GPU's HBM bandwidth).

Usage: gpu_transformers_generate.py CHECKPOINT_DIR [--max-new-tokens N]
"""
import argparse, time

import torch
from transformers import AutoModelForCausalLM

# Peak HBM bandwidth by device name (bytes/s), from NVIDIA's data sheets.
BANDWIDTH = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
             "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=torch.bfloat16).cuda().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 1000, (1, 32)).cuda()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    name = torch.cuda.get_device_name(0)
    bw = next((v for k, v in BANDWIDTH.items() if k in name), None)
    print(f"device: {name}")
    print(f"weights: {weight_bytes / 1e9:.2f} GB (bf16)")
    print(f"transformers generate, batch 1: {n / dt:.1f} tokens/s ({n} tokens in {dt:.2f} s)")
    if bw:
        print(f"bandwidth bound: {bw / weight_bytes:.1f} tokens/s at {bw / 1e12:.2f} TB/s")
    else:
        print("bandwidth bound: unknown device name, look up its HBM bandwidth")


if __name__ == "__main__":
    main()
