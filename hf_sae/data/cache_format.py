"""The activation cache's on-disk format: dtypes, Arrow features, metadata.json checks, shard checks.

See :mod:`hf_sae.data.cache` for the layout.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from .._io import atomic_write_bytes, atomic_write_json, sha256_file
from ..configuration_sae import input_scale_for

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

    def bad(field, why) -> NoReturn:
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


norm_stats_to_input_scale = input_scale_for  # the one definition lives beside the SAE's config


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for k, v in _DTYPES.items():
            if v == dtype:
                return k
    name = str(dtype).replace("torch.", "").lower()
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
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
    return datasets.Features(
        {
            "activation": act,
            "input_ids": datasets.Value("int32"),
            "position": datasets.Value("int32"),
            "window": datasets.Value("int32"),
        }
    )


_atomic_write_bytes = atomic_write_bytes
_atomic_write_json = atomic_write_json


def _fixed_list(flat: np.ndarray, width: int):
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def _serialize(table_arrays: dict, schema) -> tuple[Any, str]:
    import pyarrow as pa

    batch = pa.RecordBatch.from_arrays(list(table_arrays.values()), schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(batch)
    buf = sink.getvalue()
    return buf, hashlib.sha256(memoryview(buf)).hexdigest()


_sha256_file = sha256_file


def _fix_hint(path: Path) -> str:
    return (
        f"delete it (or its cache folder) and re-run the same `hf-sae cache ... --resume` command "
        f"(resume re-checks every shard and regenerates {path.name} and the shards after it)"
    )


def _check_shard_file(path: Path, expected_bytes: int | None, expected_sha: str | None) -> None:
    if not path.is_file():
        raise CorruptShardError(f"Cached shard {path} is missing; {_fix_hint(path)}.")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        kind = "truncated" if size < expected_bytes else "longer than recorded"
        raise CorruptShardError(
            f"Cached shard {path} is {kind} ({size} bytes, expected {expected_bytes}); {_fix_hint(path)}."
        )
    if expected_sha is not None:
        got = _sha256_file(path)
        if got != expected_sha:
            raise CorruptShardError(
                f"Cached shard {path} is corrupt (sha256 {got[:12]}... != recorded "
                f"{expected_sha[:12]}...); {_fix_hint(path)}."
            )
