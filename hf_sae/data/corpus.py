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
  every such file in sorted order (or the subfolder named ``split`` if it exists). A folder
  written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is opened with
  ``datasets.load_from_disk``.
- a ``datasets.Dataset`` / ``IterableDataset`` / ``DatasetDict`` object, or any iterable of
  strings (a list, a generator) or of dict rows (text in ``text_column``).
- anything else: a Hugging Face ``datasets`` dataset name, read with ``streaming=True`` by
  default; ``"name:config"`` selects a configuration (e.g. ``"wikitext:wikitext-103-raw-v1"``).

Held-out data is disjoint from training data for every source. A source without a split of
the requested name (a single file, a folder without split subfolders, a ``Dataset`` object, a
dataset that has only ``train``) is split deterministically by document: a document belongs to
``validation`` when a hash of its text falls in the lowest :data:`HELDOUT_FRACTION` of the range
(:func:`is_heldout`), and ``train`` then excludes exactly those documents. ``split="all"`` reads
everything. Iterables of strings passed directly are read as they are (their split is the caller's).

Tokenization (``tokenize_windows`` / ``iter_windows``): documents are tokenized without
special tokens, joined with the tokenizer's EOS token after each document, and packed
into windows of ``window`` tokens; with ``add_bos`` each window starts with BOS followed by
``window - 1`` text tokens. The final partial window is dropped.

``token_mask`` says which tokens become SAE data: position 0 (whose residual norm is
~100x the others), BOS, EOS, pad and other special tokens are excluded by default.
"""
from __future__ import annotations

import gzip
import hashlib
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

HELDOUT_FRACTION = 0.05
"""Share of documents held out as ``validation`` in sources that have no validation split."""
TRAIN_SPLITS = ("train",)
HELDOUT_SPLITS = ("validation", "valid", "val", "test", "heldout", "held-out")

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


def is_heldout(text: str) -> bool:
    """True when the document ``text`` belongs to the derived ``validation`` split (a fixed function of
    the text: the same document is on the same side in every run, process and file order)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h < HELDOUT_FRACTION * 2.0 ** 64


def derived_split(texts: Iterable[str], split: str, source: str = "this source") -> Iterator[str]:
    """The documents of ``texts`` in ``split`` when the source has no such split: ``train`` keeps the
    documents that are not :func:`is_heldout`, ``validation`` (and aliases) the held-out ones, ``all``
    everything. Other split names raise ValueError."""
    split = (split or "train").lower()
    if split == "all":
        yield from texts
        return
    if split not in TRAIN_SPLITS + HELDOUT_SPLITS:
        raise ValueError(f"{source} has no split {split!r}; use 'train', 'validation' (a held-out "
                         f"{HELDOUT_FRACTION:.0%} of its documents) or 'all'.")
    held = split in HELDOUT_SPLITS
    for t in texts:
        if isinstance(t, str) and is_heldout(t) == held:
            yield t


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _local_texts(path: Path, split: str, text_column: str) -> Iterator[str]:
    if path.is_file():
        yield from derived_split(_file_texts(path, text_column), split, str(path))
        return
    if _is_saved_dataset(path):
        import datasets

        yield from _dataset_texts(datasets.load_from_disk(str(path)), split, text_column, str(path))
        return
    split_l = (split or "train").lower()
    has_heldout = any((path / h).is_dir() for h in HELDOUT_SPLITS)
    if split_l != "all" and (path / split).is_dir() and (has_heldout or split_l not in TRAIN_SPLITS):
        root, derive = path / split, False  # real split folders
    elif split_l in HELDOUT_SPLITS + TRAIN_SPLITS and (path / "train").is_dir():
        root, derive = path / "train", True  # only train/: hold out a share of its documents
    else:
        root, derive = path, split_l != "all"
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and p.name.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"No .txt/.jsonl/.json/.parquet files under {root} (it holds: "
                                f"{sorted(p.name for p in root.iterdir())[:20]}).")
    texts = (t for f in files for t in _file_texts(f, text_column))
    yield from derived_split(texts, split, str(path)) if derive else texts


def _is_datasets_object(obj) -> bool:
    mod = type(obj).__module__ or ""
    return mod.startswith("datasets.") and hasattr(obj, "column_names")


def _dataset_texts(ds, split: str, text_column: str, source: str) -> Iterator[str]:
    """Documents of a ``datasets`` object: a DatasetDict / IterableDatasetDict is indexed by ``split`` (or
    split by document when it lacks it); a Dataset / IterableDataset is split by document."""
    split = split or "train"
    if isinstance(ds, dict):  # DatasetDict / IterableDatasetDict
        has_heldout = any(h in ds for h in HELDOUT_SPLITS)
        if split in ds and (has_heldout or split.lower() not in TRAIN_SPLITS):
            ds, derive = ds[split], False
        elif split.lower() == "all":
            parts = list(ds.values())
            yield from (t for part in parts for t in _dataset_texts(part, "all", text_column, source))
            return
        elif "train" in ds and split.lower() in HELDOUT_SPLITS + TRAIN_SPLITS:
            ds, derive = ds["train"], True
        else:
            raise ValueError(f"{source} has splits {sorted(ds)}, not {split!r}.")
    else:
        derive = True
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_column not in cols:
        raise ValueError(f"{source} has no column {text_column!r} (columns: {cols}); pass text_column=... "
                         "(--text-column).")
    texts = (row[text_column] for row in ds)
    yield from derived_split(texts, split, source) if derive else texts


def _iterable_texts(obj, text_column: str) -> Iterator[str]:
    """Strings, or dict rows holding ``text_column``, from any iterable (list, generator, ...)."""
    for row in obj:
        if isinstance(row, str):
            yield row
        elif isinstance(row, dict):
            if text_column not in row:
                raise ValueError(f"a text row has no {text_column!r} field (fields: {sorted(row)}); pass "
                                 "text_column=...")
            yield row[text_column]
        else:
            raise TypeError(f"texts must be strings or dict rows with a {text_column!r} field, got "
                            f"{type(row).__name__}.")


def _hub_texts(source: str, split: str, text_column: str, streaming: bool) -> Iterator[str]:
    import datasets

    name, config = (source.split(":", 1) + [None])[:2] if ":" in source else (source, None)
    try:
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        except ValueError as e:  # no such split: hold out a share of train's documents
            if "split" not in str(e).lower() or (split or "").lower() not in HELDOUT_SPLITS:
                raise
            ds = datasets.load_dataset(name, config, split="train", streaming=streaming)
            yield from _dataset_texts(ds, split, text_column, source)
            return
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


def load_texts(source="default", split: str = "train", text_column: str = "text",
               streaming: bool = True, max_texts: int | None = None) -> Iterator[str]:
    """Iterate over the documents of a text source (see the module docstring for sources).

    Args:
        source: ``"default"`` (shipped KJV), a local file/folder (also a ``save_to_disk`` folder), a
            ``datasets`` name (``"name"`` or ``"name:config"``), a ``datasets`` object, or an iterable of
            strings / dict rows.
        split: ``"train"``/``"validation"``/``"all"``; for a source without that split, a held-out
            share of documents (see the module docstring); the split for ``datasets``; a subfolder
            name (if it exists) for a local folder.
        text_column: field holding the text in jsonl/parquet/``datasets`` sources.
        streaming: stream a ``datasets`` dataset instead of downloading it first.
        max_texts: stop after this many non-empty documents.
    Yields:
        Non-empty document strings, in source order.
    """
    if max_texts is not None and max_texts < 0:
        raise ValueError(f"max_texts must be >= 0, got {max_texts}.")
    if _is_datasets_object(source):
        it = _dataset_texts(source, split, text_column, f"the {type(source).__name__}")
        it = (t for t in it if isinstance(t, str) and t.strip())
        return islice(it, max_texts) if max_texts is not None else it
    if not isinstance(source, (str, Path)):
        if isinstance(source, (bytes, dict)) or not isinstance(source, Iterable):
            raise TypeError(f"a text source is a name/path string, a datasets object or an iterable of strings, "
                            f"got {type(source).__name__}.")
        it = (t for t in _iterable_texts(source, text_column) if t.strip())
        return islice(it, max_texts) if max_texts is not None else it
    src = str(source)
    if src.lower() == "default":
        it = _default_texts(split)
    else:
        path = Path(src).expanduser()
        if path.exists():
            it = _local_texts(path, split, text_column)
        elif _looks_local(src) or src.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES):
            parent = next((p for p in path.parents if p.is_dir()), Path("."))
            raise FileNotFoundError(f"Text source {src} does not exist ({parent} holds: "
                                    f"{', '.join(sorted(c.name for c in parent.iterdir())[:20]) or 'nothing'}).")
        else:
            it = _hub_texts(src, split, text_column, streaming)
    it = (t for t in it if isinstance(t, str) and t.strip())
    return islice(it, max_texts) if max_texts is not None else it


def _looks_local(src: str) -> bool:
    from ..hub_layout import looks_local  # one rule for "a local path, never a Hub id" (SAE folders and text sources)

    return looks_local(src)


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
        if hasattr(tokenizer, "convert_tokens_to_ids"):
            ids = special_token_ids(tokenizer)
        else:
            ids = sorted(int(i) for i in tokenizer)
        if ids:
            keep &= ~torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))
    return keep


def windows_with_tokens(
    source: str, tokenizer, n_tokens: int, window: int = 256, split: str = "validation", text_column: str = "text"
) -> torch.LongTensor:
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
