"""Where the SAEs of a Hub repo or local folder live: the index file, hook-point folders, the files to
download for each, and the errors that say what is there when an SAE is missing.

Imports neither the model nor transformers: ``SparseAutoencoder.from_pretrained`` uses the
diagnostics here (:func:`check_local_sae_path`, :func:`explain_missing_sae`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .hooks import hook_point_sort_key, parse_hook_point

INDEX_FILE = "sae_index.json"
DASHBOARD_DIR = "dashboard"
CODE_FILES = ("configuration_sae.py", "modeling_sae.py", "activations.py")


def hook_point_folder(hook_point: str) -> str:
    """The repository folder of a hook point: the hook-point string itself (``"layers.6.resid_post"``).
    Raises ValueError (listing the valid forms) for a malformed hook point."""
    parse_hook_point(hook_point)
    return hook_point


def _sort_key(hp: str):
    try:
        return (0, *hook_point_sort_key(hp))
    except ValueError:
        return (1, 0, 0)


def _local_or_snapshot(
    repo_or_path,
    patterns: list[str],
    *,
    revision=None,
    cache_dir=None,
    token=None,
    local_files_only=False,
    endpoint=None,
) -> Path:
    if os.path.isdir(str(repo_or_path)):
        return Path(repo_or_path)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(repo_or_path),
            allow_patterns=patterns,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            endpoint=endpoint,
        )
    )


def _read_index(root: Path) -> dict[str, dict]:
    """{hook point: entry} from sae_index.json, else from scanning for hf_sae config.json files."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            return dict(json.loads(index_path.read_text())["hook_points"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid hf_sae index ({e}); delete it or re-push the repo.") from e
    found = {}
    for cfg_path in sorted(root.rglob("config.json")):
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            continue
        if cfg.get("model_type") != "hf_sae":
            continue
        folder = cfg_path.parent.relative_to(root).as_posix()
        folder = "" if folder == "." else folder
        hp = cfg.get("hook_point") or folder
        found[hp] = {"folder": folder}
    return found


def _index_at(repo_or_path, **kw) -> tuple[Path, dict[str, str]]:
    """(local root, {hook point: folder}) -- downloads only the index and the config files."""
    root = _local_or_snapshot(repo_or_path, [INDEX_FILE, "config.json", "*/config.json"], **kw)
    index = _read_index(root)
    return root, {hp: index[hp].get("folder", "") for hp in sorted(index, key=_sort_key)}


def repo_hook_points(
    repo_or_path,
    *,
    revision: str | None = None,
    cache_dir=None,
    token=None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> dict[str, str]:
    """``{hook point: folder}`` of the SAEs in a repo or local folder (``""`` = the root), in forward order.
    Downloads only the index and the config files."""
    return _index_at(
        repo_or_path,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        endpoint=endpoint,
    )[1]


def _weight_patterns(folder: str) -> list[str]:
    if folder:
        return [f"{folder}/*"]
    return ["config.json", "model*.safetensors*", *CODE_FILES]


def _listing(names, limit: int = 25) -> str:
    names = sorted(names)
    return (
        ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
        if names
        else "nothing"
    )


def looks_local(path: str) -> bool:
    """True when ``path`` can only be meant as a local path (so it must never be tried on the Hub): it starts
    with ``.``, ``/`` or ``~``, has more than one ``/`` (a Hub id has one), or its first component is a local
    folder."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def check_local_sae_path(path, subfolder: str | None = None) -> None:
    """Before any download: raise ``FileNotFoundError`` naming what exists when ``path`` is meant as a local
    folder but does not exist (a typo must not turn into a Hub request)."""
    path = str(path)
    if os.path.isdir(os.path.expanduser(path)) or not looks_local(path):
        return
    p = Path(path).expanduser()
    parent = next((a for a in p.parents if a.is_dir()), None)
    if parent is None:
        raise FileNotFoundError(f"{path} does not exist (and is not a Hub repo id, which has the form 'org/name').")
    saes = sorted(c.parent.name for c in parent.glob("*/config.json"))
    raise FileNotFoundError(
        f"{path} does not exist; {parent} holds: {_listing(c.name for c in parent.iterdir())}"
        + (f" (SAE folders: {_listing(saes)})" if saes else "")
        + ". An SAE folder holds config.json + model.safetensors (save_pretrained)."
    )


def _repo_files(repo_or_path, revision=None, token=None) -> list[str] | None:
    """Files (relative paths) of a local folder (depth <= 2) or a Hub repo; None if they cannot be listed."""
    if os.path.isdir(str(repo_or_path)):
        root = Path(repo_or_path)
        return sorted(p.relative_to(root).as_posix() for p in [*root.glob("*"), *root.glob("*/*")] if p.is_file())
    try:
        from huggingface_hub import HfApi

        return sorted(HfApi(token=token).list_repo_files(str(repo_or_path), revision=revision))
    except Exception:  # noqa: BLE001 -- offline, no such repo, no permission: nothing to list
        return None


def explain_missing_sae(
    repo_or_path, subfolder: str | None = None, revision: str | None = None, token=None
) -> tuple[str | None, str | None]:
    """Why no SAE loads from ``repo_or_path`` (+ ``subfolder``): returns ``(fallback, message)``.

    ``fallback`` is ``""`` when the SAE asked for by ``subfolder`` is the one at the root (a single SAE pushed
    to the root, whose config names that hook point): load the root instead. Otherwise ``fallback`` is None
    and ``message`` lists the SAEs (hook point -> ``subfolder=``) and files the repo or folder holds
    (``message`` is None when they cannot be listed)."""
    files = _repo_files(repo_or_path, revision, token)
    where = f"{repo_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    if files is None:  # offline, private or no such repo: the original error says it best
        return None, None
    folders = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/config.json")})
    hook_points: dict[str, str] = {}
    root_hp = None
    try:
        if os.path.isdir(str(repo_or_path)):
            index_text = (Path(repo_or_path) / INDEX_FILE).read_text() if INDEX_FILE in files else None
            root_cfg = (Path(repo_or_path) / "config.json").read_text() if "config.json" in files else None
        else:
            from huggingface_hub import hf_hub_download

            def get(name):
                return Path(hf_hub_download(str(repo_or_path), name, revision=revision, token=token)).read_text()

            index_text = get(INDEX_FILE) if INDEX_FILE in files else None
            root_cfg = get("config.json") if "config.json" in files else None
        if index_text:
            hook_points = {hp: e.get("folder", "") for hp, e in json.loads(index_text).get("hook_points", {}).items()}
        if root_cfg:
            root_hp = json.loads(root_cfg).get("hook_point")
    except Exception:  # noqa: BLE001 -- the listing below is still useful
        pass
    if (
        subfolder
        and "config.json" in files
        and subfolder in (root_hp, hook_points.get(root_hp or "", None))
        and f"{subfolder}/config.json" not in files
    ):
        return "", ""
    if not hook_points:
        hook_points = {f: f for f in folders}
    choices = "; ".join(
        f"{hp} -> subfolder={f!r}" if f else f"{hp} -> the root (no subfolder)"
        for hp, f in sorted(hook_points.items(), key=lambda kv: _sort_key(kv[0]))
    )
    msg = f"no SAE at {where}."
    if choices:
        msg += f" It holds SAEs for: {choices} (or load them all with hf_sae.hub.load_all)."
    msg += f" Files: {_listing(f for f in files if f.count('/') <= 1)}."
    return None, msg


__all__ = ["INDEX_FILE", "DASHBOARD_DIR", "CODE_FILES", "hook_point_folder", "repo_hook_points",
           "looks_local", "check_local_sae_path", "explain_missing_sae"]
