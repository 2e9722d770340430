"""The Hugging Face Hub: push one SAE or a set of SAEs (one subfolder per hook point) with a model
card, and load them back.

Repository layout written by :func:`push_to_hub` / :func:`save_for_hub`::

    README.md                  model card rendered from hf_sae/templates/sae_card.md (= model_cards/sae_card.md)
    sae_index.json             {"hook_points": {hook point: {"folder", "d_in", "n_latents", "activation", "k",
                               "metrics", ...}}} -- what load_all reads to find the SAEs without listing the repo
    configuration_sae.py       the model code, at the root: transformers only looks for remote code there,
    modeling_sae.py            so ``AutoModel.from_pretrained(repo, subfolder=..., trust_remote_code=True)``
    activations.py             works for people who do not have hf_sae installed
    layers.6.resid_post/       one folder per hook point, named by the hook point string:
        config.json            save_pretrained output (config.json with auto_map, model.safetensors,
        model.safetensors      and the same three code files, so the folder is also usable on its own)
        ...
    dashboard/layers.6.resid_post/   optional (``dashboards=``): the static feature browser of that SAE
        index.html ...         (``hf-sae dashboard``); the card links to it

A single SAE pushed on its own goes to the repository root instead (``layout="auto"``), so that
``SAE.from_pretrained("org/gpt2-sae-32k")`` loads it; pass ``layout="subfolders"`` to put it in its
hook-point folder.

Model card: YAML metadata (``library_name: hf_sae``, ``base_model``, ``datasets``, ``tags`` with the
hook points, and a ``model-index`` with FVU, L0, dead fraction and Δloss per hook point: one result per
hook point, the hook point being the result's ``dataset.config``), then a body rendered with
``str.format`` from the template. :func:`card_metrics` parses the metrics back from a card.

Metrics for the card are taken from the ``metrics=`` argument (``hf-sae eval``'s ``metrics.json`` is read by
:func:`read_metrics_file`), else from each SAE's ``config.training_info``: what the trainer writes
(``final_metrics.eval_*``, measured on the held-out split named by ``eval_split``; else
``final_metrics.train_*``, labelled split ``train``), or ``training_info["metrics"]`` / its top level.
The model-index names the split each number was measured on. Recognised names (and aliases):
``fvu``, ``l0``, ``dead_fraction`` (``dead_frac``, ``frac_dead``, ``dead_latents_fraction``) and
``delta_loss`` (``delta_ce``, ``ce_loss_increase``, ``downstream_delta_loss``). The dataset and the
number of training tokens come from ``training_info["dataset"]`` and ``training_info["tokens"]``
(or ``training_tokens`` / ``tokens_trained``) unless given.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_args import add_push_args  # noqa: F401  (defined without torch, for `--help`)
from .hub_card import (
    CARD_METRICS,
    DEFAULT_LICENSE,
    LIBRARY_NAME,
    TEMPLATE_NAME,
    card_metrics,
    card_metrics_and_split,
    collect_metrics,
    describe_dataset,
    hub_dataset_id,
    read_metrics_file,
    render_model_card,
    template_path,
)
from .hub_layout import (
    CODE_FILES,
    DASHBOARD_DIR,
    INDEX_FILE,
    _index_at,
    _local_or_snapshot,
    _sort_key,
    _weight_patterns,
    check_local_sae_path,
    explain_missing_sae,
    hook_point_folder,
    looks_local,
    repo_hook_points,
)
from .hub_push import push_to_hub, save_for_hub

if TYPE_CHECKING:
    from .modeling_sae import SparseAutoencoder


def _sae_class():
    """The model class, imported on first use so that ``hf-sae push --help`` loads no transformers (the model
    never imports this module: it calls :mod:`hf_sae.hub_layout` and :mod:`hf_sae.hub_push`)."""
    from .modeling_sae import SparseAutoencoder

    return SparseAutoencoder


def load_all(
    repo_or_path,
    pattern: str | Sequence[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir=None,
    token=None,
    local_files_only: bool = False,
    endpoint: str | None = None,
    **from_pretrained_kwargs,
) -> dict[str, SparseAutoencoder]:
    """Load every SAE of a repo (or local folder) as ``{hook point: SparseAutoencoder}``, in forward order.

    Args:
        repo_or_path: Hub repo id or a local folder with the layout of :func:`save_for_hub`.
        pattern: keep only hook points matching this glob (``"layers.*.resid_post"``) or any of these
            globs / exact names. ValueError if nothing matches.
        revision, cache_dir, token, local_files_only, endpoint: as in ``huggingface_hub.snapshot_download``.
            Only the selected folders' files are downloaded, all from one revision.
        **from_pretrained_kwargs: passed to ``SparseAutoencoder.from_pretrained`` (e.g. ``torch_dtype``).
    """
    kw = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only, endpoint=endpoint)
    root, folders = _index_at(repo_or_path, **kw)
    if not os.path.isdir(str(repo_or_path)) and re.fullmatch(r"[0-9a-f]{40}", root.name):
        kw["revision"] = root.name  # the snapshot's commit: index and weights come from the same revision
    if not folders:  # perhaps another library's layout (SAELens, sparsify, Gemma Scope, dictionary_learning)
        foreign = _load_foreign(repo_or_path, pattern, kw, from_pretrained_kwargs)
        if foreign:
            return foreign
        raise ValueError(
            f"{repo_or_path} holds no hf_sae SAE (no {INDEX_FILE} and no config.json with "
            "model_type 'hf_sae') and no SAE folder in another library's format."
        )
    if pattern is not None:
        pats = [pattern] if isinstance(pattern, str) else list(pattern)
        folders = {hp: f for hp, f in folders.items() if any(fnmatch.fnmatchcase(hp, p) for p in pats)}
        if not folders:
            raise ValueError(
                f"No hook point of {repo_or_path} matches {pats}; available: {list(_index_at(repo_or_path, **kw)[1])}."
            )
    patterns = sorted({p for f in folders.values() for p in _weight_patterns(f)})
    root = _local_or_snapshot(repo_or_path, patterns, **kw)
    out = {}
    for hp, folder in folders.items():
        path = root / folder if folder else root
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{repo_or_path}: the folder {folder or '.'!r} of hook point {hp!r} has no "
                "config.json; the repo is incomplete."
            )
        out[hp] = _sae_class().from_pretrained(path, **from_pretrained_kwargs)
    return out


def _load_foreign(repo_or_path, pattern, kw: dict, from_pretrained_kwargs: dict) -> dict[str, SparseAutoencoder]:
    """{hook point (or folder): SAE} of the foreign-format folders of a repo (hf_sae.pretrained), converted and
    cached; ``pattern`` selects by folder name, else by hook point after conversion."""
    from . import pretrained

    folders = pretrained.find_foreign_folders(
        repo_or_path,
        revision=kw["revision"],
        token=kw["token"],
        local_files_only=kw["local_files_only"],
        cache_dir=kw["cache_dir"],
    )
    pats = None if pattern is None else ([pattern] if isinstance(pattern, str) else list(pattern))
    if pats and any(fnmatch.fnmatchcase(f, p) for f in folders for p in pats):
        folders = {f: v for f, v in folders.items() if any(fnmatch.fnmatchcase(f, p) for p in pats)}
    load_kw = {k: v for k, v in kw.items() if k != "endpoint" and v is not None}
    out = {}
    for folder in folders:
        sae = pretrained.load_pretrained(str(repo_or_path), folder or None, **load_kw, **from_pretrained_kwargs)
        name = sae.config.hook_point or folder
        if pats is None or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(folder, p) for p in pats):
            out[name] = sae
    if folders and not out:
        raise ValueError(f"No SAE of {repo_or_path} matches {pats}; its folders: {list(folders)}.")
    return dict(sorted(out.items(), key=lambda item: _sort_key(item[0])))


def load_sae(repo_or_path, hook_point: str | None = None, **kwargs) -> SparseAutoencoder:
    """Load one SAE of a repo or local folder: the one at ``hook_point``, or the only one there is.
    ValueError lists the hook points when the choice is ambiguous or the hook point is absent.
    Keyword arguments are those of :func:`load_all`."""
    hps = repo_hook_points(
        repo_or_path,
        **{k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "endpoint") if k in kwargs},
    )
    if hook_point is None:
        if len(hps) != 1:
            raise ValueError(
                f"{repo_or_path} holds {len(hps)} SAEs {list(hps)}; pass hook_point=... (or use load_all)."
            )
        hook_point = next(iter(hps))
    if hook_point not in hps:
        raise ValueError(f"{repo_or_path} has no SAE at hook point {hook_point!r}; available: {list(hps)}.")
    return load_all(repo_or_path, [hook_point], **kwargs)[hook_point]


def _collect_saved(paths: Sequence[str]) -> dict[str, SparseAutoencoder] | SparseAutoencoder:
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            found.append(p)
        elif p.is_dir():
            subs = sorted(c.parent for c in p.glob("*/config.json"))
            if not subs:
                raise FileNotFoundError(f"{p} holds neither a saved SAE (config.json) nor subfolders with one.")
            found.extend(subs)
        else:
            raise FileNotFoundError(f"{p} does not exist or is not a folder.")
    saes = [_sae_class().from_pretrained(p) for p in found]
    if len(saes) == 1:
        return saes[0]
    out = {}
    for path, sae in zip(found, saes):
        hp = sae.config.hook_point or path.name
        if hp in out:
            raise ValueError(f"Two SAEs for hook point {hp!r} ({path}); push one SAE per hook point.")
        out[hp] = sae
    return out


def _dashboards_by_hook_point(sites: Sequence[str], saes) -> dict[str, str]:
    """{hook point: site} from the hook point each site records (its data/meta.js)."""
    from .dashboard.site import is_site, read_data

    out = {}
    for site in sites:
        if not is_site(site):
            raise FileNotFoundError(
                f"--dashboard {site} is not a feature-browser site (index.html + data/meta.js); "
                "build it with `hf-sae dashboard SAE --out DIR`."
            )
        hp = read_data(Path(site) / "data" / "meta.js").get("hook_point")
        if not isinstance(saes, Mapping):  # one SAE
            hp = saes.config.hook_point or hp
        out[hp] = site
    return out


def run_push(args: argparse.Namespace) -> int:
    """``hf-sae push``: load saved SAEs and push them (or, with --dry-run, write the repo layout)."""
    saes = _collect_saved(args.paths)
    metrics = None
    for path in args.metrics or []:
        metrics = {**(metrics or {}), **read_metrics_file(path)}
    if args.license is None:
        print(
            f"[hf-sae push] card license: {DEFAULT_LICENSE} (the default; pass --license to confirm or change it)",
            file=sys.stderr,
        )
    meta = dict(
        layout=args.layout,
        metrics=metrics,
        base_model=args.base_model,
        dataset=args.dataset,
        training_tokens=args.training_tokens,
        license=args.license,
        dashboards=_dashboards_by_hook_point(args.dashboard or [], saes),
    )
    if args.dry_run:
        out = save_for_hub(saes, args.dry_run, repo_id=args.repo_id, **meta)
        print(f"wrote the repository layout of {args.repo_id} to {out}")
        return 0
    info = push_to_hub(
        saes,
        args.repo_id,
        private=args.private or None,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        **meta,
    )
    print(f"pushed to {args.repo_id}: {info.commit_url}")
    return 0


__all__ = [
    "LIBRARY_NAME",
    "TEMPLATE_NAME",
    "INDEX_FILE",
    "DASHBOARD_DIR",
    "CODE_FILES",
    "CARD_METRICS",
    "DEFAULT_LICENSE",
    "template_path",
    "hook_point_folder",
    "collect_metrics",
    "card_metrics_and_split",
    "read_metrics_file",
    "hub_dataset_id",
    "describe_dataset",
    "render_model_card",
    "card_metrics",
    "save_for_hub",
    "push_to_hub",
    "repo_hook_points",
    "load_all",
    "load_sae",
    "add_push_args",
    "run_push",
    "looks_local",
    "check_local_sae_path",
    "explain_missing_sae",
]
