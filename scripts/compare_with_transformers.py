#!/usr/bin/env python3
"""Checks `liftoff generate --dtype f32` against Hugging Face transformers on any prompts:
same prompt ids, same greedy tokens (EOS ignored on both sides).

Usage (with scripts/reference_venv.sh's python):
  compare_with_transformers.py LIFTOFF_BIN GGUF [--chat] [--new-tokens N] PROMPT...
"""
import argparse, json, os, subprocess, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("liftoff")
    ap.add_argument("gguf")
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    d, f = os.path.split(a.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    failures = 0
    for p in a.prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) if a.chat else p
        ids = tok(text)["input_ids"]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)[0, len(ids):].tolist()
        cmd = [a.liftoff, "generate", "--model", a.gguf, "--prompt", p, "--dtype", "f32", "--temperature", "0",
               "--ignore-eos", "--max-new-tokens", str(a.new_tokens), "--format", "json"] + (["--chat"] if a.chat else [])
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        ok = out["prompt_token_ids"] == ids and out["token_ids"] == ref
        failures += not ok
        print(("OK  " if ok else "DIFF"), repr(p[:50]), "" if ok else f"\n  ours {out['token_ids']}\n  ref  {ref}")
    print(f"{len(a.prompts) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
