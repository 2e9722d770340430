"""Text sources and tokenization into fixed windows.

Sources (``load_texts``):

- ``"default"``: the King James Bible shipped inside the package (public domain; see
  ``hf_sae/data/texts/README.md``), one document per chapter. ``split="train"`` is Genesis
  through Philemon (1,133 chapters, ~0.96M SmolLM2 tokens), ``split="validation"`` is the
  last nine books, Hebrews through Revelation (56 chapters, ~36k tokens), ``split="all"``
  is everything.
- a local file or folder: ``.txt`` (documents are paragraphs separated by blank lines),
  ``.jsonl``/``.json`` (one JSON object per line, text in ``text_column``), ``.parquet``
  (text in ``text_column``); each may be ``.gz``-compressed except parquet. A folder reads
  every such file in sorted order (or the subfolder named ``split`` if it exists).
- anything else: a Hugging Face ``datasets`` dataset name, read with ``streaming=True`` by
  default; ``"name:config"`` selects a configuration (e.g. ``"wikitext:wikitext-103-raw-v1"``).

Tokenization (``tokenize_windows`` / ``iter_windows``): documents are tokenized without
special tokens, joined with the tokenizer's EOS token after each document, and packed
into windows of ``window`` tokens; with ``add_bos`` each window starts with BOS followed by
``window - 1`` text tokens. The final partial window is dropped.

``token_mask`` says which tokens become SAE data: position 0 (whose residual norm is
~100x the others), BOS, EOS, pad and other special tokens are excluded by default.
"""
from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

CORPUS_DIR = Path(__file__).parent / "texts"
_DEFAULT_FILES = ("kjv-1.jsonl.gz", "kjv-2.jsonl.gz")
VALIDATION_BOOKS = ("Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation")
"""Books of the shipped KJV sample that form ``split="validation"`` (the last nine books)."""

_TEXT_SUFFIXES = (".txt", ".txt.gz", ".text")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _default_texts(split: str) -> Iterator[str]:
    split = (split or "train").lower()
    if split not in ("train", "validation", "valid", "val", "all"):
        raise ValueError(f"The default corpus has splits 'train', 'validation' and 'all', not {split!r}.")
    for name in _DEFAULT_FILES:
        path = CORPUS_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"The shipped corpus file {path} is missing; reinstall hf_sae.")
        with _open_text(path) as f:
            for line in f:
                rec = json.loads(line)
                is_val = rec["book"] in VALIDATION_BOOKS
                if split == "all" or (split == "train") == (not is_val):
                    yield rec["text"]


def _txt_texts(path: Path) -> Iterator[str]:
    para: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                yield "\n".join(para)
                para = []
    if para:
        yield "\n".join(para)


def _jsonl_texts(path: Path, text_column: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e}); expected one JSON object per line.") from e
            if not isinstance(rec, dict) or text_column not in rec:
                keys = list(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{path}:{lineno} has no {text_column!r} field (found {keys}); pass text_column=...")
            yield rec[text_column]


def _parquet_texts(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_column not in names:
        raise ValueError(f"{path} has no column {text_column!r} (columns: {names}); pass text_column=...")
    for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _file_texts(path: Path, text_column: str) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(_TEXT_SUFFIXES):
        return _txt_texts(path)
    if name.endswith(_JSONL_SUFFIXES):
        return _jsonl_texts(path, text_column)
    if name.endswith(_PARQUET_SUFFIXES):
        return _parquet_texts(path, text_column)
    raise ValueError(f"Unsupported text file {path}: use .txt, .jsonl, .json or .parquet (optionally .gz).")


def _local_texts(path: Path, split: str, text_column: str) -> Iterator[str]:
    if path.is_file():
        yield from _file_texts(path, text_column)
        return
    root = path / split if split and (path / split).is_dir() else path
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and p.name.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"No .txt/.jsonl/.json/.parquet files under {root}.")
    for f in files:
        yield from _file_texts(f, text_column)


def _hub_texts(source: str, split: str, text_column: str, streaming: bool) -> Iterator[str]:
    import datasets

    name, config = (source.split(":", 1) + [None])[:2] if ":" in source else (source, None)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise ValueError(
            f"Could not load text source {source!r} (split {split!r}) with `datasets`: {e}. Pass 'default' "
            "for the shipped corpus, a local .txt/.jsonl/.parquet file or folder, or a reachable dataset name."
        ) from e
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_column not in cols:
        raise ValueError(f"Dataset {source!r} has no column {text_column!r} (columns: {cols}); pass text_column=...")
    for row in ds:
        yield row[text_column]


def load_texts(source: str = "default", split: str = "train", text_column: str = "text",
               streaming: bool = True, max_texts: int | None = None) -> Iterator[str]:
    """Iterate over the documents of a text source (see the module docstring for sources).

    Args:
        source: ``"default"`` (shipped KJV), a local file/folder, or a ``datasets`` name.
        split: ``"train"``/``"validation"``/``"all"`` for the default corpus; the split for
            ``datasets``; a subfolder name (if it exists) for a local folder.
        text_column: field holding the text in jsonl/parquet/``datasets`` sources.
        streaming: stream a ``datasets`` dataset instead of downloading it first.
        max_texts: stop after this many non-empty documents.
    Yields:
        Non-empty document strings, in source order.
    """
    if max_texts is not None and max_texts < 0:
        raise ValueError(f"max_texts must be >= 0, got {max_texts}.")
    src = str(source)
    if src.lower() == "default":
        it = _default_texts(split)
    else:
        path = Path(src).expanduser()
        if path.exists():
            it = _local_texts(path, split, text_column)
        elif src.startswith((".", "/", "~")) or src.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES):
            raise FileNotFoundError(f"Text source {src} does not exist.")
        else:
            it = _hub_texts(src, split, text_column, streaming)
    it = (t for t in it if isinstance(t, str) and t.strip())
    return islice(it, max_texts) if max_texts is not None else it


def _special_ids(tokenizer) -> tuple[int | None, int | None]:
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return bos, eos


def iter_windows(texts: Iterable[str], tokenizer, window: int = 256, add_bos: bool = True,
                 tokenize_batch: int = 64) -> Iterator[torch.LongTensor]:
    """Lazily pack tokenized documents into windows; yields LongTensor ``[window]`` one at a time.

    Same packing as :func:`tokenize_windows` (EOS after each document, optional BOS at the
    start of every window, final partial window dropped); tokenizes ``tokenize_batch``
    documents per tokenizer call.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}.")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string; wrap it in a list.")
    bos, eos = _special_ids(tokenizer)
    use_bos = add_bos and bos is not None
    body = window - 1 if use_bos else window
    buf: list[int] = []
    it = iter(texts)
    while True:
        chunk = list(islice(it, tokenize_batch))
        if not chunk:
            break
        for t in chunk:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}.")
        enc = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            buf.extend(ids)
            if eos is not None:
                buf.append(eos)
        n_full = len(buf) // body
        if n_full:
            arr = torch.tensor(buf[: n_full * body], dtype=torch.long).view(n_full, body)
            buf = buf[n_full * body:]
            if use_bos:
                arr = torch.cat([torch.full((n_full, 1), bos, dtype=torch.long), arr], dim=1)
            yield from arr


def tokenize_windows(texts: Iterable[str], tokenizer, window: int = 256, max_windows: int | None = None,
                     add_bos: bool = True) -> torch.LongTensor:
    """Tokenize documents and pack them into fixed windows.

    Args:
        texts: iterable of document strings (e.g. from :func:`load_texts`).
        tokenizer: a Hugging Face tokenizer.
        window: tokens per window (sequence length), >= 2.
        max_windows: stop after this many windows (the iterable is read lazily).
        add_bos: start every window with the tokenizer's BOS token (if it has one).
    Returns:
        LongTensor ``[N, window]`` of token ids; documents are separated by EOS.
    """
    it = iter_windows(texts, tokenizer, window=window, add_bos=add_bos)
    if max_windows is not None:
        it = islice(it, max_windows)
    rows = list(it)
    if not rows:
        return torch.empty(0, window, dtype=torch.long)
    return torch.stack(rows)


def special_token_ids(tokenizer) -> list[int]:
    """Ids excluded by ``token_mask(exclude_special=True)``: BOS, EOS, pad, unk and all special tokens."""
    ids = set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
    for v in getattr(tokenizer, "all_special_ids", None) or []:
        if isinstance(v, int):
            ids.add(v)
    return sorted(ids)


def token_mask(input_ids: torch.LongTensor, tokenizer=None, exclude_first: bool = True,
               exclude_special: bool = True) -> torch.BoolTensor:
    """Which tokens become SAE training data.

    Args:
        input_ids: LongTensor ``[N, T]`` (or ``[T]``).
        tokenizer: a tokenizer (its BOS/EOS/pad/special ids are excluded) or an iterable
            of token ids to exclude; may be None when ``exclude_special`` is False.
        exclude_first: drop position 0 of every row (its norm is ~100x the others).
        exclude_special: drop special tokens.
    Returns:
        BoolTensor with the shape of ``input_ids``; True = keep.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError("input_ids must be an integer torch tensor [N, T].")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [N, T] or [T], got shape {tuple(input_ids.shape)}.")
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if exclude_first and input_ids.shape[-1] > 0:
        keep[..., 0] = False
    if exclude_special:
        if tokenizer is None:
            raise ValueError("token_mask(exclude_special=True) needs the tokenizer (or a list of ids to exclude).")
        ids = special_token_ids(tokenizer) if hasattr(tokenizer, "convert_tokens_to_ids") else sorted(int(i) for i in tokenizer)
        if ids:
            keep &= ~torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))
    return keep


def windows_with_tokens(source: str, tokenizer, n_tokens: int, window: int = 256, split: str = "validation",
                        text_column: str = "text") -> torch.LongTensor:
    """LongTensor ``[N, window]``: the first windows of ``source``/``split`` whose kept positions
    (:func:`token_mask`) number >= ``n_tokens`` (or every window the source has); ValueError if none."""
    rows, kept = [], 0
    for w in iter_windows(load_texts(source, split=split, text_column=text_column), tokenizer, window=window):
        rows.append(w)
        kept += int(token_mask(w[None], tokenizer).sum())
        if kept >= n_tokens:
            break
    if not rows:
        raise ValueError(f"text source {source!r} (split {split!r}) gave no window of {window} tokens.")
    return torch.stack(rows)
