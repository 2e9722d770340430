"""Reading an activation cache: :class:`CachedActivations` (shuffled torch batches from memory-mapped
Arrow shards) and :func:`load_windows`.
"""
from __future__ import annotations

import json
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cache_format import (
    _DTYPES,
    _NP,
    CorruptMetadataError,
    CorruptShardError,
    _check_shard_file,
    _check_shard_schema,
    _fix_hint,
    _hook_dir_name,
    _load_hook_meta,
    _read_json,
)


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
    [batch]}`` (tokens only with ``return_tokens``; ``windows`` indexes :func:`load_windows`). Several hook
    points of one cache share rows, so a list of hook points
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

    def __init__(
        self,
        path,
        hook_point=None,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer_shards: int = 8,
        process_index: int = 0,
        num_processes: int = 1,
        dtype: torch.dtype | None = torch.float32,
        return_tokens: bool = False,
        verify: bool = True,
        drop_last: bool = False,
        accelerator=None,
        prefetch: int = 0,
    ):
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
        self._pool: Optional[ThreadPoolExecutor] = None
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
    def _shard_file(self, k: int, i: int) -> Path:
        """Where shard ``i`` of hook point ``k`` lies in the cache folder (named in error messages)."""
        return self.dirs[k] / self.metas[k]["shards"][i]["file"]

    def _shard_path(self, k: int, i: int) -> Path:
        """The readable local file of the shard (a remote reader fetches it first)."""
        return self._shard_file(k, i)

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
        path = self._shard_file(k, i)
        try:
            out = self._columns(k, i, self._read_table(k, i))
        except (CorruptShardError, CorruptMetadataError):
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError / KeyError on damaged files
            raise CorruptShardError(
                f"Cached shard {path} cannot be read ({type(e).__name__}: {e}); {_fix_hint(path)}."
            ) from e
        self._maps[key] = out
        return out

    def _read_table(self, k: int, i: int):
        """Shard ``i`` of hook point ``k`` as a pyarrow Table, memory-mapped (checksum checked first when
        ``verify``, else the file size)."""
        import pyarrow as pa

        key, path = (k, i), self._shard_path(k, i)
        fut = self._verified.get(key)
        if fut is not None:
            fut.result()
        elif self.verify:
            self._verified[key] = None
            self._verify_one(k, i)
        else:
            _check_shard_file(path, self.metas[k]["shards"][i]["bytes"], None)
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()

    def _columns(self, k: int, i: int, table):
        """(activations [rows, d], input_ids, positions, windows [rows] int32) viewing ``table``'s buffers
        (no copy), after checking its schema and row count against the metadata."""
        import pyarrow as pa

        path, info = self._shard_file(k, i), self.metas[k]["shards"][i]
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
                toks.append(
                    torch.from_numpy(np.frombuffer(c.buffers()[1], dtype=np.int32, count=len(c), offset=c.offset * 4))
                )
        return (x, toks[0], toks[1], toks[2])

    # -- iteration
    def _groups(self, gen):
        n = len(self.shard_rows)
        order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        S = self.shuffle_buffer_shards
        return [order[j : j + S] for j in range(0, n, S)]

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
                    dst = outs[k][at : at + b - a]
                    if contiguous:
                        dst.copy_(x[int(local[0]) : int(local[0]) + b - a])
                    elif x.dtype == dst.dtype:
                        torch.index_select(x, 0, local, out=dst)
                    else:
                        dst.copy_(x.index_select(0, local))
                    if k == 0 and toks is not None:
                        for dst_t, src_t in zip(toks, t_toks):
                            dst_t[at : at + b - a] = src_t.index_select(0, local)
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
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
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
                pieces.append((group, offsets, perm[start : start + take]))
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
        ids, pos, win = (torch.cat([self._open(0, i)[j].long() for i in range(n)]) for j in (1, 2, 3))
        return ids, pos, win


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
