"""clip.tokenize: OpenAI's BPE byte for byte, padding, truncation that keeps EOT, overflow.

tests/fixtures/clip_tokenizer_ids.json records, as facts, the ids that OpenAI's own tokenizer
(openai/CLIP@d05afc4 SimpleTokenizer.encode/decode, run once by a harness around the official code; its "source"
field has the versions and file hashes) gives for 51 strings: ASCII, capitals, contractions, digits, HTML
entities, mojibake, CJK, Cyrillic, Arabic, Devanagari, Thai, emoji with ZWJ and flags, control and zero-width
characters, literal special tokens, empty and whitespace-only strings, and lengths around 77 and 32.
"""
import gzip
import hashlib
import json
import os

import pytest
import torch

import clip

with open(os.path.join(os.path.dirname(__file__), "fixtures", "clip_tokenizer_ids.json")) as f:
    FACTS = json.load(f)
ROWS = FACTS["rows"]


def padded(ids, length):
    """OpenAI's rule: [SOT] + ids + [EOT], cut to `length` with EOT forced into the last slot, zero padding."""
    full = [clip.SOT] + ids + [clip.EOT]
    if len(full) > length:
        full = full[:length - 1] + [clip.EOT]
    return full + [0] * (length - len(full))


def test_vocabulary_file_is_openais():
    with open(clip._VOCAB, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == FACTS["source"]["sha256"]["bpe_simple_vocab_16e6.txt.gz"]
    tok = clip._tokenizer()
    assert len(tok.encoder) == 49408 and tok.encoder["<|startoftext|>"] == clip.SOT == 49406
    assert tok.encoder["<|endoftext|>"] == clip.EOT == 49407 and tok.encoder["!"] == 0
    assert len(gzip.open(clip._VOCAB).read().decode("utf-8").split("\n")) == 262_146  # header + merges + ""


def test_corpus_is_varied():
    texts = [r["text"] for r in ROWS]
    assert len(texts) >= 40 and "" in texts and "   " in texts
    assert any(any(ord(c) > 0x3000 for c in t) for t in texts)  # CJK / emoji
    assert any("'" in t for t in texts) and any(c.isdigit() for t in texts for c in t)
    assert max(len(r["ids"]) for r in ROWS) > 75  # longer than the context


@pytest.mark.parametrize("row", ROWS, ids=[f"{i:02d}" for i in range(len(ROWS))])
def test_bpe_ids_equal_openais(row):
    tok = clip._tokenizer()
    assert tok.encode(row["text"]) == row["ids"]
    assert tok.decode(row["ids"]) == row["decoded"]


def test_tokenize_pads_and_truncates_like_openai():
    texts = [r["text"] for r in ROWS]
    for length in (77, 32):  # 32: CLIP4Clip's max_words rule ([SOT] + first 30 ids + [EOT])
        got = clip.tokenize(texts, length, truncate=True)
        assert got.dtype == torch.int32 and got.shape == (len(texts), length)
        assert got.tolist() == [padded(r["ids"], length) for r in ROWS]
        plain = [i for i, r in enumerate(ROWS) if clip.EOT not in r["ids"]]  # no literal "<|endoftext|>"
        eot = [min(len(ROWS[i]["ids"]) + 1, length - 1) for i in plain]
        assert got[plain].argmax(-1).tolist() == eot  # EOT has the largest id: the models pool by argmax


def test_truncation_keeps_eot_and_overflow_raises():
    long = next(r for r in ROWS if len(r["ids"]) + 2 > 77)
    fits = next(r for r in ROWS if len(r["ids"]) + 2 == 77)  # exactly 77: no error, no truncation
    assert clip.tokenize(fits["text"])[0].tolist() == padded(fits["ids"], 77)
    with pytest.raises(RuntimeError, match="too long"):
        clip.tokenize(long["text"])
    with pytest.raises(RuntimeError, match="too long"):
        clip.tokenize(["a dog", long["text"]])
    cut = clip.tokenize(long["text"], truncate=True)[0].tolist()
    assert cut[-1] == clip.EOT and cut[:76] == [clip.SOT] + long["ids"][:75]
    assert clip.tokenize("a dog")[0].tolist() == clip.tokenize(["a dog"])[0].tolist()  # a string or a list


def test_empty_and_special_strings():
    assert clip.tokenize("")[0, :3].tolist() == [clip.SOT, clip.EOT, 0]
    assert clip.tokenize(["", "   "]).tolist() == [padded([], 77)] * 2
    ids = clip.tokenize("a <|endoftext|> b")[0].tolist()
    assert ids[:5] == [clip.SOT, 320, clip.EOT, 321, clip.EOT]  # the literal becomes the special id; a</w>, b</w>
    assert clip.tokenize("A DOG").tolist() == clip.tokenize("a dog").tolist()  # lower-cased
