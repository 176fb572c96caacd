#!/usr/bin/env python3
"""Makes small random Llama checkpoints in Hugging Face format for liftoff's tests.

Shapes split over 2 and 4 tensor-parallel ranks (8 query heads; 4 or 2 KV heads), in the
layouts liftoff must load: a Llama-2-style f32 checkpoint sharded over two files with an
index, a Llama-3.2-style bf16 one with tied embeddings and `llama3` RoPE scaling, and an f16
one. A tiny byte-level BPE tokenizer (vocab 512) with a ChatML template goes with each.

Usage: make_test_checkpoints.py OUT_DIR   (run with scripts/reference_venv.sh's python)
"""
import json, os, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Tensor parallelism splits each layer over several devices; an all-reduce joins them.",
    "Paged attention stores keys and values in fixed-size blocks, like virtual memory pages.",
    "In 2024, 1234567890 numbers and symbols: {}[]()<>!?;:'\" café naïve 東京 🚀",
]

VARIANTS = {
    # name: (config overrides, dtype, max_shard_size)
    "tiny-llama2-f32": (dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0), torch.float32, "300KB"),
    "tiny-llama3-bf16": (dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                         torch.bfloat16, None),
    "tiny-gqa2-f16": (dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0), torch.float16, None),
}


def make_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def main(out):
    torch.manual_seed(1234)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    assert vocab <= 512, vocab
    for name, (overrides, dtype, shard) in VARIANTS.items():
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                          bos_token_id=1, eos_token_id=2, **overrides)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5 if p.dim() == 2 else 0.2)
                if p.dim() == 1:
                    p.add_(1.0)
        model = model.to(dtype)
        d = os.path.join(out, name)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, safe_serialization=True, **kwargs)
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
                       "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
        print("wrote", d, sorted(os.listdir(d)))


if __name__ == "__main__":
    main(sys.argv[1])
