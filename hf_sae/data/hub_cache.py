"""Activation caches on the Hugging Face Hub: push a cache folder to a dataset repo, train from it.

    push_cache("acts/", "org/smollm2-l6-acts")                        # the Arrow shards + metadata
    hf-sae train --activations hf://datasets/org/smollm2-l6-acts ...   # any process, any node

A Hub cache is read by :class:`HubCachedActivations`, which is :class:`~hf_sae.data.cache.CachedActivations`
(same shuffle, same per-process sharding, same checksum verification) with one difference: a shard
is fetched from the repo the first time a batch needs it (in the background thread that verifies
the next shard group), into a temporary folder of this process. Nothing has to be copied to a node
before a run, and a run from ``hf://datasets/<repo>`` draws exactly the batches the same run draws
from the local folder (so it trains the same SAE).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Optional

from .cache import CachedActivations, _hook_dir_name

HUB_PREFIX = "hf://datasets/"


def is_hub_cache(path) -> bool:
    """True for ``hf://datasets/<org>/<name>[@revision]``."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_path(path: str) -> tuple[str, Optional[str]]:
    """``hf://datasets/org/name[@rev]`` -> (repo_id, revision or None)."""
    rest = path[len(HUB_PREFIX):]
    repo_id, _, revision = rest.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{path!r} is not a Hub cache address; write hf://datasets/<org>/<name>[@revision]")
    return repo_id, revision or None


def push_cache(cache_dir, repo_id: str, private: bool = False, revision: Optional[str] = None,
               commit_message: str = "hf_sae activation cache", token: Optional[str] = None) -> str:
    """Upload an activation cache folder (``hf-sae cache`` / ``write_activations``) to the dataset repo
    ``repo_id`` (created if needed): ``metadata.json`` and every hook point's folder (Arrow shards +
    their metadata). Returns the ``hf://datasets/...`` address to train from."""
    from huggingface_hub import HfApi

    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "metadata.json"
    if not meta_path.is_file():
        raise ValueError(f"{cache_dir} is not a complete activation cache (no metadata.json); finish it with "
                         "`hf-sae cache ... --resume` before pushing")
    hooks = json.loads(meta_path.read_text()).get("hook_points", [])
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(cache_dir), repo_id=repo_id, repo_type="dataset", revision=revision,
                      commit_message=commit_message,
                      allow_patterns=["metadata.json"] + [f"{_hook_dir_name(h)}/*" for h in hooks])
    return HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")


class HubCachedActivations(CachedActivations):
    """:class:`~hf_sae.data.cache.CachedActivations` over a cache in a Hub dataset repo (``path`` =
    ``hf://datasets/org/name[@rev]``); every other argument is the same. Shards are fetched on first use
    into a temporary folder removed with this object."""

    def __init__(self, path: str, hook_point=None, token: Optional[str] = None, **kwargs):
        self.repo_id, self.revision = parse_hub_path(path)
        self._token = token
        self._fetch_lock = threading.Lock()
        self._root = tempfile.mkdtemp(prefix="hf_sae_hub_cache_")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._root, True)
        hooks = json.loads(Path(self._download("metadata.json")).read_text()).get("hook_points", [])
        for h in hooks:
            self._download(f"{_hook_dir_name(h)}/metadata.json")
        super().__init__(self._root, hook_point=hook_point, **kwargs)
        self.address = path

    def _download(self, rel: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.repo_id, rel, repo_type="dataset", revision=self.revision, token=self._token,
                               local_dir=self._root)

    def _shard_path(self, k: int, i: int) -> Path:
        local = super()._shard_path(k, i)
        with self._fetch_lock:  # the verifying thread and the reader may ask for the same shard
            if not local.is_file():
                self._download(f"{local.parent.name}/{local.name}")
        return local

    def __getstate__(self):  # DataLoader workers share the folder (the parent process removes it)
        st = super().__getstate__()
        st["_cleanup"], st["_fetch_lock"] = None, None
        return st

    def __setstate__(self, st):
        super().__setstate__(st)
        self._fetch_lock = threading.Lock()


class _StreamedShards:
    """Shards read through ``datasets`` streaming (``load_dataset("arrow", data_files=<shard>,
    streaming=True)``) instead of memory-mapped local files: the rows arrive over fsspec (a local or
    shared-storage path, or ``hf://datasets/...`` through ``HfFileSystem``), nothing is written to disk,
    and only the shards of the current shuffle groups are held in memory. Order, shuffle and process
    sharding are the memory-mapped reader's, so the batches are identical.

    Integrity: each shard's schema and row count are checked against ``metadata.json`` as it arrives;
    its sha256 (which needs the whole file) is not (the memory-mapped reader verifies it)."""

    streaming = True

    def _shard_uri(self, k: int, i: int) -> str:
        raise NotImplementedError

    def _verify_one(self, k: int, i: int) -> None:  # no file here to hash; see the class docstring
        return None

    def _prefetch_verify(self, shard_ids) -> None:
        return None

    def _read_table(self, k: int, i: int):
        import pyarrow as pa
        from datasets import load_dataset

        held = 2 * self.shuffle_buffer_shards * len(self.dirs)  # the shards of this group and the next
        while len(self._maps) >= held:
            self._maps.pop(next(iter(self._maps)))
        ds = load_dataset("arrow", data_files=[self._shard_uri(k, i)], split="train", streaming=True)
        parts = list(ds.with_format("arrow").iter(batch_size=self.metas[k]["shards"][i]["num_rows"] or 1))
        return pa.concat_tables(parts) if parts else pa.table({})


class StreamingCachedActivations(_StreamedShards, CachedActivations):
    """:class:`~hf_sae.data.cache.CachedActivations` over a cache folder (local or shared storage), with
    its shards streamed by ``datasets`` (see :class:`_StreamedShards`)."""

    def _shard_uri(self, k: int, i: int) -> str:
        return str(self._shard_file(k, i))


class StreamingHubCachedActivations(_StreamedShards, HubCachedActivations):
    """:class:`HubCachedActivations` with the shards streamed from the Hub by ``datasets``
    (``hf://datasets/org/name@rev/<hook point>/shard-*.arrow``) instead of downloaded: only the small
    metadata files are fetched."""

    def _shard_uri(self, k: int, i: int) -> str:
        rel = f"{self.dirs[k].name}/{self.metas[k]['shards'][i]['file']}"
        return f"{HUB_PREFIX}{self.repo_id}{'@' + self.revision if self.revision else ''}/{rel}"


def open_cache(path, streaming: bool = False, **kwargs) -> CachedActivations:
    """The reader of the cache at ``path``: :class:`HubCachedActivations` for ``hf://datasets/...``, else
    :class:`CachedActivations`; with ``streaming=True`` their ``datasets``-streaming twins (no shard is
    written to disk; the batches are the same)."""
    if is_hub_cache(path):
        return (StreamingHubCachedActivations if streaming else HubCachedActivations)(path, **kwargs)
    return (StreamingCachedActivations if streaming else CachedActivations)(path, **kwargs)


def cache_exists(path) -> bool:
    """A local cache folder (with metadata.json) or a Hub cache address."""
    return is_hub_cache(path) or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "metadata.json")))
