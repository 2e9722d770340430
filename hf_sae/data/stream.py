"""Live activations: run the LM over a corpus and stream masked, shuffled activation batches.

``harvest`` is the one loop both the live stream and the on-disk cache use: windows of token
ids go through the model once (``hf_sae.hooks.run_with_capture``, which stops the forward
after the deepest requested hook point), and the kept tokens (see ``token_mask``) of every
hook point come out as flat ``[n_tokens, d]`` tensors, with their token ids, positions and
window indices alongside.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from .corpus import iter_windows, load_texts, token_mask
from .models import input_device


@dataclass
class HarvestBatch:
    """Activations of the kept tokens of one LM batch.

    Attributes:
        acts: ``{hook_point: Tensor [n, d]}`` in the model's dtype, on the model's device
            (or ``out_device``).
        input_ids: LongTensor ``[n]``, the token at each row.
        positions: LongTensor ``[n]``, its position inside its window (0-based).
        windows: LongTensor ``[n]``, global index of its window in the window stream.
        window_tokens: LongTensor ``[b, T]``, the token windows of this batch (on CPU).
        n_windows: number of windows this batch consumed (>= b when some were filtered out).
    """

    acts: dict
    input_ids: torch.Tensor
    positions: torch.Tensor
    windows: torch.Tensor
    window_tokens: torch.Tensor
    n_windows: int


def _as_hook_list(hook_points) -> list[str]:
    if isinstance(hook_points, str):
        hook_points = [hook_points]
    hook_points = list(dict.fromkeys(hook_points))
    if not hook_points:
        raise ValueError("Give at least one hook point, e.g. 'layers.6.resid_post'.")
    for h in hook_points:
        if not isinstance(h, str):
            raise ValueError(f"A hook point is a string like 'layers.6.resid_post', got {h!r}.")
    return hook_points


def window_source(texts_or_windows, tokenizer, window: int = 256, add_bos: bool = True,
                  split: str = "train", text_column: str = "text") -> tuple[Iterator[torch.Tensor], int | None]:
    """Turn what the user passed into an iterator of LongTensor ``[window]`` rows.

    ``texts_or_windows`` may be a LongTensor ``[N, T]`` of ready windows, or anything
    :func:`load_texts` reads: a source string (``"default"``, a file/folder, a dataset name), a
    ``datasets`` object, or an iterable of document strings / dict rows. Returns ``(iterator, N or None if unknown)``.
    """
    if isinstance(texts_or_windows, torch.Tensor):
        w = texts_or_windows
        if w.dim() != 2 or w.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"Token windows must be an integer tensor [N, T], got {w.dtype} {tuple(w.shape)}.")
        return iter(w.long()), int(w.shape[0])
    texts = load_texts(texts_or_windows, split=split, text_column=text_column)  # names, datasets objects, iterables
    return iter_windows(texts, tokenizer, window=window, add_bos=add_bos), None


def harvest(model, tokenizer, windows: Iterable[torch.Tensor], hook_points, batch_windows: int = 8,
            exclude_first: bool = True, exclude_special: bool = True, window_offset: int = 0,
            window_filter=None, out_device=None) -> Iterator[HarvestBatch]:
    """Run ``model`` over windows ``batch_windows`` at a time and yield the kept tokens' activations.

    Args:
        windows: iterable of LongTensor ``[T]`` (all the same T).
        hook_points: hook-point names; all are captured in the same forward.
        window_offset: global index of the first window (used for ``HarvestBatch.windows``).
        window_filter: optional ``f(global_window_index) -> bool``; windows where it is False
            are skipped without running the model (per-process sharding).
        out_device: move activations there (default: stay on the model's device).
    Yields:
        :class:`HarvestBatch` per LM batch (batches whose windows are all filtered out are skipped).
    """
    from hf_sae.hooks import run_with_capture

    hook_points = _as_hook_list(hook_points)
    if batch_windows < 1:
        raise ValueError(f"batch_windows must be >= 1, got {batch_windows}.")
    device = input_device(model)
    it = iter(windows)
    gidx = window_offset
    while True:
        chunk = list(islice(it, batch_windows))
        if not chunk:
            return
        n_chunk = len(chunk)
        idx = torch.arange(gidx, gidx + n_chunk)
        gidx += n_chunk
        if window_filter is not None:
            sel = [i for i in range(n_chunk) if window_filter(int(idx[i]))]
            if not sel:
                continue
            chunk = [chunk[i] for i in sel]
            idx = idx[sel]
        ids = torch.stack(chunk)
        keep = token_mask(ids, tokenizer, exclude_first=exclude_first, exclude_special=exclude_special)
        flat = keep.view(-1).nonzero().squeeze(1)
        T = ids.shape[1]
        with torch.no_grad():
            acts = run_with_capture(model, ids.to(device), hook_points)
        out = {}
        for h in hook_points:
            a = acts[h]  # on the device of its layer (layers of a dispatched LM may sit on different devices)
            a = a.reshape(-1, a.shape[-1]).index_select(0, flat.to(a.device))
            out[h] = a.to(out_device) if out_device is not None else a
        yield HarvestBatch(acts=out, input_ids=ids.view(-1)[flat], positions=flat % T,
                           windows=idx[flat // T], window_tokens=ids, n_windows=n_chunk)


class ActivationStream(torch.utils.data.IterableDataset):
    """An ``IterableDataset`` of activation batches computed live from a model and a corpus.

    Each item is a dict ``{hook_point: FloatTensor [batch_tokens, d], "input_ids": LongTensor
    [batch_tokens], "positions": LongTensor [batch_tokens], "windows": LongTensor [batch_tokens]}``
    (``windows``: index of the token's window in the window stream); tokens are masked by
    :func:`~hf_sae.data.corpus.token_mask` (position 0 and special tokens dropped by default)
    and mixed in a shuffle buffer of ``shuffle_buffer_tokens`` tokens. One pass over the
    corpus per iteration (or until ``max_tokens``); the last batch may be smaller unless
    ``drop_last``.

    Sharding: window ``i`` goes to process ``i % num_processes == process_index`` (and, inside
    a ``DataLoader`` with workers, is split further across workers). Pass
    ``accelerator.process_index`` / ``accelerator.num_processes`` (or ``accelerator=``) and do
    **not** also hand the loader to ``accelerator.prepare`` (that would shard twice); use
    ``DataLoader(stream, batch_size=None)`` or iterate the stream directly.

    Args:
        model, tokenizer: the LM (eval mode) and its tokenizer.
        hook_points: one name or a list; all are captured in one forward.
        texts_or_windows: ``"default"`` (shipped corpus), a file/folder/dataset name, an iterable
            of documents, or a LongTensor ``[N, T]`` of windows.
        batch_tokens: rows per yielded batch.
        window: tokens per LM window; batch_windows: windows per LM forward.
        shuffle_buffer_tokens: shuffle-buffer size in tokens (0 = no shuffling).
        dtype: dtype of the yielded activations; device: where they live (default: model's device).
        max_tokens: stop after this many tokens per process.
    """

    def __init__(self, model, tokenizer, hook_points, texts_or_windows="default", *, split: str = "train",
                 text_column: str = "text", batch_tokens: int = 4096, window: int = 256, batch_windows: int = 8,
                 add_bos: bool = True, exclude_first: bool = True, exclude_special: bool = True,
                 shuffle_buffer_tokens: int = 65536, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device=None, max_tokens: int | None = None, drop_last: bool = False,
                 process_index: int = 0, num_processes: int = 1, accelerator=None):
        super().__init__()
        if accelerator is not None:
            process_index, num_processes = accelerator.process_index, accelerator.num_processes
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, num_processes), got {process_index}/{num_processes}.")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}.")
        if shuffle_buffer_tokens < 0:
            raise ValueError("shuffle_buffer_tokens must be >= 0.")
        self.model, self.tokenizer = model, tokenizer
        self.hook_points = _as_hook_list(hook_points)
        self.source = texts_or_windows
        self.split, self.text_column = split, text_column
        self.batch_tokens, self.window, self.batch_windows = batch_tokens, window, batch_windows
        self.add_bos, self.exclude_first, self.exclude_special = add_bos, exclude_first, exclude_special
        self.shuffle_buffer_tokens, self.seed, self.dtype, self.device = shuffle_buffer_tokens, seed, dtype, device
        self.max_tokens, self.drop_last = max_tokens, drop_last
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch = 0
        if not isinstance(texts_or_windows, (str, torch.Tensor)) and iter(texts_or_windows) is texts_or_windows:
            # a generator: can be iterated once only (a trainer reads it as one pass; see ``one_shot``)
            self._one_shot = True  # a generator: can be iterated once only
        else:
            self._one_shot = False
        self._used = False

    @property
    def one_shot(self) -> bool:
        """True when the texts are a one-shot iterator (a generator): the stream can be iterated once."""
        return self._one_shot

    def set_epoch(self, epoch: int) -> None:
        """Seed the shuffle buffer with ``seed + epoch`` on the next iteration."""
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.process_index * nw + w, self.num_processes * nw

    def _emit(self, bufs, n_rows, gen):
        """Split concatenated buffers into a random selection of n_rows (returned) and the rest (kept)."""
        total = bufs["input_ids"].shape[0]
        perm = torch.randperm(total, generator=gen).to(bufs["input_ids"].device)
        take, rest = perm[:n_rows], perm[n_rows:]
        out = {k: v.index_select(0, take) for k, v in bufs.items()}
        kept = {k: v.index_select(0, rest) for k, v in bufs.items()}
        return out, kept

    def __iter__(self):
        if self._one_shot and self._used:
            raise RuntimeError("This ActivationStream was built from a one-shot iterator of texts and is exhausted; "
                               "pass a source string, a list of texts or a tensor of windows to iterate again.")
        self._used = True
        rank, world = self._shard()
        windows, _ = window_source(self.source, self.tokenizer, self.window, self.add_bos, self.split, self.text_column)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + rank)
        B = self.batch_tokens
        cap = max(self.shuffle_buffer_tokens, B)
        keys = self.hook_points + ["input_ids", "positions", "windows"]
        pending: dict[str, list] = {k: [] for k in keys}
        n_pending, yielded = 0, 0
        budget = self.max_tokens if self.max_tokens is not None else math.inf
        device = self.device

        def cat():
            return {k: torch.cat(v) for k, v in pending.items()}

        for hb in harvest(self.model, self.tokenizer, windows, self.hook_points, self.batch_windows,
                          self.exclude_first, self.exclude_special, window_filter=lambda i: i % world == rank,
                          out_device=device):
            n = hb.input_ids.shape[0]
            if yielded + n_pending + n > budget:
                n = int(budget - yielded - n_pending)
            if n <= 0:
                break
            for h in self.hook_points:
                pending[h].append(hb.acts[h][:n].to(self.dtype))
            dev = hb.acts[self.hook_points[0]].device
            pending["input_ids"].append(hb.input_ids[:n].to(dev))
            pending["positions"].append(hb.positions[:n].to(dev))
            pending["windows"].append(hb.windows[:n].to(dev))
            n_pending += n
            if self.shuffle_buffer_tokens == 0:
                while n_pending >= B:
                    bufs = cat()
                    yield {k: v[:B] for k, v in bufs.items()}
                    pending = {k: [v[B:]] for k, v in bufs.items()}
                    n_pending -= B
                    yielded += B
            elif n_pending >= cap:
                n_out = ((n_pending - cap // 2) // B) * B
                if n_out > 0:
                    out, kept = self._emit(cat(), n_out, gen)
                    pending = {k: [v] for k, v in kept.items()}
                    n_pending -= n_out
                    yielded += n_out
                    for s in range(0, n_out, B):
                        yield {k: v[s:s + B] for k, v in out.items()}
            if yielded + n_pending >= budget:
                break
        if n_pending:
            bufs = cat()
            if self.shuffle_buffer_tokens:
                bufs, _ = self._emit(bufs, n_pending, gen)
            stop = n_pending - (n_pending % B if self.drop_last else 0)
            for s in range(0, stop, B):
                yield {k: v[s:s + B] for k, v in bufs.items()}
