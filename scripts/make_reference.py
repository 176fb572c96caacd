#!/usr/bin/env python3
"""Writes the reference fixtures liftoff's tests compare with, from Hugging Face transformers.

- smollm2_tokenizer.json: HF tokenizer ids (from the GGUF's own metadata) for varied prompts.
- smollm2_f32.json: SmolLM2-135M-Instruct Q4_1 dequantized to float32 by transformers: prompt
  ids, greedy continuations (EOS ignored), and top-k logits at every position of prompt+output.
- <checkpoint>.json for each random test checkpoint: the same, in float32.

Usage: make_reference.py GGUF CHECKPOINTS_DIR OUT_DIR   (with scripts/reference_venv.sh's python)
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TOKENIZER_PROMPTS = [
    "Hello", "Hello world", " leading space", "trailing space ", "multiple   spaces\tand\ttabs\n\nnewlines",
    "In 2024, the price was $1,234.56 (about 12%).",
    "def add(a, b):\n    return a + b  # sum\n",
    "fn main() { println!(\"{}\", 1 << 3); }",
    "café naïve résumé Übermäßig", "東京は日本の首都です。", "你好，世界！", "안녕하세요",
    "emoji 🚀🔥👍🏽 and 👨‍👩‍👧", "<|im_start|>user\nHi<|im_end|>\n", "tokens <|endoftext|> inside",
    "   ", "\n", "a" * 50, "URL https://example.com/path?q=1&r=2",
]

PROMPTS = [
    ("plain", "The capital of France is", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("unicode", "Translate to English: 東京は日本の首都です。", False),
    ("chat", "Give me three tips for writing clear documentation.", True),
]
NEW_TOKENS = 24
TOP_K = 10


def topk_rows(logits, k):
    vals, idx = torch.topk(logits, k, dim=-1)
    return [[[int(i), float(v)] for i, v in zip(ii, vv)] for ii, vv in zip(idx.tolist(), vals.tolist())]


def greedy(model, ids, n):
    model.generation_config.eos_token_id = None  # decode past EOS (transformers 5 fills it otherwise)
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def case(model, name, prompt_ids, extra=None):
    gen = greedy(model, prompt_ids, NEW_TOKENS)
    full = prompt_ids + gen
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    entry = {"name": name, "prompt_ids": prompt_ids, "greedy_ids": gen, "topk": topk_rows(logits, TOP_K)}
    if extra:
        entry.update(extra)
    return entry


def main(gguf, ckpt_dir, out):
    os.makedirs(out, exist_ok=True)
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    toks = [{"text": p, "ids": tok(p, add_special_tokens=True)["input_ids"]} for p in TOKENIZER_PROMPTS]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
    with open(os.path.join(out, "smollm2_tokenizer.json"), "w") as fh:
        json.dump({"cases": toks, "chat_example": {"user": "Hi there", "rendered": chat}}, fh, indent=0, ensure_ascii=False)

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cases = []
    for name, prompt, is_chat in PROMPTS:
        if is_chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tok(text, add_special_tokens=True)["input_ids"]
        cases.append(case(model, name, ids, {"prompt": prompt, "chat": is_chat}))
    with open(os.path.join(out, "smollm2_f32.json"), "w") as fh:
        json.dump({"top_k": TOP_K, "cases": cases}, fh, ensure_ascii=False)

    for ck in sorted(os.listdir(ckpt_dir)):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt_dir, ck), dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(7)
        cases = [case(model, f"random{i}", torch.randint(3, 512, (n,), generator=g).tolist())
                 for i, n in enumerate([1, 9, 40])]
        with open(os.path.join(out, f"{ck}.json"), "w") as fh:
            json.dump({"top_k": TOP_K, "cases": cases}, fh)
        print("reference for", ck)


if __name__ == "__main__":
    main(*sys.argv[1:4])
