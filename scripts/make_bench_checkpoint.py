#!/usr/bin/env python3
"""Makes a random-weight Llama checkpoint of a real shape (Hugging Face format) for benchmarks.

Presets:
  many-small    ~24M parameters (8 layers of 512): one of the many models of benches/many_models.sh
  cpu-bench     ~200M parameters, 16 heads / 8 KV heads: splits over 2 and 4 ranks (CPU TP bench)
  llama-3.2-1b  Llama-3.2-1B's config (tied embeddings, llama3 RoPE scaling)
  llama-3.1-8b  Llama-3.1-8B's config

The weights are random (std 0.02, like transformers' init), the tokenizer the tiny byte-level
BPE of make_test_checkpoints.py: speed and numerics comparisons need the shapes, not the
knowledge. Run with scripts/reference_venv.sh's python (CPU) or on the GPU machine
(transformers installed there): make_bench_checkpoint.py PRESET OUT_DIR [--dtype bf16] [--device cuda] [--seed N]
"""
import argparse, json, os, sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_test_checkpoints import CHAT_TEMPLATE, make_tokenizer  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
PRESETS = {
    "many-small": dict(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                       rope_theta=10000.0, tie_word_embeddings=False),
    "cpu-bench": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                      rope_theta=10000.0, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", choices=PRESETS)
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=DTYPES, default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **PRESETS[args.preset])
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(DTYPES[args.dtype])
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="2GB")
    tok = make_tokenizer()
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
                   "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.preset}, {n / 1e6:.0f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
