"""Write and push SAE repositories: one SAE at the root or one folder per hook point, with the model code,
the index and the model card (the layout is described in :mod:`hf_sae.hub`).

Works on the SAE objects it is given and does not import the model class, so that
``SparseAutoencoder.push_to_hub`` can call it without an import cycle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub_card import (
    _index_entry,
    render_model_card,
)
from .hub_layout import CODE_FILES, DASHBOARD_DIR, INDEX_FILE, _sort_key, hook_point_folder

if TYPE_CHECKING:
    from .modeling_sae import SparseAutoencoder


def _is_sae(obj) -> bool:
    """An hf_sae SAE (its config's model_type is "hf_sae" and it saves with save_pretrained); read by attribute,
    so this module needs no import of the model class (which calls :func:`push_to_hub`)."""
    return getattr(getattr(obj, "config", None), "model_type", None) == "hf_sae" and hasattr(obj, "save_pretrained")


def _normalise_saes(saes, layout: str) -> tuple[dict[str, SparseAutoencoder], bool]:
    """-> ({hook point: sae}, at_root)."""
    if layout not in ("auto", "root", "subfolders"):
        raise ValueError(f"layout={layout!r} is invalid; use 'auto', 'root' or 'subfolders'.")
    if _is_sae(saes):
        hp = saes.config.hook_point
        if hp is None:
            if layout == "subfolders":
                raise ValueError(
                    "This SAE has no config.hook_point, so it has no hook-point folder; set "
                    "sae.config.hook_point (e.g. 'layers.6.resid_post') or push it with layout='root'."
                )
            hp = ""
        else:
            hook_point_folder(hp)
        return {hp: saes}, layout != "subfolders"
    if not isinstance(saes, Mapping) or not saes:
        raise TypeError(
            "saes must be a SparseAutoencoder or a non-empty mapping {hook point: SparseAutoencoder}, "
            f"got {type(saes).__name__}"
        )
    out = {}
    for hp, sae in saes.items():
        if not _is_sae(sae):
            raise TypeError(f"saes[{hp!r}] is a {type(sae).__name__}, not a SparseAutoencoder")
        hook_point_folder(hp)
        if sae.config.hook_point not in (None, hp):
            raise ValueError(
                f"saes[{hp!r}] has config.hook_point={sae.config.hook_point!r}; the key and the config "
                "must name the same hook point."
            )
        out[hp] = sae
    if layout == "root":
        if len(out) != 1:
            raise ValueError(f"layout='root' holds one SAE, got {len(out)}; use layout='subfolders' for a set.")
        return out, True
    return out, False


def _save_one(sae: SparseAutoencoder, folder: Path, hook_point: str) -> None:
    """save_pretrained with config.hook_point filled in (restored afterwards)."""
    old = sae.config.hook_point
    try:
        if hook_point:
            sae.config.hook_point = hook_point
        sae.save_pretrained(folder)
    finally:
        sae.config.hook_point = old
    missing = [f for f in ("config.json", *CODE_FILES) if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(
            f"save_pretrained did not write {missing} in {folder}; the pushed repo would not load "
            "with trust_remote_code."
        )


def save_for_hub(
    saes,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    layout: str = "auto",
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    training_tokens: int | None = None,
    license: str | None = None,
    existing_index: Mapping[str, Any] | None = None,
    dashboards=None,
) -> Path:
    """Write the exact repository layout (see the module docstring) into ``folder``.

    Args:
        saes: one :class:`SparseAutoencoder` or ``{hook point: SparseAutoencoder}``.
        folder: output directory (created).
        repo_id: used in the card's title and usage snippet (default: the folder name).
        layout: ``auto`` (a single SAE at the root, a mapping in subfolders), ``root`` or ``subfolders``.
        metrics: ``{hook point: {"fvu", "l0", "dead_fraction", "delta_loss"}}`` for the card; default: each
            SAE's ``config.training_info``.
        base_model, dataset, training_tokens, license: card metadata (defaults from the SAEs' configs).
        existing_index: ``hook_points`` of an index already in the repo; its other hook points are kept in
            the new index and card.
        dashboards: ``{hook point: site folder}`` (or one folder for one SAE) written by ``hf-sae dashboard``;
            each is shipped in ``dashboard/<hook point>/`` and linked from the card.
    Returns: the folder path.
    """
    saes, at_root = _normalise_saes(saes, layout)
    dashboards = _check_dashboards(dashboards, saes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics or {})
    unknown = set(metrics) - set(saes)
    if unknown:
        raise ValueError(
            f"metrics given for hook points {sorted(unknown)} that are not among the SAEs pushed ({sorted(saes)})."
        )
    index: dict[str, Any] = {k: dict(v) for k, v in (existing_index or {}).items()}
    if at_root:
        index = {hp: e for hp, e in index.items() if e.get("folder")}  # the new root SAE replaces an old one
    for hp, sae in saes.items():
        sub = "" if at_root else hook_point_folder(hp)
        target = folder / sub if sub else folder
        _save_one(sae, target, hp)
        shipped = index.get(hp, {}).get("dashboard")  # a browser pushed earlier stays in the repo and the card
        index[hp] = _index_entry(sae, sub, metrics.get(hp))
        if shipped and hp not in dashboards:
            index[hp]["dashboard"] = shipped
        if hp in dashboards:
            rel = f"{DASHBOARD_DIR}/{sub}" if sub else DASHBOARD_DIR
            shutil.copytree(
                dashboards[hp],
                folder / rel,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("autointerp_cache.jsonl"),
            )
            index[hp]["dashboard"] = rel
    if not at_root:  # the code at the root, for trust_remote_code
        first = folder / hook_point_folder(next(iter(saes)))
        for name in CODE_FILES:
            shutil.copyfile(first / name, folder / name)
    (folder / INDEX_FILE).write_text(
        json.dumps({"format": "hf_sae", "version": 1, "hook_points": index}, indent=2, sort_keys=True) + "\n"
    )
    card = render_model_card(
        index,
        repo_id or folder.resolve().name,
        base_model=base_model,
        dataset=dataset,
        training_tokens=training_tokens,
        license=license,
    )
    (folder / "README.md").write_text(
        card + _dashboard_section(index, repo_id or folder.resolve().name), encoding="utf-8"
    )
    return folder


def _check_dashboards(dashboards, saes: Mapping[str, SparseAutoencoder]) -> dict[str, Path]:
    """{hook point: site folder}, validated before anything is written."""
    if not dashboards:
        return {}
    if isinstance(dashboards, (str, os.PathLike)):
        if len(saes) != 1:
            raise ValueError("dashboards= is one folder but several SAEs are pushed; pass {hook point: folder}.")
        dashboards = {next(iter(saes)): dashboards}
    out = {}
    for hp, path in dashboards.items():
        if hp not in saes:
            raise ValueError(
                f"a dashboard is given for hook point {hp!r}, which is not among the SAEs pushed ({sorted(saes)})."
            )
        if not (Path(path) / "index.html").is_file() or not (Path(path) / "data" / "meta.js").is_file():
            raise FileNotFoundError(
                f"{path} is not a feature-browser site (index.html + data/meta.js); build it "
                "with `hf-sae dashboard SAE --out DIR`."
            )
        out[hp] = Path(path)
    return out


def _dashboard_section(index: Mapping[str, Mapping[str, Any]], repo_id: str) -> str:
    """The card's "Feature browser" section (empty when no hook point has one)."""
    rows = [
        (hp, e["dashboard"]) for hp, e in sorted(index.items(), key=lambda kv: _sort_key(kv[0])) if e.get("dashboard")
    ]
    if not rows:
        return ""
    links = "\n".join(f"- `{hp or 'root SAE'}`: [`{d}/index.html`]({d}/index.html)" for hp, d in rows)
    return (
        f"\n## Feature browser\n\nA static feature browser (top-activating contexts, activation histograms, "
        f"promoted tokens, explanations) for each SAE, built with `hf-sae dashboard`:\n\n{links}\n\n"
        f"It needs no server: download it and open `index.html` from disk:\n\n```python\n"
        f"from huggingface_hub import snapshot_download\n"
        f'path = snapshot_download("{repo_id}", allow_patterns=["{DASHBOARD_DIR}/*"])\n'
        f'print(path + "/{rows[0][1]}/index.html")\n```\n'
    )


def push_to_hub(
    saes,
    repo_id: str,
    *,
    layout: str = "auto",
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    training_tokens: int | None = None,
    license: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    dashboards=None,
):
    """Create ``repo_id`` if needed and push one SAE or a set of SAEs with code, index and model card, in a
    single commit. Hook points already in the repo (from an earlier push) stay listed in the index and card.

    Returns the ``huggingface_hub.CommitInfo`` of the commit. See :func:`save_for_hub` for the arguments.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    existing = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = api.hf_hub_download(repo_id, INDEX_FILE, revision=revision, cache_dir=os.path.join(tmp, "cache"))
            existing = json.loads(Path(path).read_text()).get("hook_points")
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            existing = None
        stage = Path(tmp) / "stage"
        save_for_hub(
            saes,
            stage,
            repo_id=repo_id,
            layout=layout,
            metrics=metrics,
            base_model=base_model,
            dataset=dataset,
            training_tokens=training_tokens,
            license=license,
            existing_index=existing,
            dashboards=dashboards,
        )
        ops = [
            CommitOperationAdd(path_in_repo=p.relative_to(stage).as_posix(), path_or_fileobj=str(p))
            for p in sorted(stage.rglob("*"))
            if p.is_file()
        ]
        n = len(_normalise_saes(saes, layout)[0])
        message = commit_message or f"Upload {n} SAE{'s' if n > 1 else ''} with hf_sae"
        return api.create_commit(
            repo_id, operations=ops, commit_message=message, revision=revision, create_pr=create_pr
        )


__all__ = ["save_for_hub", "push_to_hub"]
