"""Zero-shot accuracy of a model on the built-in IMDB test split, with the training prompt and label words.

    python -m benchmarks.zero_shot [--model smollm2] [--batch-size 16] [--max-chars 600] [--test 500]

Prints one line per batch and a JSON summary: accuracy, how often it answers each label word, the mean tokens per
example (prompt + label word) and the time per forward batch. `--scorer full` (default) times the plain forward that
the training loss uses (logits at every position); `--scorer candidates` computes output logits only at the scored
positions (ds_zo.data.model_candidate_scores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ds_zo.data import (PromptClassification, batches, candidate_scores, imdb_splits, model_candidate_scores,
                        pad_token_id)
from ds_zo.models import load_model_and_tokenizer


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="'smollm2' (default), 'tiny', an HF directory or a .gguf file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorer", choices=["full", "candidates"], default="full")
    parser.add_argument("--by-length", action="store_true", help="batch similar lengths together (less padding)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (timing only)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    test = imdb_splits(test=args.test, max_chars=args.max_chars, seed=args.seed)["test"]
    task = PromptClassification()
    candidates = task.label_token_ids(tokenizer)
    examples = task.encode(tokenizer, test)

    scored, correct, answers, times = 0, 0, [0] * len(candidates), []
    with torch.no_grad():
        padded = batches(examples, args.batch_size, pad_token_id(tokenizer), by_length=args.by_length)
        for i, batch in enumerate(padded):
            if args.max_batches is not None and i == args.max_batches:
                break
            start = time.perf_counter()
            if args.scorer == "full":
                scores, gold = candidate_scores(model(**batch).logits, batch["labels"], candidates)
            else:
                scores, gold = model_candidate_scores(model, batch, candidates)
            times.append(time.perf_counter() - start)
            predicted = scores.argmax(dim=1)
            scored += len(gold)
            correct += int((predicted == gold).sum())
            for c in predicted.tolist():
                answers[c] += 1
            print(f"batch {i}: {batch['input_ids'].shape[1]} wide, {times[-1]:.2f} s", flush=True)

    summary = {
        "model": args.model or "smollm2", "examples": scored, "max_chars": args.max_chars,
        "accuracy": correct / scored,
        "answer_rate": {w: n / scored for w, n in zip(task.label_words, answers)},
        "gold_positive_rate": sum(e["label"] for e in test) / len(test),
        "mean_tokens_per_example": statistics.mean(len(e["input_ids"]) for e in examples),
        "batch_size": args.batch_size, "by_length": args.by_length, "scorer": args.scorer,
        "torch_threads": torch.get_num_threads(),
        "forward_s_per_batch_median": statistics.median(times), "forward_s_per_batch_mean": statistics.mean(times),
        "load_s": load_s,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
