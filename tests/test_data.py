from __future__ import annotations

import json

import pytest

from conftest import tiny_tokenizer
from wina_cli.data import token_windows
from wina_cli.errors import DataError


def test_windows_are_deterministic_and_seeded(calib_text):
    tok = tiny_tokenizer()
    a = token_windows(str(calib_text), tok, 4, 32, seed=0)
    b = token_windows(str(calib_text), tok, 4, 32, seed=0)
    c = token_windows(str(calib_text), tok, 4, 32, seed=1)
    assert a.ids.shape == (4, 32)
    assert (a.ids == b.ids).all() and a.provenance == b.provenance
    assert a.provenance["window_starts"] != c.provenance["window_starts"]


def test_jsonl_and_folder(tmp_path, eval_text):
    tok = tiny_tokenizer()
    w = token_windows(str(eval_text), tok, 2, 16, seed=0)
    assert w.ids.shape == (2, 16)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text(eval_text.read_text()[:20000])
    w2 = token_windows(str(tmp_path), tok, 2, 16, seed=0)
    assert w2.provenance["files_read"] == 1


def test_too_short(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("river stone")
    with pytest.raises(DataError) as e:
        token_windows(str(p), tiny_tokenizer(), 4, 64, seed=0)
    assert "too short" in e.value.message and e.value.exit_code == 6


def test_empty_and_missing(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    with pytest.raises(DataError):
        token_windows(str(p), tiny_tokenizer(), 1, 8, seed=0)
    with pytest.raises(DataError) as e:
        token_windows(str(tmp_path / "nope.txt"), tiny_tokenizer(), 1, 8, seed=0)
    assert "does not exist" in e.value.message
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError) as e:
        token_windows(str(tmp_path / "d"), tiny_tokenizer(), 1, 8, seed=0)
    assert "no .txt or .jsonl" in e.value.message


def test_bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        token_windows(str(p), tiny_tokenizer(), 1, 8, seed=0)
    assert "`text`" in e.value.message
