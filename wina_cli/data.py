"""Text in, deterministic token windows out.

`--data` is a .txt file, a .jsonl file whose lines carry a `text` field, or a folder of such files (read in
sorted order, recursively). Documents are tokenized in order and joined with the tokenizer's end-of-sequence
token; the stream is cut into non-overlapping windows of seq_len tokens and num_samples of them are drawn with
the seed. The same files, tokenizer, sizes and seed always give the same windows.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class TokenWindows:
    ids: torch.Tensor  # [num_samples, seq_len] int64
    provenance: dict  # path, files, sha256 of the text read, tokens available, seed, window starts


def text_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        if not p.name.endswith(TEXT_SUFFIXES):
            raise DataError(f"data file '{path}' is neither .txt nor .jsonl",
                            "wina reads plain text or JSON lines with a `text` field",
                            "convert the file, or pass a folder of .txt/.jsonl files")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"data folder '{path}' holds no .txt or .jsonl files", "there is no text to read",
                            "point --data at a folder with text files")
        return files
    raise DataError(f"data path '{path}' does not exist", "the calibration or evaluation text was not found",
                    "check the path (`make assets` fetches the default texts into ./assets)")


def files_read(provenance: dict) -> list[Path] | None:
    """The files a `token_windows` call read (the first `files_read` of its path, in the order it reads them),
    resolved; None where the path is not found from here or the provenance does not count them. Read from the
    folder as it is now: files added before the ones read would shift the list."""
    path, n = provenance.get("path"), provenance.get("files_read")
    if path is None or n is None or not Path(path).exists():
        return None
    return [f.resolve() for f in text_files(path)[:n]]


def iter_documents(files: list[Path]):
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data file '{f}' is not UTF-8 text", str(e), "convert it to UTF-8") from e
        if f.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise DataError(f"line {n} of '{f}' is not a JSON object", str(e),
                                    "each line of a .jsonl file must be an object with a `text` field") from e
                if not isinstance(text, str):
                    raise DataError(f"line {n} of '{f}' has no string `text` field", "wina reads the `text` field",
                                    "add a `text` field to every line")
                yield text
        else:
            yield raw


def token_windows(path: str, tokenizer, num_samples: int, seq_len: int, seed: int,
                  oversample: int = 4) -> TokenWindows:
    """Read documents until there are `oversample` times the tokens needed (or the text ends), then draw."""
    files = text_files(path)
    need = num_samples * seq_len
    budget = need * oversample
    h = hashlib.sha256()
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    used_files = []
    # Verses and short lines are batched so the tokenizer sees paragraphs, not one line at a time.
    chunk: list[str] = []
    chunk_chars = 0

    def flush():
        nonlocal chunk, chunk_chars
        if chunk:
            text = "\n".join(chunk)
            h.update(text.encode())
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
            chunk, chunk_chars = [], 0

    for f in files:
        used_files.append(str(f))
        for doc in iter_documents([f]):
            if not doc.strip():
                continue
            chunk.append(doc)
            chunk_chars += len(doc)
            if chunk_chars > 4000:
                flush()
                if len(stream) >= budget:
                    break
        flush()
        if len(stream) >= budget:
            break
    n_windows = len(stream) // seq_len
    if n_windows == 0 or len(stream) < need:
        raise DataError(
            f"data '{path}' is too short: {len(stream)} tokens, but {num_samples} samples x {seq_len} tokens "
            f"= {need} are needed",
            "calibration and evaluation draw non-overlapping windows of seq_len tokens",
            "give more text, or lower --num-samples / --seq-len",
        )
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=g)[:num_samples].sort().values
    all_ids = torch.tensor(stream[: n_windows * seq_len], dtype=torch.int64).view(n_windows, seq_len)
    ids = all_ids[picks].contiguous()
    prov = {
        "path": str(path),
        "files_read": len(used_files),
        "text_sha256": h.hexdigest(),
        "tokens_read": len(stream),
        "num_samples": num_samples,
        "seq_len": seq_len,
        "tokens": num_samples * seq_len,
        "seed": seed,
        "window_starts": [int(p) * seq_len for p in picks],
    }
    return TokenWindows(ids, prov)
