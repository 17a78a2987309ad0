"""Random-init model shapes for benchmarks (no downloads)."""
from __future__ import annotations

import torch

# name: (family, hidden, layers, heads, ffn, vocab)
SHAPES = {
    "tiny": ("llama", 64, 4, 4, 128, 256),
    "small": ("llama", 256, 8, 4, 768, 8192),             # 8.1M parameters: multi-rank runs on a shared 2-core CPU
    "smollm2-135m": ("llama", 576, 30, 9, 1536, 49152),   # SmolLM2-135M's shape: tied 49152-token embedding
    "opt-1.3b": ("opt", 2048, 24, 32, 8192, 50272),
    "opt-6.7b": ("opt", 4096, 32, 32, 16384, 50272),
}


def build(shape: str, dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    family, hidden, layers, heads, ffn, vocab = SHAPES[shape]
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                          max_position_embeddings=4096, tie_word_embeddings=True)
        cls = LlamaForCausalLM
    else:
        cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=4096,
                        enable_bias=True)
        cls = OPTForCausalLM
    with torch.device("cpu"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(cfg)
        finally:
            torch.set_default_dtype(prev)
    return model.eval()
