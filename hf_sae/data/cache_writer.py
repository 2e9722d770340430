"""Writing an activation cache: :func:`cache_activations` (from an LM) and :func:`write_activations`.

See :mod:`hf_sae.data.cache` for the layout and the resume guarantees.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._faults import fault_point
from .cache_format import (
    _DTYPES,
    FORMAT_VERSION,
    CorruptShardError,
    _atomic_write_bytes,
    _atomic_write_json,
    _check_shard_file,
    _dtype_name,
    _features,
    _fixed_list,
    _hook_dir_name,
    _read_json,
    _serialize,
    _with_checksum,
    norm_stats_to_input_scale,
)
from .stream import _as_hook_list, harvest, window_source


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
        self.future: Optional[Future] = None
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
                          f"regenerating from shard {rec['index']} on.", stacklevel=2)
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

    from hf_sae.hooks import hook_point_dim

    hook_points = _as_hook_list(hook_points)
    for h in hook_points:
        _hook_dir_name(h)
    dtype_name = _dtype_name(dtype)
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
    state = _open_run(out, fp, hook_points, resume, overwrite)
    meta_common = {"format_version": FORMAT_VERSION, "model": model_name, "window": window, "add_bos": add_bos,
                   "exclude_first": exclude_first, "exclude_special": exclude_special, "source": source_id,
                   "max_tokens": max_tokens}
    target = max_tokens if max_tokens is not None else math.inf
    writer = _ShardWriter(out, hook_points, dims, dtype_name, window, state)
    try:
        if state["num_tokens"] < target:
            _shard_loop(model, tokenizer, texts_or_windows, hook_points, dims, dtype_name, state, writer, target,
                        batch_windows, shard_tokens, window, add_bos, exclude_first, exclude_special, split,
                        text_column, progress, max_tokens)
        writer.close()
    except BaseException:
        try:
            writer.close()
        except Exception:
            pass
        raise
    if max_tokens is not None and state["num_tokens"] < max_tokens:
        warnings.warn(f"The source ran out after {state['num_tokens']} tokens (max_tokens={max_tokens}).",
                      stacklevel=2)
    state["complete"] = True
    _atomic_write_json(out / "progress.json", state)
    return _finalize(out, state, hook_points, dims, dtype_name, meta_common)


def _check_finite_when_stored(hook_point: str, t: Tensor, dtype_name: str) -> None:
    """ValueError naming the first row of ``t`` [N, d] that is not finite once cast to ``dtype_name``."""
    stored = t.detach().to("cpu", _DTYPES[dtype_name])
    finite = torch.isfinite(stored).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten()
        raise ValueError(
            f"activations for {hook_point!r} have NaN/Inf values in {len(rows)} row(s), first at row "
            f"{int(rows[0])} (after casting to {dtype_name}); remove or recompute them"
            + (
                " (float16 overflows past 65504: use bfloat16 or float32)"
                if dtype_name == "float16" and bool(torch.isfinite(t[rows[0]]).all())
                else ""
            )
        )


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
        shapes = [tuple(t.shape) for t in acts.values()]
        raise ValueError(f"All activations must be [N, d] with the same N, got {shapes}.")
    N = n.pop()
    dtype_name = _dtype_name(dtype)
    for h, t in acts.items():  # before anything is written: a NaN/Inf row would poison every statistic
        _check_finite_when_stored(h, t, dtype_name)
    dims = {h: int(t.shape[1]) for h, t in acts.items()}
    ids = torch.zeros(N, dtype=torch.long) if input_ids is None else input_ids.long()
    pos = torch.zeros(N, dtype=torch.long) if positions is None else positions.long()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder.")
    for h in hook_points:
        (out / h).mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": {"format_version": FORMAT_VERSION, "model": model_name, "hook_points": hook_points,
                        "dtype": dtype_name, "source": "tensors"},
        "windows_done": 0,
        "num_tokens": 0,
        "shards": [],
        "complete": False,
    }
    writer = _ShardWriter(out, hook_points, dims, dtype_name, 0, state)
    try:
        for i, a in enumerate(tqdm(range(0, N, shard_tokens), disable=not progress, desc="writing shards")):
            b = min(a + shard_tokens, N)
            stats, xs = {}, {}
            for h in hook_points:
                x = acts[h][a:b].detach().to("cpu", _DTYPES[dtype_name]).contiguous()
                xf = x.double()
                stats[h] = {"sum": xf.sum(0).tolist(), "sum_sq_norm": float((xf * xf).sum())}
                xs[h] = x
            writer.submit(
                {
                    "index": i,
                    "win_start": 0,
                    "win_end": 0,
                    "acts": xs,
                    "stats": stats,
                    "input_ids": ids[a:b],
                    "positions": pos[a:b],
                    "windows": torch.zeros(b - a, dtype=torch.long),
                    "window_tokens": None,
                }
            )
        writer.close()
    except BaseException:
        writer.close()
        raise
    state["complete"] = True
    _atomic_write_json(out / "progress.json", state)
    meta_common = {"format_version": FORMAT_VERSION, "model": model_name, "window": None, "source": "tensors"}
    return _finalize(out, state, hook_points, dims, dtype_name, meta_common)


@dataclass
class _ShardBuffer:
    """The rows of the shard being filled: activations per hook point with their running statistics, and the
    tokens they came from. ``payload`` is what :class:`_ShardWriter` writes."""

    hook_points: list
    dims: dict
    store_dtype: torch.dtype
    dtype_name: str
    rows: int = 0
    acts: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    sq: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=lambda: {"input_ids": [], "positions": [], "windows": [], "window_tokens": []})

    def __post_init__(self):
        self.acts = {h: [] for h in self.hook_points}
        self.sums = {h: torch.zeros(self.dims[h], dtype=torch.float64) for h in self.hook_points}
        self.sq = {h: 0.0 for h in self.hook_points}

    def add(self, hb, n: int) -> None:
        """Append the first ``n`` kept tokens of a harvest batch (refusing non-finite activations)."""
        for h in self.hook_points:
            x = hb.acts[h][:n].to("cpu", self.store_dtype)
            xf = x.float()
            sq = float((xf * xf).sum(dtype=torch.float64))
            if not math.isfinite(sq):
                why = (
                    "use dtype float32 or bfloat16 (float16 overflows past 65504)"
                    if self.dtype_name == "float16"
                    else "the model produced NaN/inf"
                )
                raise ValueError(f"Non-finite activations at {h!r} (after casting to {self.dtype_name}): {why}.")
            self.acts[h].append(x)
            self.sums[h] += xf.sum(0, dtype=torch.float64)
            self.sq[h] += sq
        for name, t in (
            ("input_ids", hb.input_ids[:n]),
            ("positions", hb.positions[:n]),
            ("windows", hb.windows[:n]),
            ("window_tokens", hb.window_tokens),
        ):
            self.tokens[name].append(t)
        self.rows += n

    def payload(self, index: int, win_start: int, win_end: int) -> dict:
        return {
            "index": index,
            "win_start": win_start,
            "win_end": win_end,
            "acts": {h: torch.cat(self.acts[h]) for h in self.hook_points},
            "stats": {h: {"sum": self.sums[h].tolist(), "sum_sq_norm": self.sq[h]} for h in self.hook_points},
            **{name: torch.cat(parts) for name, parts in self.tokens.items()},
        }


def _open_run(out: Path, fp: dict, hook_points, resume: bool, overwrite: bool) -> dict:
    """The progress record to continue from (checked against the fingerprint ``fp``), or a new one; prepares the
    folders and drops files that no record names."""
    prog_path = out / "progress.json"
    state = None
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not prog_path.is_file():
            raise ValueError(
                f"{out} exists, is not empty and is not an hf_sae cache; choose another folder "
                f"or pass overwrite=True (--overwrite) to delete it."
            )
        elif not resume:
            raise ValueError(
                f"{out} already holds a cache; pass resume=True (--resume) to continue it "
                f"or overwrite=True (--overwrite) to start again."
            )
        else:
            state = _read_json(prog_path)
            if state.get("fingerprint") != fp:
                old = state.get("fingerprint", {})
                diff = {k: (old.get(k), fp[k]) for k in fp if old.get(k) != fp[k]}
                raise ValueError(
                    f"Cannot resume {out}: it was written with different settings {diff} "
                    f"(old, new); use another folder or overwrite=True."
                )
            _verify_progress(out, state, hook_points)
    if state is None:
        state = {"fingerprint": fp, "windows_done": 0, "num_tokens": 0, "shards": [], "complete": False}
    for h in hook_points:
        (out / _hook_dir_name(h)).mkdir(parents=True, exist_ok=True)
    (out / "windows").mkdir(parents=True, exist_ok=True)
    _clean_unrecorded(out, state, hook_points)
    state["complete"] = False
    _atomic_write_json(prog_path, state)
    return state


def _shard_loop(
    model,
    tokenizer,
    texts_or_windows,
    hook_points,
    dims,
    dtype_name,
    state,
    writer,
    target,
    batch_windows,
    shard_tokens,
    window,
    add_bos,
    exclude_first,
    exclude_special,
    split,
    text_column,
    progress,
    total,
) -> None:
    """Harvest the windows after ``state["windows_done"]`` and submit shards of >= ``shard_tokens`` whole windows
    to ``writer`` until ``target`` tokens are cached in all or the source ends."""
    from tqdm.auto import tqdm

    done_tokens = state["num_tokens"]
    windows, _ = window_source(texts_or_windows, tokenizer, window, add_bos, split, text_column)
    start = state["windows_done"]
    for _ in range(start):  # skip windows already cached (cheap: tokenization only)
        if next(windows, None) is None:
            break
    bar = tqdm(total=total, initial=done_tokens, unit="tok", desc="caching activations", disable=not progress)
    new_buf = lambda: _ShardBuffer(hook_points, dims, _DTYPES[dtype_name], dtype_name)  # noqa: E731
    buf, win_start, win_cur = new_buf(), start, start
    shard_index = len(state["shards"])
    for hb in harvest(
        model, tokenizer, windows, hook_points, batch_windows, exclude_first, exclude_special, window_offset=start
    ):
        n = min(hb.input_ids.shape[0], int(min(target - done_tokens - buf.rows, 2**62)))
        buf.add(hb, n)
        win_cur += hb.n_windows
        bar.update(n)
        finished = done_tokens + buf.rows >= target
        if buf.rows >= shard_tokens or finished:
            writer.submit(buf.payload(shard_index, win_start, win_cur))
            shard_index += 1
            done_tokens += buf.rows
            buf, win_start = new_buf(), win_cur
        if finished:
            break
    if buf.rows:
        writer.submit(buf.payload(shard_index, win_start, win_cur))
    bar.close()
