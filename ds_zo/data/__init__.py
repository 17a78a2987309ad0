"""Data for the fine-tuning job: the built-in IMDB sentiment splits, user CSV/JSONL files, prompt encoding, padding."""
from .collate import batches, collate, pad_token_id
from .files import DataError, read_labelled, read_prompt_completion
from .imdb import find_wheel, imdb_splits, iter_reviews
from .tasks import (IGNORE_INDEX, PromptClassification, candidate_scores, count_correct, encode_prompt_completion,
                    model_candidate_scores)

__all__ = ["batches", "collate", "pad_token_id", "DataError", "read_labelled", "read_prompt_completion",
           "find_wheel", "imdb_splits", "iter_reviews", "IGNORE_INDEX", "PromptClassification", "candidate_scores",
           "count_correct", "encode_prompt_completion", "model_candidate_scores"]
