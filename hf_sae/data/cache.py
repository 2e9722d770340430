"""Activations cached on disk as Hugging Face ``datasets`` Arrow shards, and a fast reader.

Layout written by :func:`cache_activations` (``hf-sae cache``)::

    out_dir/
      metadata.json                 run-level: model, hook points, token count, dtype, window, ...
      progress.json                 resume record: windows done, shards with checksums and stats
      windows/shard-00000.arrow     the token windows of each shard (column ``input_ids``
                                    fixed_size_list<int32>[window]) for dashboards / N2G context
      <hook_point>/                 e.g. ``layers.6.resid_post/``; a ``datasets.load_from_disk`` folder
        shard-00000.arrow ...       columns: ``activation`` fixed_size_list<float16|float32|uint16>[d]
                                    (uint16 = bfloat16 bits), ``input_ids`` int32, ``position`` int32,
                                    ``window`` int32 (global window index)
        metadata.json               model, hook_point, d, dtype, num_tokens, mean [d],
                                    mean_sq_norm, input_scale, shards [{file, num_rows, bytes, sha256}]
        state.json, dataset_info.json   (so ``datasets.load_from_disk`` opens the folder)

Every shard holds whole windows, is written to a temporary file and renamed into place, and
only then recorded in ``progress.json`` (itself replaced atomically). A killed run therefore
resumes from the last recorded shard and ends with exactly ``max_tokens`` tokens. On resume
every recorded shard is checked (size + sha256); the first bad one and all after it are
regenerated.

:class:`CachedActivations` reads shards by memory-mapping the Arrow files and viewing the
fixed-size-list child buffer as a ``[rows, d]`` torch tensor (no copy); shuffled batches are
gathered with index permutations over groups of shards. Checksums are verified once per
shard and process, in a background thread ahead of use; a truncated or corrupt shard raises
:class:`CorruptShardError` naming the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .._faults import fault_point
from .._io import atomic_write_bytes, atomic_write_json, sha256_file
from .stream import _as_hook_list, harvest, window_source

FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ARROW_CHILD = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
_NP = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


class CorruptShardError(ValueError):
    """A cached shard is truncated, altered or unreadable; the message names the file and the fix."""


class CorruptMetadataError(ValueError):
    """A cache's ``metadata.json`` is unreadable, incomplete, edited, or disagrees with its shards."""


META_CHECKSUM = "metadata_sha256"


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _with_checksum(meta: dict) -> dict:
    return {**meta, META_CHECKSUM: _meta_digest(meta)}


def _read_json(path: Path, what: str = "metadata.json") -> dict:
    """Parse a cache's JSON file; a truncated or non-JSON file is a :class:`CorruptMetadataError`."""
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptMetadataError(f"{path} is not valid JSON ({e}); the file was truncated or edited: restore it, "
                                   f"or re-create the cache with the same `hf-sae cache` command and a new --out"
                                   ) from None
    if not isinstance(obj, dict):
        raise CorruptMetadataError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def _load_hook_meta(folder: Path) -> dict:
    """Read and check a hook-point folder's ``metadata.json``: every field the reader relies on, its type,
    the checksum written with it, and the identities between fields (rows add up, input_scale matches
    the statistics). Errors name the file and the field."""
    path = folder / "metadata.json"
    meta = _read_json(path)

    def bad(field, why):
        raise CorruptMetadataError(f"{path}: field {field!r} {why}; metadata.json was edited or damaged: restore "
                                   "it, or re-create the cache with the same `hf-sae cache` command")

    want = META_CHECKSUM in meta
    if want and meta[META_CHECKSUM] != _meta_digest(meta):
        raise CorruptMetadataError(f"{path} was modified after the cache was written (its {META_CHECKSUM} does not "
                                   "match its contents); restore the original file, or re-create the cache with the "
                                   "same `hf-sae cache` command")
    for field, ok, what in (
            ("hook_point", lambda v: isinstance(v, str) and v, "a hook point name"),
            ("d", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
            ("dtype", lambda v: v in _DTYPES, f"one of {sorted(_DTYPES)}"),
            ("num_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
            ("shards", lambda v: isinstance(v, list), "a list of shard records")):
        if field not in meta:
            bad(field, "is missing")
        if not ok(meta[field]):
            bad(field, f"must be {what}, found {meta[field]!r}")
    for i, r in enumerate(meta["shards"]):
        if not (isinstance(r, dict) and isinstance(r.get("file"), str) and r["file"] == Path(r["file"]).name
                and all(isinstance(r.get(k), int) and r[k] > 0 for k in ("num_rows", "bytes"))
                and isinstance(r.get("sha256"), str) and len(r["sha256"]) == 64):
            bad(f"shards[{i}]", "must be {file, num_rows > 0, bytes > 0, sha256}")
    rows = sum(r["num_rows"] for r in meta["shards"])
    if rows != meta["num_tokens"]:
        bad("num_tokens", f"is {meta['num_tokens']} but the shards hold {rows} rows")
    msn, scale = meta.get("mean_sq_norm"), meta.get("input_scale")
    if rows:
        if not (isinstance(msn, (int, float)) and math.isfinite(msn) and msn > 0):
            bad("mean_sq_norm", f"must be a finite number > 0, found {msn!r}")
        expect = norm_stats_to_input_scale(float(msn), meta["d"])
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
                and abs(scale - expect) <= 1e-6 * expect):
            bad("input_scale", f"must be sqrt(d / mean_sq_norm) = {expect:.6g}, found {scale!r}")
    return meta


def _check_shard_schema(path: Path, table, meta: dict, info: dict) -> None:
    """The shard's Arrow schema and row count must agree with metadata.json (called after the shard's own
    checksum passed, so a disagreement means metadata.json is wrong)."""
    import pyarrow as pa

    t = table.schema.field("activation").type
    width = getattr(t, "list_size", None)
    child = str(t.value_type) if hasattr(t, "value_type") else str(t)
    arrow_child = {"halffloat": "float16", "float": "float32", "uint16": "uint16"}.get(child, child)
    problems = []
    if width != meta["d"]:
        problems.append(f"d = {meta['d']} but the shard stores rows of {width} values")
    if arrow_child != _ARROW_CHILD[meta["dtype"]]:
        problems.append(f"dtype = {meta['dtype']} but the shard stores {arrow_child}")
    if table.num_rows != info["num_rows"]:
        problems.append(f"num_rows = {info['num_rows']} but the shard holds {table.num_rows} rows")
    del pa
    if problems:
        raise CorruptMetadataError(f"{path.parent / 'metadata.json'} disagrees with the intact shard {path.name}: "
                                   f"{'; '.join(problems)}. metadata.json was edited: restore it, or re-create "
                                   "the cache with the same `hf-sae cache` command")


def norm_stats_to_input_scale(mean_sq_norm: float, d: int) -> float:
    """The scalar ``s`` with ``E||s x||^2 = d``, i.e. ``sqrt(d / E||x||^2)``.

    Args:
        mean_sq_norm: ``E||x||^2`` in the activation's units squared (> 0, finite).
        d: feature dimension.
    """
    if not (isinstance(d, int) and d > 0):
        raise ValueError(f"d must be a positive int, got {d!r}.")
    if not (math.isfinite(mean_sq_norm) and mean_sq_norm > 0):
        raise ValueError(f"mean_sq_norm must be finite and > 0, got {mean_sq_norm!r}.")
    return math.sqrt(d / mean_sq_norm)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for k, v in _DTYPES.items():
            if v == dtype:
                return k
    name = str(dtype).replace("torch.", "").lower()
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"Unsupported cache dtype {dtype!r}: use 'float16', 'bfloat16' or 'float32'.")
    return name


def _hook_dir_name(hook_point: str) -> str:
    if "/" in hook_point or "\\" in hook_point or hook_point in (".", "..", "windows"):
        raise ValueError(f"Hook point {hook_point!r} cannot be used as a folder name.")
    return hook_point


def _features(d: int, dtype_name: str, window: int | None = None):
    import datasets

    List = getattr(datasets, "List", None)
    if window is not None:
        if List is not None:
            return datasets.Features({"input_ids": List(datasets.Value("int32"), length=window)})
        return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=window)})
    v = datasets.Value(_ARROW_CHILD[dtype_name])
    act = List(v, length=d) if List is not None else datasets.Sequence(v, length=d)
    return datasets.Features({"activation": act, "input_ids": datasets.Value("int32"),
                              "position": datasets.Value("int32"), "window": datasets.Value("int32")})


_atomic_write_bytes = atomic_write_bytes
_atomic_write_json = atomic_write_json


def _fixed_list(flat: np.ndarray, width: int):
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def _serialize(table_arrays: dict, schema) -> tuple[bytes, str]:
    import pyarrow as pa

    batch = pa.RecordBatch.from_arrays(list(table_arrays.values()), schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(batch)
    buf = sink.getvalue()
    return buf, hashlib.sha256(memoryview(buf)).hexdigest()


_sha256_file = sha256_file


def _fix_hint(path: Path) -> str:
    return (f"delete it (or its cache folder) and re-run the same `hf-sae cache ... --resume` command "
            f"(resume re-checks every shard and regenerates {path.name} and the shards after it)")


def _check_shard_file(path: Path, expected_bytes: int | None, expected_sha: str | None) -> None:
    if not path.is_file():
        raise CorruptShardError(f"Cached shard {path} is missing; {_fix_hint(path)}.")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        kind = "truncated" if size < expected_bytes else "longer than recorded"
        raise CorruptShardError(f"Cached shard {path} is {kind} ({size} bytes, expected {expected_bytes}); "
                                f"{_fix_hint(path)}.")
    if expected_sha is not None:
        got = _sha256_file(path)
        if got != expected_sha:
            raise CorruptShardError(f"Cached shard {path} is corrupt (sha256 {got[:12]}... != recorded "
                                    f"{expected_sha[:12]}...); {_fix_hint(path)}.")


# --------------------------------------------------------------------------- writer


def _fingerprint(model_name, hook_points, dtype_name, window, add_bos, exclude_first, exclude_special,
                 max_tokens, source_id) -> dict:
    return {"format_version": FORMAT_VERSION, "model": model_name, "hook_points": list(hook_points),
            "dtype": dtype_name, "window": window, "add_bos": add_bos, "exclude_first": exclude_first,
            "exclude_special": exclude_special, "max_tokens": max_tokens, "source": source_id}


def _model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(model).__name__


class _ShardWriter:
    """Writes shards in a background thread (overlapping the next LM batches) and updates progress."""

    def __init__(self, out_dir: Path, hook_points, dims, dtype_name, window, progress):
        import pyarrow as pa

        self.out_dir, self.hook_points, self.dims = out_dir, hook_points, dims
        self.dtype_name, self.window, self.progress = dtype_name, window, progress
        self.schemas = {h: _features(dims[h], dtype_name).arrow_schema for h in hook_points}
        self.win_schema = _features(0, dtype_name, window=window).arrow_schema if window else None
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.future = None
        self._pa = pa

    def submit(self, payload) -> None:
        self.wait()
        self.future = self.pool.submit(self._write, payload)

    def wait(self) -> None:
        if self.future is not None:
            f, self.future = self.future, None
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

    def _write(self, p) -> None:
        idx = p["index"]
        name = f"shard-{idx:05d}.arrow"
        ids = p["input_ids"].numpy().astype(np.int32)
        pos = p["positions"].numpy().astype(np.int32)
        win = p["windows"].numpy().astype(np.int32)
        rec = {"index": idx, "windows": [p["win_start"], p["win_end"]], "num_rows": int(ids.shape[0]),
               "files": {}, "stats": {}}
        pa = self._pa
        for h in self.hook_points:
            x = p["acts"][h]
            if self.dtype_name == "bfloat16":
                flat = x.contiguous().view(torch.int16).numpy().view(np.uint16)
            else:
                flat = x.contiguous().numpy()
            arrays = {"activation": _fixed_list(flat, self.dims[h]), "input_ids": pa.array(ids),
                      "position": pa.array(pos), "window": pa.array(win)}
            buf, sha = _serialize(arrays, self.schemas[h])
            path = self.out_dir / _hook_dir_name(h) / name
            _atomic_write_bytes(path, memoryview(buf))
            rec["files"][h] = {"file": f"{_hook_dir_name(h)}/{name}", "bytes": buf.size, "sha256": sha}
            rec["stats"][h] = p["stats"][h]
        if p.get("window_tokens") is not None:
            wins = p["window_tokens"].numpy().astype(np.int32)
            buf, sha = _serialize({"input_ids": _fixed_list(wins, self.window)}, self.win_schema)
            _atomic_write_bytes(self.out_dir / "windows" / name, memoryview(buf))
            rec["files"]["windows"] = {"file": f"windows/{name}", "bytes": buf.size, "sha256": sha}
        self.progress["shards"].append(rec)
        self.progress["windows_done"] = p["win_end"]
        self.progress["num_tokens"] += rec["num_rows"]
        _atomic_write_json(self.out_dir / "progress.json", self.progress)
        fault_point("cache.shard_recorded")


def _verify_progress(out_dir: Path, progress: dict, hook_points) -> None:
    """Keep the longest prefix of recorded shards whose files are intact; drop the rest."""
    good = []
    for rec in progress["shards"]:
        try:
            for key in list(hook_points) + (["windows"] if "windows" in rec["files"] else []):
                info = rec["files"][key]
                _check_shard_file(out_dir / info["file"], info["bytes"], info["sha256"])
        except (CorruptShardError, KeyError) as e:
            warnings.warn(f"Resume: {e if isinstance(e, CorruptShardError) else 'incomplete record'}; "
                          f"regenerating from shard {rec['index']} on.")
            break
        good.append(rec)
    progress["shards"] = good
    progress["windows_done"] = good[-1]["windows"][1] if good else 0
    progress["num_tokens"] = sum(r["num_rows"] for r in good)


def _clean_unrecorded(out_dir: Path, progress: dict, hook_points) -> None:
    recorded = {info["file"] for rec in progress["shards"] for info in rec["files"].values()}
    for sub in list(hook_points) + ["windows"]:
        d = out_dir / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            rel = f"{sub}/{f.name}"
            if f.name.endswith(".tmp") or (f.name.startswith("shard-") and rel not in recorded):
                f.unlink()


def _finalize(out_dir: Path, progress: dict, hook_points, dims, dtype_name, meta_common) -> dict:
    import datasets  # noqa: F401  (features JSON comes from the installed version)

    per_hook = {}
    for h in hook_points:
        d = dims[h]
        n = sum(r["num_rows"] for r in progress["shards"])
        s = np.zeros(d, dtype=np.float64)
        sq = 0.0
        for r in progress["shards"]:
            s += np.asarray(r["stats"][h]["sum"], dtype=np.float64)
            sq += float(r["stats"][h]["sum_sq_norm"])
        mean = (s / n) if n else s
        msn = sq / n if n else float("nan")
        shards = [{"file": Path(r["files"][h]["file"]).name, "num_rows": r["num_rows"],
                   "bytes": r["files"][h]["bytes"], "sha256": r["files"][h]["sha256"],
                   "windows": r["windows"]} for r in progress["shards"]]
        meta = dict(meta_common)
        meta.update({"hook_point": h, "d": d, "dtype": dtype_name, "num_tokens": n,
                     "mean": mean.tolist(), "mean_sq_norm": msn,
                     "mean_norm_of_mean": float(np.linalg.norm(mean)),
                     "input_scale": norm_stats_to_input_scale(msn, d) if n and msn > 0 else None,
                     "shards": shards})
        hd = out_dir / _hook_dir_name(h)
        _atomic_write_json(hd / "metadata.json", _with_checksum(meta))
        feats = _features(d, dtype_name)
        _atomic_write_json(hd / "dataset_info.json", {"citation": "", "description":
                           f"hf_sae activations of {meta_common['model']} at {h}", "features": feats.to_dict(),
                           "homepage": "", "license": ""})
        _atomic_write_json(hd / "state.json", {"_data_files": [{"filename": s["file"]} for s in shards],
                                               "_fingerprint": hashlib.sha256("".join(s["sha256"] for s in shards)
                                                                              .encode()).hexdigest()[:16],
                                               "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                                               "_output_all_columns": False, "_split": None})
        per_hook[h] = {k: v for k, v in meta.items() if k not in ("mean", "shards")}
    root = dict(meta_common)
    root.update({"hook_points": list(hook_points), "dtype": dtype_name,
                 "num_tokens": progress["num_tokens"], "num_shards": len(progress["shards"]),
                 "windows_done": progress["windows_done"], "per_hook_point": per_hook})
    _atomic_write_json(out_dir / "metadata.json", _with_checksum(root))
    return root


def cache_activations(model, tokenizer, texts_or_windows, hook_points, out_dir, max_tokens: int | None,
                      dtype="float16", batch_windows: int = 8, shard_tokens: int = 1 << 16, resume: bool = True,
                      *, window: int = 256, add_bos: bool = True, exclude_first: bool = True,
                      exclude_special: bool = True, split: str = "train", text_column: str = "text",
                      model_name: str | None = None, source_id: str | None = None, progress: bool = True,
                      overwrite: bool = False) -> dict:
    """Run the LM once over a corpus and write activations at every hook point to disk.

    Args:
        model, tokenizer: the LM (eval mode) and its tokenizer.
        texts_or_windows: a source string (``"default"``, file/folder, dataset name), an iterable
            of documents, or a LongTensor ``[N, T]`` of windows.
        hook_points: hook-point names, all captured in the same forward.
        out_dir: output folder (layout in the module docstring).
        max_tokens: rows (kept tokens) to write per hook point; ``None`` = the whole source.
            The count is exact; if the source runs out first a warning says how many were written.
        dtype: storage dtype, ``"float16"`` / ``"bfloat16"`` / ``"float32"``.
        batch_windows: windows per LM forward.
        shard_tokens: target rows per shard (shards hold whole windows, so slightly more).
        resume: continue a previous run in ``out_dir`` with the same settings (a run with
            different settings raises ``ValueError``); ``overwrite=True`` deletes it instead.
        window, add_bos, split, text_column: tokenization / source options (see ``corpus``).
        exclude_first, exclude_special: token masking (see ``token_mask``).
        model_name: recorded in metadata (default: the model's ``name_or_path``).
        source_id: recorded and checked on resume (default: the source string, a hash of the
            windows tensor, or ``"iterable"``).
    Returns:
        The run metadata (also in ``out_dir/metadata.json``), with ``per_hook_point`` statistics:
        ``num_tokens``, ``mean_sq_norm`` (E||x||^2) and ``input_scale`` (sqrt(d / E||x||^2)).
    """
    from tqdm.auto import tqdm

    from hf_sae.hooks import hook_point_dim

    hook_points = _as_hook_list(hook_points)
    for h in hook_points:
        _hook_dir_name(h)
    dtype_name = _dtype_name(dtype)
    store_dtype = _DTYPES[dtype_name]
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None for the whole source), got {max_tokens}.")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}.")
    dims = {h: hook_point_dim(model, h) for h in hook_points}
    model_name = model_name or _model_name(model)
    if isinstance(texts_or_windows, torch.Tensor):
        window = int(texts_or_windows.shape[1]) if texts_or_windows.dim() == 2 else window
        if source_id is None:
            source_id = "windows:" + hashlib.sha256(texts_or_windows.long().contiguous().numpy().tobytes()).hexdigest()
    elif source_id is None:
        source_id = f"{texts_or_windows}:{split}" if isinstance(texts_or_windows, str) else "iterable"
    fp = _fingerprint(model_name, hook_points, dtype_name, window, add_bos, exclude_first, exclude_special,
                      max_tokens, source_id)

    out = Path(out_dir)
    prog_path = out / "progress.json"
    state = None
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not prog_path.is_file():
            raise ValueError(f"{out} exists, is not empty and is not an hf_sae cache; choose another folder "
                             f"or pass overwrite=True (--overwrite) to delete it.")
        elif not resume:
            raise ValueError(f"{out} already holds a cache; pass resume=True (--resume) to continue it "
                             f"or overwrite=True (--overwrite) to start again.")
        else:
            state = json.loads(prog_path.read_text())
            if state.get("fingerprint") != fp:
                old = state.get("fingerprint", {})
                diff = {k: (old.get(k), fp[k]) for k in fp if old.get(k) != fp[k]}
                raise ValueError(f"Cannot resume {out}: it was written with different settings {diff} "
                                 f"(old, new); use another folder or overwrite=True.")
            _verify_progress(out, state, hook_points)
    if state is None:
        state = {"fingerprint": fp, "windows_done": 0, "num_tokens": 0, "shards": [], "complete": False}
    for h in hook_points:
        (out / _hook_dir_name(h)).mkdir(parents=True, exist_ok=True)
    (out / "windows").mkdir(parents=True, exist_ok=True)
    _clean_unrecorded(out, state, hook_points)
    state["complete"] = False
    _atomic_write_json(prog_path, state)

    meta_common = {"format_version": FORMAT_VERSION, "model": model_name, "window": window, "add_bos": add_bos,
                   "exclude_first": exclude_first, "exclude_special": exclude_special, "source": source_id,
                   "max_tokens": max_tokens}
    done_tokens = state["num_tokens"]
    target = max_tokens if max_tokens is not None else math.inf
    writer = _ShardWriter(out, hook_points, dims, dtype_name, window, state)
    try:
        if done_tokens < target:
            windows, n_windows = window_source(texts_or_windows, tokenizer, window, add_bos, split, text_column)
            start = state["windows_done"]
            for _ in range(start):  # skip windows already cached (cheap: tokenization only)
                if next(windows, None) is None:
                    break
            total = max_tokens if max_tokens is not None else None
            bar = tqdm(total=total, initial=done_tokens, unit="tok", desc="caching activations",
                       disable=not progress)
            buf = _new_buf(hook_points, dims)
            n_buf, win_start, win_cur = 0, start, start
            shard_index = len(state["shards"])
            for hb in harvest(model, tokenizer, windows, hook_points, batch_windows,
                              exclude_first, exclude_special, window_offset=start):
                n = hb.input_ids.shape[0]
                if done_tokens + n_buf + n >= target:
                    n = int(target - done_tokens - n_buf)
                for h in hook_points:
                    x = hb.acts[h][:n].to("cpu", store_dtype)
                    xf = x.float()
                    s = xf.sum(0, dtype=torch.float64)
                    sq = float((xf * xf).sum(dtype=torch.float64))
                    if not math.isfinite(sq):
                        raise ValueError(f"Non-finite activations at {h!r} (after casting to {dtype_name}): "
                                         f"{'use dtype float32 or bfloat16 (float16 overflows past 65504)' if dtype_name == 'float16' else 'the model produced NaN/inf'}.")
                    buf["acts"][h].append(x)
                    buf["sum"][h] += s
                    buf["sq"][h] += sq
                buf["input_ids"].append(hb.input_ids[:n])
                buf["positions"].append(hb.positions[:n])
                buf["windows"].append(hb.windows[:n])
                buf["window_tokens"].append(hb.window_tokens)
                n_buf += n
                win_cur += hb.n_windows
                bar.update(n)
                finished = done_tokens + n_buf >= target
                if n_buf >= shard_tokens or finished:
                    writer.submit(_payload(buf, hook_points, shard_index, win_start, win_cur))
                    shard_index += 1
                    done_tokens += n_buf
                    buf = _new_buf(hook_points, dims)
                    n_buf, win_start = 0, win_cur
                if finished:
                    break
            if n_buf:
                writer.submit(_payload(buf, hook_points, shard_index, win_start, win_cur))
                done_tokens += n_buf
            bar.close()
        writer.close()
    except BaseException:
        try:
            writer.close()
        except Exception:
            pass
        raise
    if max_tokens is not None and state["num_tokens"] < max_tokens:
        warnings.warn(f"The source ran out after {state['num_tokens']} tokens (max_tokens={max_tokens}).")
    state["complete"] = True
    _atomic_write_json(prog_path, state)
    return _finalize(out, state, hook_points, dims, dtype_name, meta_common)


def write_activations(out_dir, acts: dict, input_ids=None, positions=None, dtype="float16",
                      shard_tokens: int = 1 << 16, model_name: str = "synthetic", progress: bool = False) -> dict:
    """Write given activations as a cache readable by :class:`CachedActivations` (no LM involved).

    For synthetic data, tests and benchmarks, or activations computed elsewhere.

    Args:
        out_dir: new folder (must not exist or be empty).
        acts: ``{hook_point: Tensor [N, d]}``, same N for all hook points.
        input_ids, positions: optional LongTensor ``[N]`` stored alongside (default zeros).
        dtype: storage dtype; shard_tokens: rows per shard.
    Returns:
        The run metadata, as :func:`cache_activations`. No token windows are stored.
    """
    from tqdm.auto import tqdm

    if not isinstance(acts, dict) or not acts:
        raise ValueError("acts must be a non-empty dict {hook_point: Tensor [N, d]}.")
    hook_points = list(acts)
    for h in hook_points:
        _hook_dir_name(h)
    n = {t.shape[0] for t in acts.values()}
    if len(n) != 1 or any(t.dim() != 2 for t in acts.values()):
        raise ValueError(f"All activations must be [N, d] with the same N, got {[tuple(t.shape) for t in acts.values()]}.")
    N = n.pop()
    dtype_name = _dtype_name(dtype)
    for h, t in acts.items():  # before anything is written: a NaN/Inf row would poison every statistic
        stored = t.detach().to("cpu", _DTYPES[dtype_name])
        finite = torch.isfinite(stored).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten()
            raise ValueError(f"activations for {h!r} have NaN/Inf values in {len(rows)} row(s), first at row "
                             f"{int(rows[0])} (after casting to {dtype_name}); remove or recompute them"
                             + (" (float16 overflows past 65504: use bfloat16 or float32)"
                                if dtype_name == "float16" and bool(torch.isfinite(t[rows[0]]).all()) else ""))
    dims = {h: int(t.shape[1]) for h, t in acts.items()}
    ids = torch.zeros(N, dtype=torch.long) if input_ids is None else input_ids.long()
    pos = torch.zeros(N, dtype=torch.long) if positions is None else positions.long()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder.")
    for h in hook_points:
        (out / h).mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": {"format_version": FORMAT_VERSION, "model": model_name, "hook_points": hook_points,
                             "dtype": dtype_name, "source": "tensors"},
             "windows_done": 0, "num_tokens": 0, "shards": [], "complete": False}
    writer = _ShardWriter(out, hook_points, dims, dtype_name, 0, state)
    try:
        for i, a in enumerate(tqdm(range(0, N, shard_tokens), disable=not progress, desc="writing shards")):
            b = min(a + shard_tokens, N)
            stats = {}
            xs = {}
            for h in hook_points:
                x = acts[h][a:b].detach().to("cpu", _DTYPES[dtype_name]).contiguous()
                xf = x.double()
                stats[h] = {"sum": xf.sum(0).tolist(), "sum_sq_norm": float((xf * xf).sum())}
                xs[h] = x
            writer.submit({"index": i, "win_start": 0, "win_end": 0, "acts": xs, "stats": stats,
                           "input_ids": ids[a:b], "positions": pos[a:b],
                           "windows": torch.zeros(b - a, dtype=torch.long), "window_tokens": None})
        writer.close()
    except BaseException:
        writer.close()
        raise
    state["complete"] = True
    _atomic_write_json(out / "progress.json", state)
    meta_common = {"format_version": FORMAT_VERSION, "model": model_name, "window": None, "source": "tensors"}
    return _finalize(out, state, hook_points, dims, dtype_name, meta_common)


def _new_buf(hook_points, dims):
    return {"acts": {h: [] for h in hook_points}, "sum": {h: torch.zeros(dims[h], dtype=torch.float64)
                                                          for h in hook_points},
            "sq": {h: 0.0 for h in hook_points}, "input_ids": [], "positions": [], "windows": [],
            "window_tokens": []}


def _payload(buf, hook_points, index, win_start, win_end):
    return {"index": index, "win_start": win_start, "win_end": win_end,
            "acts": {h: torch.cat(buf["acts"][h]) for h in hook_points},
            "stats": {h: {"sum": buf["sum"][h].tolist(), "sum_sq_norm": buf["sq"][h]} for h in hook_points},
            "input_ids": torch.cat(buf["input_ids"]), "positions": torch.cat(buf["positions"]),
            "windows": torch.cat(buf["windows"]), "window_tokens": torch.cat(buf["window_tokens"])}


# --------------------------------------------------------------------------- reader


def _find_meta(path: Path, hook_point):
    """Return (root_dir or None, [hook folder paths], [hook names]) for a cache path."""
    if not path.exists():
        raise FileNotFoundError(f"No activation cache at {path}; create one with `hf-sae cache --out {path} ...`.")
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        if (path / "progress.json").is_file() or (path.parent / "progress.json").is_file():
            raise ValueError(f"The cache at {path} is incomplete (no metadata.json): finish it by re-running "
                             f"the same `hf-sae cache ... --resume` command.")
        raise FileNotFoundError(f"{path} has no metadata.json; it is not an hf_sae activation cache.")
    meta = _read_json(meta_path)
    if "hook_point" in meta:  # a hook-point folder itself
        if hook_point not in (None, meta["hook_point"]) and hook_point != [meta["hook_point"]]:
            raise ValueError(f"{path} holds hook point {meta['hook_point']!r}, not {hook_point!r}.")
        return [path], [meta["hook_point"]]
    available = meta.get("hook_points", [])
    if hook_point is None:
        if len(available) != 1:
            raise ValueError(f"The cache at {path} holds several hook points {available}; pass hook_point=.")
        names = available
    else:
        names = [hook_point] if isinstance(hook_point, str) else list(hook_point)
        bad = [h for h in names if h not in available]
        if bad:
            raise ValueError(f"Hook point(s) {bad} are not in the cache at {path}; it holds {available}.")
    return [path / _hook_dir_name(h) for h in names], names


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class CachedActivations(torch.utils.data.IterableDataset):
    """Fast shuffled batches of cached activations, read straight from memory-mapped Arrow shards.

    Each epoch visits every row once: shards are taken in a random order, in groups of
    ``shuffle_buffer_shards``; the rows of a group are permuted and cut into batches of
    ``batch_size`` (batches may straddle groups). Within a batch, rows are ordered by their
    position on disk (the set of rows is random; the order inside one batch is not).

    Items are FloatTensor ``[batch, d]`` (``dtype``; ``None`` keeps the storage dtype), or, with
    ``return_tokens=True`` or a list of hook points, a dict ``{hook_point: [batch, d], ...,
    "input_ids": LongTensor [batch], "positions": LongTensor [batch], "windows": LongTensor
    [batch]}`` (tokens only with ``return_tokens``; ``windows`` indexes :func:`load_windows`). Several hook points of one cache share rows, so a list of hook points
    gives aligned activations of the same tokens.

    Sharding: batch ``t`` of the global epoch order goes to process ``t % num_processes``; with
    ``num_processes > 1`` every process gets the same number of batches (``len(self)``), the
    few left over are dropped. Workers of a ``DataLoader(self, batch_size=None, num_workers=W)``
    split a process's batches round-robin, which keeps the same order as ``W = 0``. Give
    ``accelerator=`` (or its ``process_index``/``num_processes``) and do **not** pass the loader
    through ``accelerator.prepare`` (that would shard a second time).

    ``prefetch=n`` prepares up to ``n`` batches ahead in a background thread, so reading overlaps
    the consumer's work (useful when training runs on a GPU); errors are raised in the consumer.

    Call ``set_epoch(e)`` before each epoch for a new order (same seed and epoch -> same order
    on every process and run). ``verify=True`` checks every shard's sha256 once per process
    before its rows are used (in a background thread, one group ahead); ``False`` checks only
    file sizes. A bad shard raises :class:`CorruptShardError` naming the file.

    Attributes:
        metadata: the hook point's ``metadata.json`` (first hook point if several).
        num_tokens: rows in the cache; d_in: feature size; hook_points: names read.
        input_scale: ``sqrt(d / E||x||^2)`` from the caching run's statistics.
    """

    def __init__(self, path, hook_point=None, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer_shards: int = 8, process_index: int = 0, num_processes: int = 1,
                 dtype: torch.dtype | None = torch.float32, return_tokens: bool = False, verify: bool = True,
                 drop_last: bool = False, accelerator=None, prefetch: int = 0):
        super().__init__()
        if accelerator is not None:
            process_index, num_processes = accelerator.process_index, accelerator.num_processes
        if not (isinstance(num_processes, int) and num_processes >= 1 and 0 <= process_index < num_processes):
            raise ValueError(f"Need 0 <= process_index < num_processes, got {process_index}/{num_processes}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if shuffle_buffer_shards < 1:
            raise ValueError(f"shuffle_buffer_shards must be >= 1, got {shuffle_buffer_shards}.")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
        self.prefetch = int(prefetch)
        self.path = Path(path)
        self.dirs, self.hook_points = _find_meta(self.path, hook_point)
        self._multi = not isinstance(hook_point, str) and hook_point is not None
        self.metas = [_load_hook_meta(d) for d in self.dirs]
        self.metadata = self.metas[0]
        rows = [s["num_rows"] for s in self.metadata["shards"]]
        for h, m in zip(self.hook_points, self.metas):
            if [s["num_rows"] for s in m["shards"]] != rows:
                raise ValueError(f"Hook point {h!r} in {self.path} has different shards than {self.hook_points[0]!r}.")
        self.shard_rows = rows
        self.num_tokens = int(sum(rows))
        self.d_in = int(self.metadata["d"])
        self.dims = [int(m["d"]) for m in self.metas]
        self.input_scale = self.metadata.get("input_scale")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.shuffle_buffer_shards = shuffle_buffer_shards
        self.process_index, self.num_processes = process_index, num_processes
        self.dtype, self.return_tokens, self.verify, self.drop_last = dtype, return_tokens, verify, drop_last
        self.epoch, self.skip_batches = 0, 0
        self._maps: dict = {}
        self._verified: dict = {}
        self._pool = None
        self._lock = threading.Lock()

    # -- bookkeeping
    def __getstate__(self):  # DataLoader workers: reopen maps and threads lazily
        st = self.__dict__.copy()
        st["_maps"], st["_verified"], st["_pool"], st["_lock"] = {}, {}, None, None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._lock = threading.Lock()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Use the order of epoch ``epoch`` next; skip this process's first ``skip_batches`` batches (resume)."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def _total_batches(self) -> int:
        n, B = self.num_tokens, self.batch_size
        return n // B if self.drop_last else -(-n // B)

    def __len__(self) -> int:
        """Batches this process yields per epoch."""
        T = self._total_batches()
        return T if self.num_processes == 1 else T // self.num_processes

    # -- shard access
    def _shard_path(self, k: int, i: int) -> Path:
        return self.dirs[k] / self.metas[k]["shards"][i]["file"]

    def _verify_one(self, k: int, i: int) -> None:
        info = self.metas[k]["shards"][i]
        _check_shard_file(self._shard_path(k, i), info["bytes"], info["sha256"] if self.verify else None)

    def _prefetch_verify(self, shard_ids) -> None:
        if not self.verify:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1)
        for i in shard_ids:
            for k in range(len(self.dirs)):
                if (k, i) not in self._verified:
                    self._verified[(k, i)] = self._pool.submit(self._verify_one, k, i)

    def _open(self, k: int, i: int):
        """(activations [rows, d], input_ids, positions, windows [rows] int32), memory-mapped, read-only."""
        key = (k, i)
        hit = self._maps.get(key)
        if hit is not None:
            return hit
        import pyarrow as pa

        path = self._shard_path(k, i)
        info = self.metas[k]["shards"][i]
        fut = self._verified.get(key)
        if fut is not None:
            fut.result()
        elif self.verify:
            self._verified[key] = None
            self._verify_one(k, i)
        else:
            _check_shard_file(path, info["bytes"], None)
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
            _check_shard_schema(path, table, self.metas[k], info)
            col = table.column("activation")
            if col.num_chunks != 1:
                col = pa.chunked_array([col.combine_chunks()])
            child = col.chunk(0).flatten()
            dtype_name = self.metas[k]["dtype"]
            np_dtype = np.dtype(_NP[dtype_name])
            if len(child) != info["num_rows"] * self.dims[k]:
                raise ValueError(f"{len(child)} values, expected {info['num_rows']} x {self.dims[k]}")
            buf = child.buffers()[1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only memory map: we only ever read from it
                arr = np.frombuffer(buf, dtype=np_dtype, count=len(child), offset=child.offset * np_dtype.itemsize)
                x = torch.from_numpy(arr).view(-1, self.dims[k])
                if dtype_name == "bfloat16":
                    x = x.view(torch.bfloat16)
                toks = []
                for name in ("input_ids", "position", "window"):
                    c = table.column(name).combine_chunks()
                    toks.append(torch.from_numpy(np.frombuffer(c.buffers()[1], dtype=np.int32, count=len(c),
                                                               offset=c.offset * 4)))
        except (CorruptShardError, CorruptMetadataError):
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError / KeyError on damaged files
            raise CorruptShardError(f"Cached shard {path} cannot be read ({type(e).__name__}: {e}); "
                                    f"{_fix_hint(path)}.") from e
        out = (x, toks[0], toks[1], toks[2])
        self._maps[key] = out
        return out

    # -- iteration
    def _groups(self, gen):
        n = len(self.shard_rows)
        order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        S = self.shuffle_buffer_shards
        return [order[j:j + S] for j in range(0, n, S)]

    def _gather(self, pieces, n_rows):
        B = n_rows
        outs = []
        for k in range(len(self.dirs)):
            dt = self.dtype or _DTYPES[self.metas[k]["dtype"]]
            outs.append(torch.empty(B, self.dims[k], dtype=dt))
        toks = [torch.empty(B, dtype=torch.long) for _ in range(3)] if self.return_tokens else None
        at = 0
        for group, offsets, idx in pieces:
            if self.shuffle:
                idx = idx.sort().values  # disk order inside a batch: far fewer page/cache misses
            cuts = torch.searchsorted(idx, offsets[1:-1]).tolist() if len(group) > 1 else []
            bounds = [0] + cuts + [idx.numel()]
            for j, shard in enumerate(group):
                a, b = bounds[j], bounds[j + 1]
                if a == b:
                    continue
                local = idx[a:b] - offsets[j]
                contiguous = not self.shuffle and bool(local[-1] - local[0] == b - a - 1)
                for k in range(len(self.dirs)):
                    x, *t_toks = self._open(k, shard)
                    dst = outs[k][at:at + b - a]
                    if contiguous:
                        dst.copy_(x[int(local[0]):int(local[0]) + b - a])
                    elif x.dtype == dst.dtype:
                        torch.index_select(x, 0, local, out=dst)
                    else:
                        dst.copy_(x.index_select(0, local))
                    if k == 0 and toks is not None:
                        for dst_t, src_t in zip(toks, t_toks):
                            dst_t[at:at + b - a] = src_t.index_select(0, local)
                at += b - a
        if not self._multi and not self.return_tokens:
            return outs[0]
        item = {h: o for h, o in zip(self.hook_points, outs)}
        if self.return_tokens:
            item["input_ids"], item["positions"], item["windows"] = toks
        return item

    def __iter__(self):
        if self.prefetch == 0:
            yield from self._batches()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for item in self._batches():
                    if not put(item):
                        return
                put(done)
            except BaseException as e:  # handed to the consumer, raised there
                put(_Failure(e))

        t = threading.Thread(target=work, name="CachedActivations-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            t.join()

    def _batches(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        P, rank, B = self.num_processes, self.process_index, self.batch_size
        per_proc = len(self)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
        groups = self._groups(gen)
        t = 0  # global batch counter
        pieces, have = [], 0

        def mine(t):
            u, r = divmod(t, P)
            return r == rank and u < per_proc and u >= self.skip_batches and u % W == w

        for gi, group in enumerate(groups):
            sizes = torch.tensor([self.shard_rows[s] for s in group], dtype=torch.long)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
            total = int(offsets[-1])
            perm = torch.randperm(total, generator=gen) if self.shuffle else torch.arange(total)
            if gi + 1 < len(groups):
                self._prefetch_verify(groups[gi + 1])
            start = 0
            while start < total:
                take = min(B - have, total - start)
                pieces.append((group, offsets, perm[start:start + take]))
                have += take
                start += take
                if have == B:
                    if t // P >= per_proc:
                        return
                    if mine(t):
                        if self.verify:
                            self._prefetch_verify(group)
                        yield self._gather(pieces, B)
                    t += 1
                    pieces, have = [], 0
        if have and not self.drop_last and t // P < per_proc and mine(t):
            yield self._gather(pieces, have)

    # -- whole-array access (evaluation, dashboards)
    def to_tensor(self, hook_point: str | None = None, max_rows: int | None = None) -> torch.Tensor:
        """All rows (or the first ``max_rows``) in disk order as one tensor ``[rows, d]`` (a copy, ``dtype``)."""
        k = 0 if hook_point is None else self.hook_points.index(hook_point)
        parts, n = [], 0
        for i, r in enumerate(self.shard_rows):
            if max_rows is not None and n >= max_rows:
                break
            x = self._open(k, i)[0]
            take = r if max_rows is None else min(r, max_rows - n)
            parts.append(x[:take].to(self.dtype or x.dtype))
            n += take
        return torch.cat(parts) if parts else torch.empty(0, self.dims[k], dtype=self.dtype or torch.float32)

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, positions, windows), LongTensors ``[rows]`` in disk order, aligned with :meth:`to_tensor`.

        ``windows`` indexes :func:`load_windows` (the full token window each row came from).
        """
        n = len(self.shard_rows)
        return tuple(torch.cat([self._open(0, i)[j].long() for i in range(n)]) for j in (1, 2, 3))


def load_windows(path) -> torch.Tensor:
    """The token windows a cache was computed from, LongTensor ``[num_windows, window]`` (row ``i`` is window ``i``).

    A row's ``window`` column in a hook-point shard indexes this tensor, so dashboards can show
    the context around any cached token.
    """
    import pyarrow as pa

    path = Path(path)
    prog = path / "progress.json"
    if not prog.is_file():
        raise FileNotFoundError(f"{path} has no progress.json; it is not an hf_sae activation cache.")
    state = json.loads(prog.read_text())
    out = []
    for rec in state["shards"]:
        if "windows" not in rec["files"]:
            raise ValueError(f"The cache at {path} was written without token windows (write_activations).")
        info = rec["files"]["windows"]
        f = path / info["file"]
        _check_shard_file(f, info["bytes"], None)
        try:
            col = pa.ipc.open_stream(pa.memory_map(str(f), "r")).read_all().column("input_ids").combine_chunks()
            w = col.type.list_size
            vals = col.flatten().to_numpy().astype(np.int64)
        except Exception as e:
            raise CorruptShardError(f"Cached shard {f} cannot be read ({e}); {_fix_hint(f)}.") from e
        out.append(torch.from_numpy(vals).view(-1, w))
    return torch.cat(out) if out else torch.empty(0, state["fingerprint"]["window"], dtype=torch.long)


# --------------------------------------------------------------------------- CLI: `hf-sae cache`


def add_cache_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hf-sae cache`` options to ``parser`` (use with :func:`run_cache`)."""
    parser.add_argument("--model", "--model_name_or_path", dest="model", default="smollm2-135m",
                        help="Hub id or local folder of a causal LM; 'smollm2-135m' = embedded offline SmolLM2 (default)")
    parser.add_argument("--hook-points", "--hook_points", "--hook-point", "--hook_point", dest="hook_points", nargs="+", required=True,
                        help="one or more hook points, e.g. layers.6.resid_post layers.6.mlp_out (comma-separated works too)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dataset", default="default",
                        help="'default' (shipped KJV sample), a .txt/.jsonl/.parquet file or folder, or a `datasets` name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-column", "--text_column", default="text")
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=None, help="tokens to cache (default: the whole source)")
    parser.add_argument("--dtype", default="float16", choices=sorted(_DTYPES), help="storage dtype")
    parser.add_argument("--window", type=int, default=256, help="tokens per LM window")
    parser.add_argument("--batch-windows", "--batch_windows", type=int, default=8, help="windows per LM forward")
    parser.add_argument("--shard-tokens", "--shard_tokens", type=int, default=1 << 16, help="rows per shard (approximately)")
    parser.add_argument("--keep-first", "--keep_first", action="store_true", help="keep position 0 (excluded by default)")
    parser.add_argument("--keep-special", "--keep_special", action="store_true", help="keep BOS/EOS/pad tokens (excluded by default)")
    parser.add_argument("--no-bos", "--no_bos", action="store_true", help="do not start windows with BOS")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted run in --out (default)")
    g.add_argument("--no-resume", "--no_resume", dest="resume", action="store_false", help="fail if --out already holds a cache")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--model-dtype", "--model_dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the LM")
    return parser


def run_cache(args: argparse.Namespace) -> dict:
    """Execute ``hf-sae cache`` from parsed arguments; prints a summary and returns the metadata."""
    from .models import load_model

    hooks = [h for item in args.hook_points for h in item.split(",") if h]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, dtype=_DTYPES[args.model_dtype], device=device)
    meta = cache_activations(model, tok, args.dataset, hooks, args.out, args.max_tokens, dtype=args.dtype,
                             batch_windows=args.batch_windows, shard_tokens=args.shard_tokens, resume=args.resume,
                             window=args.window, add_bos=not args.no_bos, exclude_first=not args.keep_first,
                             exclude_special=not args.keep_special, split=args.split, text_column=args.text_column,
                             overwrite=args.overwrite)
    print(f"cached {meta['num_tokens']} tokens x {len(hooks)} hook point(s) of {meta['model']} in {args.out}")
    for h, m in meta["per_hook_point"].items():
        print(f"  {h}: d={m['d']} E||x||^2={m['mean_sq_norm']:.4g} input_scale={m['input_scale']:.4g}")
    return meta


def cache_main(argv=None) -> dict:
    """Entry point: ``python -m hf_sae.data.cache --hook-points ... --out ...`` (same as ``hf-sae cache``)."""
    parser = argparse.ArgumentParser(prog="hf-sae cache", description="Cache LM activations as Arrow shards.")
    add_cache_args(parser)
    return run_cache(parser.parse_args(argv))


if __name__ == "__main__":
    cache_main()
