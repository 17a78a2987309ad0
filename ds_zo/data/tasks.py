"""Turning examples into token sequences with HF-style labels, and scoring label words for accuracy.

Prompt-based classification in the MeZO manner: each text is put into a template ("{text} It was") and followed by
the label word of its class (" terrible" / " great"). Only the label word is labelled (-100 elsewhere), so the usual
causal-LM loss is the cross-entropy of the label word, and accuracy compares the scores the model gives each candidate
label word at the position just before it. Because the model is causal, those scores do not see the label word
itself: one forward pass of the training sequence gives both the loss and the prediction.

Plain causal-LM fine-tuning uses prompt/completion pairs: the whole sequence is the input, only completion tokens
are labelled.

The tokenizer only needs HF's call interface: `tokenizer(text, add_special_tokens=...)["input_ids"]`, plus
`eos_token_id` for completions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100


class TaskError(ValueError):
    """The task's settings (template, label words, max_length) do not fit the tokenizer or the examples; the message
    names the setting and what would fit."""


def tokenize(tokenizer, text: str) -> list[int]:
    """The tokens of `text` alone, without BOS/EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (usually [BOS] or nothing).

    Found by encoding a probe with and without special tokens, so it follows the tokenizer's own settings; special
    tokens it would append (an EOS) are left out, since the label word or completion must follow the prompt.
    """
    plain = tokenize(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def single_token_id(tokenizer, word: str) -> int:
    """The id of `word`, which must be exactly one token (a label word is scored as a single next-token choice)."""
    ids = tokenize(tokenizer, word)
    if len(ids) != 1:
        raise TaskError(f"label word {word!r} is {len(ids)} tokens {ids} for this tokenizer; label words must be "
                         f"single tokens (a leading space often helps, e.g. ' great')")
    if ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise TaskError(f"label word {word!r} is the unknown token for this tokenizer; choose one in its vocabulary")
    return ids[0]


@dataclass(frozen=True)
class PromptClassification:
    """A template with a `{text}` slot, and one label word per class (class i is label_words[i])."""
    template: str = "{text} It was"
    label_words: tuple[str, ...] = (" terrible", " great")

    def __post_init__(self):
        if self.template.count("{text}") != 1:
            raise TaskError(f"template {self.template!r} must contain the placeholder {{text}} exactly once")
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise TaskError(f"need at least two distinct label words, got {list(self.label_words)}")
        object.__setattr__(self, "label_words", tuple(self.label_words))

    def prompt(self, text: str) -> str:
        # str.replace, not str.format: reviews and user templates may contain braces
        return self.template.replace("{text}", text)

    def label_token_ids(self, tokenizer) -> list[int]:
        """The candidate token of each class, in class order; an error naming any label word that is not one token."""
        ids = [single_token_id(tokenizer, word) for word in self.label_words]
        if len(set(ids)) != len(ids):
            raise TaskError(f"label words {list(self.label_words)} map to the same token ids {ids}")
        return ids

    def encode(self, tokenizer, examples: Iterable[dict], max_length: int | None = None) -> list[dict]:
        """[{"input_ids", "labels"}] for examples {"text", "label"}: prompt tokens + the label word's token.

        Too-long prompts lose tokens from the front of the text (after BOS), keeping the template's cue ("It was")
        next to the label word.
        """
        candidates = self.label_token_ids(tokenizer)
        prefix = special_prefix(tokenizer)
        encoded = []
        for example in examples:
            label = example["label"]
            if not 0 <= label < len(candidates):
                raise ValueError(f"label {label} out of range for {len(candidates)} label words")
            prompt = tokenize(tokenizer, self.prompt(example["text"]))
            if max_length is not None:
                keep = max_length - len(prefix) - 1
                if keep < 1:
                    raise TaskError(f"max_length {max_length} leaves no room for the prompt after the tokenizer's "
                                    f"{len(prefix)} special token(s) and the label word; raise --max_length")
                prompt = prompt[-keep:]
            ids = prefix + prompt + [candidates[label]]
            encoded.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 1) + [candidates[label]]})
        return encoded


def encode_prompt_completion(tokenizer, examples: Iterable[dict], max_length: int | None = None,
                             add_eos: bool = True) -> list[dict]:
    """[{"input_ids", "labels"}] for examples {"prompt", "completion"}: only the completion (and EOS) is labelled.

    Prompt and completion are tokenized separately so the boundary between them is exact; sequences longer than
    `max_length` are cut at the end.
    """
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    encoded = []
    for number, example in enumerate(examples):
        context = prefix + tokenize(tokenizer, example["prompt"])
        target = tokenize(tokenizer, example["completion"]) + eos
        ids = (context + target)[:max_length]
        labels = ([IGNORE_INDEX] * len(context) + target)[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise TaskError(f"{example.get('where', f'example {number}')}: the prompt alone fills "
                             f"max_length={max_length}; no completion token is left to train on (raise --max_length "
                             "or shorten the prompt)")
        encoded.append({"input_ids": ids, "labels": labels})
    return encoded


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the index of its single labelled token (the label word); works with left or right padding."""
    labelled = labels != IGNORE_INDEX
    counts = labelled.sum(dim=1)
    if not bool((counts == 1).all()):
        raise ValueError(f"each row needs exactly one labelled token (the label word); counts: {counts.tolist()}")
    positions = labelled.int().argmax(dim=1)
    if bool((positions == 0).any()):
        raise ValueError("a label word at position 0 has no preceding token to score it")
    return positions


def _gold_classes(labels: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row, the index in `candidates` of its labelled token."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    matches = labels[rows, positions].unsqueeze(1) == candidates
    if not bool(matches.any(dim=1).all()):
        raise ValueError("a row's labelled token is none of the candidate label-word tokens")
    return matches.int().argmax(dim=1)


def candidate_scores(logits: torch.Tensor, labels: torch.Tensor,
                     candidate_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [rows, classes], gold class [rows]) from a causal LM's logits [rows, seq, vocab].

    The scores are the logits, at the position before each row's label word, of every candidate label token.
    """
    positions = label_positions(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)
    candidates = torch.as_tensor(list(candidate_ids), device=logits.device)
    scores = logits[rows, positions - 1][:, candidates]
    return scores, _gold_classes(labels.to(candidates.device), positions.to(candidates.device), candidates)


def count_correct(logits: torch.Tensor, labels: torch.Tensor, candidate_ids: Sequence[int]) -> tuple[int, int]:
    """(rows whose highest-scoring candidate is the gold label word, rows)."""
    scores, gold = candidate_scores(logits, labels, candidate_ids)
    return int((scores.argmax(dim=1) == gold).sum()), int(gold.numel())


@torch.no_grad()
def model_candidate_scores(model, batch: dict, candidate_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """candidate_scores() for an HF causal LM, computing output-layer logits only where they are scored.

    The full [rows, seq, vocab] logits of a 49k-token vocabulary cost ~20% of SmolLM2's forward and ~400 MB for a
    batch of 16; this runs the decoder, then the output embedding on one hidden state per row. Equal to
    candidate_scores(model(**batch).logits, ...) for models whose logits are lm_head(last hidden state).
    """
    body = getattr(model, model.base_model_prefix)
    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra).last_hidden_state
    labels = batch["labels"].to(hidden.device)
    positions = label_positions(labels)
    rows = torch.arange(labels.shape[0], device=hidden.device)
    candidates = torch.as_tensor(list(candidate_ids), device=hidden.device)
    scores = model.get_output_embeddings()(hidden[rows, positions - 1])[:, candidates]
    return scores, _gold_classes(labels, positions, candidates)
