"""Random-init model shapes for benchmarks (no downloads)."""
from __future__ import annotations

import torch

# name: (family, hidden, layers, heads, ffn, vocab)
SHAPES = {
    "tiny": ("llama", 64, 4, 4, 128, 256),
    "small": ("llama", 256, 8, 4, 768, 8192),             # 8.1M parameters: multi-rank runs on a shared 2-core CPU
    "smollm2-135m": ("llama", 576, 30, 9, 1536, 49152),   # SmolLM2-135M's shape: tied 49152-token embedding
    "opt-1.3b": ("opt", 2048, 24, 32, 8192, 50272),
    # the GPU model's host calibration (benchmarks/device_calibrate.py): two OPT-1.3B-sized layers, about 60 z chunks
    # each, whose ZO step at 1 x 8 tokens is nearly all host time per chunk
    "wide": ("llama", 2048, 2, 8, 8192, 1024),
    "opt-6.7b": ("opt", 4096, 32, 32, 16384, 50272),
}


def build(shape: str, dtype=torch.float32, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """The shape's model, random-init on CPU (device="meta": its structure only, no values)."""
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
    if family == "opt" and hidden >= 2048 and device != "meta":
        return _fast_opt(cls, cfg, dtype, seed)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(cfg)
        finally:
            torch.set_default_dtype(prev)
    return model.eval()


def _fast_opt(cls, cfg, dtype, seed: int) -> torch.nn.Module:
    """A billion-parameter OPT shape in seconds: HF's random init draws every value (about 14 ns each on one core,
    minutes for 6.7B on a GPU machine's host), so build on the meta device and fill with HF's OPT distribution —
    weights N(0, 0.02), biases 0, LayerNorm weights 1 — tiling each weight from one 2^22-value pool. Benchmarks
    time and compare modes on the same values, so repeated values cost nothing there."""
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(1 << 22).normal_(0.0, 0.02, generator=g).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):
            flat = p.view(-1)
            if p.dim() == 1:
                flat.fill_(1.0 if "layer_norm" in name and name.endswith("weight") else 0.0)
                continue
            offset = int(torch.randint(0, pool.numel(), (1,), generator=g))
            rolled = torch.roll(pool, offset)
            for start in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - start)
                flat[start:start + n].copy_(rolled[:n])
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
