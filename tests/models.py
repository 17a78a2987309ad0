"""Tiny random-init HF decoder models for architecture tests (no downloads)."""
from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 96


def tiny_model(arch: str, tied: bool = True, seed: int = 0, dtype=torch.float32, heads: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tied)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, sliding_window=None, **common)
        model = MistralForCausalLM(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, **common)
        model = OPTForCausalLM(cfg)
    elif arch == "bloom":                       # ALiBi: a (batch * heads, 1, T) bias handed to every layer
        from transformers import BloomConfig, BloomForCausalLM
        model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common))
    elif arch == "mpt":                         # ALiBi: one (heads, 1, max_seq_len) bias handed to every layer
        from transformers import MptConfig, MptForCausalLM
        model = MptForCausalLM(MptConfig(d_model=32, n_layers=2, n_heads=heads, max_seq_len=64, **common))
    elif arch in ("blenderbot_small", "marian"):   # positions from the input's shape: (T, D), no batch dimension;
        import transformers                          # BlenderbotSmall's are learned, Marian's sinusoidal and frozen
        name = {"blenderbot_small": "BlenderbotSmall", "marian": "Marian"}[arch]
        cfg = getattr(transformers, f"{name}Config")(
            d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
            decoder_ffn_dim=48, encoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=0,
            decoder_start_token_id=1, **common)
        model = getattr(transformers, f"{name}ForCausalLM")(cfg)
    elif arch == "mixtral":                     # MoE, with the router logits HF's load-balancing loss reads
        from transformers import MixtralConfig, MixtralForCausalLM
        model = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                 num_experts_per_tok=2, output_router_logits=True,
                                                 max_position_embeddings=64, **common))
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1, embd_pdrop=0.1,
                         attn_pdrop=0.1, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # random-init biases and norm weights are constants; perturb them so tests see every parameter matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


ARCHS = ["llama", "qwen2", "mistral", "opt", "gpt2"]


def batch(rows: int = 2, seq: int = 8, seed: int = 1, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad and rows > 1:
        mask[0, :2] = 0  # left padding on the first row
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trained_state(engine, steps: int = 3) -> dict:
    """The engine's parameters after `steps` ZO steps on batch(seed=t), the pending update flushed."""
    for t in range(steps):
        engine.train_batch(batch(seed=t))
    engine.flush()
    return engine.module_state_dict()


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts with the same names and the same values bit for bit."""
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
