"""Where training batches come from: tensors in memory, any iterable, an activation cache, a live LM.

Every source yields this process's *micro-batches*: dicts ``{hook_point: FloatTensor [micro, d]}``
(rows aligned across hook points: row i of each is the same token). Sources are deterministic
functions of (seed, process index, number of processes, position), and ``iterate(start)`` resumes
after ``start`` micro-batches, which is what makes a resumed run identical to an uninterrupted one.

Sharding: with P processes, each global micro-batch step of ``micro * P`` tokens is split into P
disjoint parts (tensor sources), or chunks / windows / cache batches are dealt round-robin to the
processes (iterable, cache and live sources), so processes never read the same token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class DataExhausted(RuntimeError):
    """A one-shot data iterable ran out before ``train_tokens`` were trained."""


def _as_hook_dict(item, hook_points: list[str]) -> dict[str, Tensor]:
    """Normalize a yielded item (a [b, d] tensor or a dict) to {hook_point: [b, d]}."""
    if isinstance(item, Tensor):
        if len(hook_points) != 1:
            raise ValueError(f"the data yields plain tensors but {len(hook_points)} hook points are trained; "
                             "yield dicts {hook_point: [batch, d]} instead")
        item = {hook_points[0]: item}
    if not isinstance(item, dict):
        raise ValueError(f"training data must yield [batch, d] tensors or dicts of them, got {type(item).__name__}")
    missing = [h for h in hook_points if h not in item]
    if missing:
        raise ValueError(f"the training data has no activations for hook point(s) {missing}; "
                         f"it provides {[k for k, v in item.items() if isinstance(v, Tensor) and v.ndim == 2]}")
    out = {}
    for h in hook_points:
        x = item[h]
        if x.ndim != 2:
            raise ValueError(f"activations for {h!r} have shape {tuple(x.shape)}; expected [batch, d]")
        out[h] = x
    n = {x.shape[0] for x in out.values()}
    if len(n) != 1:
        raise ValueError(f"hook points yield different batch sizes {sorted(n)}; rows must be aligned tokens")
    return out


class TensorSource:
    """Micro-batches from in-memory tensors ``{hook_point: [N, d]}`` (rows aligned).

    Epoch ``e`` uses the permutation ``randperm(N, seed + e)``; global micro-step ``j`` takes rows
    ``perm[j*G : (j+1)*G]`` (``G = micro * num_processes``) and process ``r`` keeps the ``r``-th
    slice of ``micro`` rows. A final partial global step of an epoch is dropped. So 1 and P
    processes see exactly the same tokens per optimizer step.
    """

    def __init__(self, data: dict[str, Tensor], micro: int, process_index: int = 0, num_processes: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.data = data
        self.n = next(iter(data.values())).shape[0]
        for h, t in data.items():
            if t.ndim != 2 or t.shape[0] != self.n:
                raise ValueError(f"tensor data for {h!r} has shape {tuple(t.shape)}; all hook points need "
                                 f"[N={self.n}, d] with aligned rows")
        self.micro, self.rank, self.world = micro, process_index, num_processes
        self.seed, self.shuffle = seed, shuffle
        self.global_micro = micro * num_processes
        self.steps_per_epoch = self.n // self.global_micro
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data has only {self.n} tokens but one micro-batch step over all "
                             f"processes needs {self.global_micro}; lower --batch_size or give more data")

    def _perm(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def iterate(self, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Micro-batches of this process, after skipping its first ``start`` ones."""
        j = start
        cached_epoch, perm = -1, None
        while True:
            epoch, b = divmod(j, self.steps_per_epoch)
            if epoch != cached_epoch:
                perm, cached_epoch = self._perm(epoch), epoch
            lo = b * self.global_micro + self.rank * self.micro
            rows = perm[lo:lo + self.micro]
            yield {h: t[rows] for h, t in self.data.items()}
            j += 1


class IterableSource:
    """Micro-batches re-cut from any iterable of ``[b, d]`` tensors or ``{hook_point: [b, d]}`` dicts.

    Args:
        iterable: the data. If it can be iterated again (``iter(x) is not x``) each exhaustion starts
            a new epoch (``set_epoch(e)`` is called when it has one); a one-shot iterator raises
            :class:`DataExhausted` when it runs out.
        presharded: the iterable already yields only this process's data (a cache or a live stream
            built with ``process_index``); otherwise chunk ``c`` goes to process ``c % num_processes``.
    """

    def __init__(self, iterable: Iterable, hook_points: list[str], micro: int, process_index: int = 0,
                 num_processes: int = 1, presharded: bool = False):
        self.iterable, self.hook_points, self.micro = iterable, hook_points, micro
        self.rank, self.world, self.presharded = process_index, num_processes, presharded
        self.reiterable = iter(iterable) is not iterable if not isinstance(iterable, Tensor) else True

    def _epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        if epoch > 0 and not self.reiterable:
            raise DataExhausted("the training data iterator is exhausted; pass a re-iterable dataset or "
                                "lower --train_tokens")
        if hasattr(self.iterable, "set_epoch"):
            self.iterable.set_epoch(epoch)
        buf: list[dict[str, Tensor]] = []
        have = 0
        chunk = 0
        for item in self.iterable:
            item = _as_hook_dict(item, self.hook_points)
            buf.append(item)
            have += next(iter(item.values())).shape[0]
            while have >= self.micro:
                cat = {h: torch.cat([b[h] for b in buf]) if len(buf) > 1 else buf[0][h] for h in self.hook_points}
                out = {h: v[:self.micro] for h, v in cat.items()}
                rest = {h: v[self.micro:] for h, v in cat.items()}
                have -= self.micro
                buf = [rest] if have else []
                if self.presharded or chunk % self.world == self.rank:
                    yield out
                chunk += 1
        # a partial micro-batch at the end of an epoch is dropped (deterministic across resumes)

    def iterate(self, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Micro-batches of this process, after skipping (reading and dropping) its first ``start`` ones."""
        epoch, seen = 0, 0
        while True:
            produced = False
            for mb in self._epoch(epoch):
                produced = True
                if seen >= start:
                    yield mb
                seen += 1
            if not produced:
                raise DataExhausted("the training data yields fewer tokens than one micro-batch "
                                    f"({self.micro}); lower --batch_size or give more data")
            epoch += 1


class CacheSource:
    """Micro-batches from an on-disk activation cache (:class:`hf_sae.data.CachedActivations`).

    The cache deals whole batches of ``micro`` rows round-robin to processes and skips batches on
    resume without reading them (``set_epoch(epoch, skip_batches)``). ``streaming``: the shards are read
    through ``datasets`` streaming (:mod:`hf_sae.data.hub_cache`), same batches.
    """

    def __init__(self, path: str, hook_points: list[str], micro: int, process_index: int = 0,
                 num_processes: int = 1, seed: int = 0, streaming: bool = False):
        from ..data.hub_cache import open_cache

        self.ds = open_cache(path, streaming=streaming, hook_point=list(hook_points), batch_size=micro, shuffle=True,
                             seed=seed,
                                    process_index=process_index, num_processes=num_processes,
                                    dtype=torch.float32, drop_last=True)
        self.hook_points = hook_points
        self.per_epoch = len(self.ds)
        if self.per_epoch == 0:
            raise ValueError(f"the cache at {path} holds {self.ds.num_tokens} tokens, fewer than one micro-batch "
                             f"step over all processes ({micro * num_processes}); lower --batch_size")

    @property
    def metadata(self) -> dict:
        return self.ds.metadata

    def iterate(self, start: int = 0) -> Iterator[dict[str, Tensor]]:
        epoch, skip = divmod(start, self.per_epoch)
        while True:
            self.ds.set_epoch(epoch, skip_batches=skip)
            for item in self.ds:
                batch = _as_hook_dict(item, self.hook_points)
                for h, x in batch.items():  # one pass over [B, d], small beside the SAE's [B, d] x [d, n]
                    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
                        raise ValueError(self._locate_nonfinite(h))
                yield batch
            epoch, skip = epoch + 1, 0

    def _locate_nonfinite(self, h: str) -> str:
        """Message naming the first shard file and row of hook point ``h`` that holds NaN/Inf (slow path)."""
        k = self.ds.hook_points.index(h)
        for i in range(len(self.ds.shard_rows)):
            x = self.ds._open(k, i)[0]
            finite = torch.isfinite(x.float()).all(dim=1)
            if not bool(finite.all()):
                rows = (~finite).nonzero().flatten()
                return (f"the activation cache has NaN/Inf values for {h!r}: shard {self.ds._shard_file(k, i)}, "
                        f"{len(rows)} row(s), first at row {int(rows[0])}; re-create the cache (or that shard) "
                        "from the model")
        return f"the activation cache gave a non-finite batch for {h!r}"


# ------------------------------------------------------------------------------------------ files


def load_activation_file(path: str, hook_points: list[str]) -> tuple[dict[str, Tensor], dict]:
    """Read ``{hook_point: [N, d]}`` (+ string metadata) from a ``.safetensors`` or ``.pt`` file.

    A file with a single tensor under a generic key (``activations``, ``acts``, ``x``, ...) or a bare
    tensor in ``.pt`` serves a single hook point; a key that names another hook point is an error (the
    file was made for that hook point). Missing hook points raise ``ValueError`` listing the file's keys,
    and NaN/Inf values an error naming the file, the hook point and the first bad row.
    """
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    elif path.endswith((".pt", ".pth")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        meta = {}
        tensors = {"activations": obj} if isinstance(obj, Tensor) else dict(obj)
        meta = {k: v for k, v in tensors.items() if isinstance(v, str)}
        tensors = {k: v for k, v in tensors.items() if isinstance(v, Tensor)}
    else:
        raise ValueError(f"activation file {path!r}: use .safetensors or .pt, or a cache folder")
    if len(tensors) == 1 and len(hook_points) == 1 and hook_points[0] not in tensors:
        key = next(iter(tensors))
        if key not in GENERIC_ACTIVATION_KEYS:
            raise ValueError(f"{path} holds activations keyed {key!r}, not {hook_points[0]!r}: pass --hook_points "
                             f"{key}, or store the tensor under the key {hook_points[0]!r} (or 'activations')")
        tensors = {hook_points[0]: tensors[key]}
    missing = [h for h in hook_points if h not in tensors]
    if missing:
        raise ValueError(f"hook point(s) {missing} are not in {path}; it holds {sorted(tensors)}. "
                         "Change --hook_points or the file.")
    out = {h: tensors[h].float() for h in hook_points}
    for h, x in out.items():
        if x.ndim != 2:
            raise ValueError(f"{path}: activations for {h!r} have shape {tuple(x.shape)}; expected [rows, d]")
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten()
            raise ValueError(f"{path}: activations for {h!r} have NaN/Inf values in {len(rows)} row(s), first at "
                             f"row {int(rows[0])}; remove or recompute those rows")
    return out, meta


GENERIC_ACTIVATION_KEYS = frozenset({"activations", "activation", "acts", "x", "data", "inputs"})
"""Keys of a single-tensor activation file that do not name a hook point."""


def is_cache_dir(path: str) -> bool:
    """True for a folder written by :func:`hf_sae.data.cache_activations`, or a cache pushed to a Hub
    dataset repo (``hf://datasets/org/name``, :mod:`hf_sae.data.hub_cache`)."""
    from ..data.hub_cache import cache_exists

    return cache_exists(path)


def take_tokens(it: Iterator[dict[str, Tensor]], n_tokens: int) -> dict[str, Tensor]:
    """Concatenate batches from ``it`` until ``n_tokens`` rows (fewer if it ends first)."""
    parts: list[dict[str, Tensor]] = []
    have = 0
    for item in it:
        parts.append(item)
        have += next(iter(item.values())).shape[0]
        if have >= n_tokens:
            break
    if not parts:
        raise ValueError("no activations could be read for the sample")
    return {h: torch.cat([p[h] for p in parts])[:n_tokens] for h in parts[0]}
