"""SAEs published by other libraries, loaded by ``SparseAutoencoder.from_pretrained`` like hf_sae's own.

``SAE.from_pretrained(repo_or_folder, subfolder=...)`` first tries hf_sae's layout; when the folder holds no
hf_sae config it is recognised as one of :data:`hf_sae.convert.FORMATS` (SAELens, sparsify,
dictionary_learning, Gemma Scope, OpenAI), downloaded (only that folder), converted with the format's
check against the source library's own forward, and the converted copy is cached under
``$HF_SAE_CACHE/converted/<repo>/<commit>/<subfolder>/<options>/`` (default ``~/.cache/hf_sae``). A second
load of the same commit reads that copy; with ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) it makes
no request at all.

:data:`REGISTRY` names a few well-known releases, so that an id and the release's own folder names
resolve, with the hook point and base model filled in::

    SAE.from_pretrained("gemma-scope-2b-pt-res", subfolder="layer_20/width_16k/average_l0_71")

=============================  =============================================  ========================================
registry id                    Hub repo (format)                              subfolder -> hook point
=============================  =============================================  ========================================
gemma-scope-2b-pt-res          google/gemma-scope-2b-pt-res (params.npz)      layer_{L}/width_{W}/average_l0_{X}
                                                                              -> layers.{L}.resid_post
gemma-scope-9b-pt-res          google/gemma-scope-9b-pt-res (params.npz)      as above
eleuther-llama-3-8b-32x        EleutherAI/sae-llama-3-8b-32x (sparsify)       layers.{L} -> layers.{L}.resid_post
gpt2-small-resid-post-v5-32k   jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs   v5_32k_layer_{L}.pt ->
                               (OpenAI's TopK SAEs in SAELens files)          layers.{L}.resid_post (with its LN)
gpt2-small-resid-post-v5-128k  jbloom/GPT2-Small-OAI-v5-128k-resid-post-SAEs  v5_128k_layer_{L}.pt -> as above
gpt2-small-res-jb              jbloom/GPT2-Small-SAEs-Reformatted (SAELens)   blocks.{L}.hook_resid_pre ->
                                                                              layers.{L}.resid_pre
=============================  =============================================  ========================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import is_sealed, publish_dir, seal, tmp_name

__all__ = ["Release", "REGISTRY", "UnknownLayout", "resolve", "load_pretrained", "find_foreign_folders",
           "converted_cache_dir"]


@dataclass(frozen=True)
class Release:
    """A published set of SAEs: where it lives and how its folder names map to hook points."""

    repo_id: str
    format: str
    """a key of :data:`hf_sae.convert.FORMATS`."""
    subfolder: str
    """regex a subfolder must match in full; its named groups fill ``hook_point``."""
    hook_point: str
    """hf_sae hook point template, e.g. ``layers.{layer}.resid_post``."""
    base_model: str
    example: str
    """one valid subfolder, for error messages and the docs."""
    options: dict[str, Any] = field(default_factory=dict)
    """convert options the release needs."""


_GEMMA = r"layer_(?P<layer>\d+)/width_\w+/average_l0_\d+"
REGISTRY: dict[str, Release] = {
    "gemma-scope-2b-pt-res": Release("google/gemma-scope-2b-pt-res", "gemmascope", _GEMMA, "layers.{layer}.resid_post",
                                     "google/gemma-2-2b", "layer_20/width_16k/average_l0_71"),
    "gemma-scope-9b-pt-res": Release("google/gemma-scope-9b-pt-res", "gemmascope", _GEMMA, "layers.{layer}.resid_post",
                                     "google/gemma-2-9b", "layer_20/width_16k/average_l0_68"),
    "eleuther-llama-3-8b-32x": Release("EleutherAI/sae-llama-3-8b-32x", "sparsify", r"layers\.(?P<layer>\d+)",
                                       "layers.{layer}.resid_post", "meta-llama/Meta-Llama-3-8B", "layers.10"),
    "gpt2-small-resid-post-v5-32k": Release("jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs", "saelens",
                                            r"v5_32k_layer_(?P<layer>\d+)\.pt", "layers.{layer}.resid_post",
                                            "openai-community/gpt2", "v5_32k_layer_6.pt"),
    "gpt2-small-resid-post-v5-128k": Release("jbloom/GPT2-Small-OAI-v5-128k-resid-post-SAEs", "saelens",
                                             r"v5_128k_layer_(?P<layer>\d+)\.pt", "layers.{layer}.resid_post",
                                             "openai-community/gpt2", "v5_128k_layer_6.pt"),
    "gpt2-small-res-jb": Release("jbloom/GPT2-Small-SAEs-Reformatted", "saelens",
                                 r"blocks\.(?P<layer>\d+)\.hook_resid_pre", "layers.{layer}.resid_pre",
                                 "openai-community/gpt2", "blocks.8.hook_resid_pre"),
}
"""Registry id -> :class:`Release`. Repo ids work too (any folder in a known format is recognised)."""

# the files that mark a folder as one SAE of a foreign format (root-relative names in a repo listing)
_MARKERS = {"sae_weights.safetensors": "saelens", "sae.safetensors": "sparsify", "params.npz": "gemmascope",
            "ae.pt": "dictionary_learning"}
_FILES = ["cfg.json", "config.json", "sae_weights.safetensors", "sae.safetensors", "params.npz", "ae.pt", "*.pt",
          "*.pth"]


class UnknownLayout(ValueError):
    """The folder holds no SAE in a format :mod:`hf_sae.convert` knows (or does not exist)."""


def converted_cache_dir() -> Path:
    """Where converted copies of foreign SAEs are kept: ``$HF_SAE_CACHE/converted`` (see hf_sae.data.models)."""
    from .data.models import hf_sae_cache_dir

    return hf_sae_cache_dir() / "converted"


def resolve(name: str, subfolder: str | None) -> tuple[str, dict[str, Any]]:
    """(repo id or path, convert keyword arguments) for a registry id or a plain repo id / folder."""
    release = REGISTRY.get(str(name))
    if release is None:
        return str(name), {}
    if not subfolder:
        raise ValueError(f"{name!r} is a set of SAEs: pass subfolder=..., e.g. subfolder={release.example!r} "
                         f"(folders of {release.repo_id} matching {release.subfolder}).")
    m = re.fullmatch(release.subfolder, subfolder.strip("/"))
    if not m:
        raise ValueError(f"subfolder {subfolder!r} is not a folder of {name!r}: expected {release.subfolder} "
                         f"(e.g. {release.example!r}).")
    return release.repo_id, {"format": release.format, "hook_point": release.hook_point.format(**m.groupdict()),
                             "base_model": release.base_model, **release.options}


def _is_hf_sae_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "hf_sae"
    except (OSError, ValueError, AttributeError):
        return False


def _snapshot(repo_id: str, subfolder: str | None, *, revision=None, cache_dir=None, token=None,
              local_files_only=False, force_download=False) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}", f"{subfolder}/*", "config.json"] if subfolder else list(_FILES)
    return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only, force_download=force_download))


def _cache_key(kwargs: dict) -> str:
    text = json.dumps({k: str(v) for k, v in sorted(kwargs.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_pretrained(name: str, subfolder: str | None = None, *, revision: str | None = None, cache_dir=None,
                    token=None, local_files_only: bool = False, force_download: bool = False, torch_dtype=None,
                    **convert_kwargs):
    """Load a foreign SAE (a :data:`REGISTRY` id, a Hub repo or a local folder, plus ``subfolder``) as an hf_sae
    :class:`~hf_sae.SparseAutoencoder`, converting it (with the format's check) and caching the converted copy.

    ``convert_kwargs`` go to :func:`hf_sae.convert.convert` (``format``, ``hook_point``, ``base_model``, format
    options); ``torch_dtype`` is the dtype of the result. Raises ValueError when the folder is in no known format.
    """
    from .convert import convert, detect_format
    from .modeling_sae import SparseAutoencoder

    repo, resolved = resolve(name, subfolder)
    kwargs = {**resolved, **convert_kwargs}
    if torch_dtype is not None and torch_dtype != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    local = os.path.isdir(repo)
    root = Path(repo) if local else _snapshot(repo, subfolder, revision=revision, cache_dir=cache_dir, token=token,
                                              local_files_only=local_files_only, force_download=force_download)
    src = root / subfolder if subfolder else root
    if not src.exists():
        raise UnknownLayout(f"{name}: no {subfolder!r} in {repo}" + (f" at revision {revision}" if revision else ""))
    fmt = kwargs.pop("format", "auto")
    if fmt == "auto":
        try:
            detect_format(src)
        except ValueError as e:  # names the known layouts
            raise UnknownLayout(str(e)) from e
    if local:
        return convert(src, fmt, **kwargs)
    commit = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else "unversioned"
    target = (converted_cache_dir() / repo.replace("/", "--") / commit / (subfolder or "_root").strip("/")
              / _cache_key({"format": fmt, **kwargs}))
    if is_sealed(target, verify_checksums=False) and not force_download:
        return SparseAutoencoder.from_pretrained(target)
    sae = convert(src, fmt, **kwargs)
    sae.config.training_info.setdefault("converted_from", {})["repo_id"] = repo
    tmp = tmp_name(target)  # written beside, sealed, then swapped in: a reader never sees a partial copy
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_pretrained(tmp)
    seal(tmp)
    publish_dir(tmp, target)
    return sae


def maybe_load(name, subfolder: str | None, kwargs: dict):
    """``SparseAutoencoder.from_pretrained``'s hook: the foreign SAE at ``name``/``subfolder`` when it is a registry
    id or a local folder in a foreign format, else None (hf_sae's own loader runs)."""
    if str(name) in REGISTRY:
        return load_pretrained(str(name), subfolder, **_hub_kwargs(kwargs))
    path = Path(str(name)) / (subfolder or "")
    if os.path.isdir(str(name)) and path.exists() and not _is_hf_sae_folder(path):
        from .convert import detect_format

        try:
            detect_format(path)
        except ValueError:
            return None
        return load_pretrained(str(name), subfolder, **_hub_kwargs(kwargs))
    return None


def _hub_kwargs(kwargs: dict) -> dict:
    keep = ("revision", "cache_dir", "token", "local_files_only", "force_download", "torch_dtype")
    return {k: kwargs[k] for k in keep if kwargs.get(k) is not None}


def fallback_load(name, subfolder: str | None, kwargs: dict, error: Exception):
    """After hf_sae's own loader failed on a Hub repo with ``error``: the foreign SAE there, or re-raise ``error``
    when the repo cannot be read or the folder is not in a known format either (a recognised folder that the
    converter refuses raises the converter's error)."""
    if os.path.exists(str(name)):
        raise error
    try:
        return load_pretrained(str(name), subfolder, **_hub_kwargs(kwargs))
    except UnknownLayout as foreign_error:
        raise error from foreign_error
    except Exception as foreign_error:
        if isinstance(foreign_error, OSError) or type(foreign_error).__module__.startswith("huggingface_hub"):
            raise error from foreign_error  # no such repo / revision / file, or offline without a cached copy
        raise


def find_foreign_folders(repo_or_path, *, revision=None, token=None, local_files_only: bool = False,
                         cache_dir=None) -> dict[str, str]:
    """{folder: format} of the foreign SAEs in a repo or local folder, from its file listing (offline: the cached
    snapshot's files). A folder is one SAE when it holds its format's marker file (``sae_weights.safetensors``,
    ``sae.safetensors``, ``params.npz``, ``ae.pt``)."""
    if os.path.isdir(str(repo_or_path)):
        root = Path(str(repo_or_path))
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    else:
        from huggingface_hub import constants

        if local_files_only or constants.HF_HUB_OFFLINE:
            root = _snapshot(str(repo_or_path), None, revision=revision, cache_dir=cache_dir, token=token,
                             local_files_only=True)
            files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()]
        else:
            from huggingface_hub import HfApi

            files = HfApi().list_repo_files(str(repo_or_path), revision=revision, token=token)
    found = {}
    for f in files:
        folder, _, base = f.rpartition("/")
        if base in _MARKERS:
            found[folder] = _MARKERS[base]
    return dict(sorted(found.items()))
