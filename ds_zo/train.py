"""The fine-tuning job: `python -m ds_zo.train --deepspeed_config configs/zo_sgd_tiny.json`.

For now it fine-tunes a tiny random-init Llama on an embedded synthetic language (counting sequences modulo the
vocabulary) and prints the held-out loss before and after; the real SmolLM2/IMDB job replaces the default later.
Runs under `python`, `deepspeed`, `torchrun` and `mpirun` like any DeepSpeed program.
"""
from __future__ import annotations

import argparse
import os
import time

import deepspeed
import torch

import ds_zo


def counting_batch(rows: int, seq: int, vocab: int, generator: torch.Generator) -> dict:
    start = torch.randint(0, vocab, (rows, 1), generator=generator)
    ids = (start + torch.arange(seq)) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_llama(vocab: int = 32, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--eval_interval", type=int, default=100)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        args.deepspeed_config = os.path.join(os.path.dirname(__file__), "..", "configs", "zo_sgd_tiny.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = tiny_llama()
    engine, _, _, _ = ds_zo.initialize(args=args, model=model)
    rows = engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps()
    global_rows = rows * engine.dp_world_size
    shard = slice(engine.dp_rank * rows, (engine.dp_rank + 1) * rows)  # this rank's share of each global batch
    vocab = model.config.vocab_size
    data = torch.Generator().manual_seed(1234)                          # same stream on every rank
    held_out = counting_batch(64, args.seq, vocab, torch.Generator().manual_seed(99))
    held_out = {k: v[engine.dp_rank::engine.dp_world_size] for k, v in held_out.items()}
    first = engine.eval_batch(held_out)
    if engine.global_rank == 0:
        print(f"step 0: held-out loss {first:.4f}", flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        global_batch = counting_batch(global_rows, args.seq, vocab, data)
        loss = engine.train_batch({k: v[shard] for k, v in global_batch.items()})
        if step % args.eval_interval == 0 or step == args.steps:
            held = engine.eval_batch(held_out)   # a collective: every rank evaluates its shard
            if engine.global_rank == 0:
                print(f"step {step}: train loss {loss:.4f}, held-out loss {held:.4f}, "
                      f"g {engine.last_projected_grad:+.3f}, {(time.time() - t0) / step * 1000:.1f} ms/step", flush=True)
    last = engine.eval_batch(held_out)
    if engine.global_rank == 0:
        print(f"held-out loss: {first:.4f} -> {last:.4f}", flush=True)
    engine.comm.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()   # without it ranks often abort at exit
    return {"before": first, "after": last}


if __name__ == "__main__":
    main()
