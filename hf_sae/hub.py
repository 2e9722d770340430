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
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_args import DEFAULT_LICENSE, add_push_args  # noqa: F401  (defined without torch, for `--help`)
from .hooks import hook_point_sort_key, parse_hook_point

if TYPE_CHECKING:
    from .modeling_sae import SparseAutoencoder


def _sae_class():
    """The model class, imported on first use (``hf-sae push --help`` needs no transformers)."""
    from .modeling_sae import SparseAutoencoder

    return SparseAutoencoder

INDEX_FILE = "sae_index.json"
DASHBOARD_DIR = "dashboard"
CODE_FILES = ("configuration_sae.py", "modeling_sae.py", "activations.py")
TEMPLATE_NAME = "sae_card.md"
LIBRARY_NAME = "hf_sae"

# (key, display name, aliases looked up in metrics dicts / training_info)
CARD_METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("fvu", "FVU", ("fvu", "FVU", "fraction_variance_unexplained")),
    ("l0", "L0", ("l0", "L0", "mean_l0")),
    ("dead_fraction", "Dead latent fraction", ("dead_fraction", "dead_frac", "frac_dead", "dead_latents_fraction")),
    ("delta_loss", "Δ loss (nats/token)", ("delta_loss", "delta_ce", "ce_loss_increase", "downstream_delta_loss")),
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TOKENS_KEYS = ("tokens", "training_tokens", "tokens_trained", "n_tokens")
_DATASET_KEYS = ("dataset", "dataset_name", "dataset_path")


# --------------------------------------------------------------------------------------------- helpers
def template_path() -> Path:
    """Path of the model-card template (``hf_sae/templates/sae_card.md``; ``model_cards/sae_card.md`` in the
    source tree links to it)."""
    path = Path(__file__).resolve().parent / "templates" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"The model-card template {path} is missing; reinstall hf_sae (it ships as package data)."
        )
    return path


def hook_point_folder(hook_point: str) -> str:
    """The repository folder of a hook point: the hook-point string itself (``"layers.6.resid_post"``).
    Raises ValueError (listing the valid forms) for a malformed hook point."""
    parse_hook_point(hook_point)
    return hook_point


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _metric_sources(sae: SparseAutoencoder, metrics: Mapping[str, Any] | None) -> list[list]:
    """Candidate metric dicts as ``[[mapping, ...], split]`` groups, best first (see the module docstring)."""
    if metrics is not None:
        return [[[metrics], metrics.get("split")]]
    info = dict(sae.config.training_info or {})
    groups = []
    final = info.get("final_metrics")
    if isinstance(final, Mapping):
        for prefix, split in (("eval_", info.get("eval_split") or "validation"), ("train_", "train")):
            groups.append([[{k[len(prefix) :]: v for k, v in final.items() if k.startswith(prefix)}], split])
    nested = [info["metrics"]] if isinstance(info.get("metrics"), Mapping) else []
    groups.append([nested + [info], (nested[0].get("split") if nested else None) or info.get("split")])
    return groups


def card_metrics_and_split(
    sae: SparseAutoencoder, metrics: Mapping[str, Any] | None = None
) -> tuple[dict[str, float], str | None]:
    """``(metrics, split)``: the card metrics of one SAE (see :func:`collect_metrics`) and the split they
    were measured on (``None`` if unrecorded). Numbers of one split are never mixed with another's."""
    for sources, split in _metric_sources(sae, metrics):
        out: dict[str, float] = {}
        for key, _, aliases in CARD_METRICS:
            for source in sources:
                hit = next((a for a in aliases if a in source and source[a] is not None), None)
                if hit is not None:
                    out[key] = _finite_number(source[hit], f"metric {hit!r} of hook point {sae.config.hook_point!r}")
                    break
        if out:
            return out, split
    return {}, None


def collect_metrics(sae: SparseAutoencoder, metrics: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The card metrics of one SAE: ``{"fvu", "l0", "dead_fraction", "delta_loss"}`` (those known).

    Taken from ``metrics`` when given, else from ``sae.config.training_info`` (the trainer's held-out
    ``final_metrics.eval_*``, else its ``final_metrics.train_*``, else the ``"metrics"`` dict and the top
    level), accepting the aliases listed in :data:`CARD_METRICS`. Values must be finite numbers
    (ValueError otherwise); unknown keys are ignored.
    """
    return card_metrics_and_split(sae, metrics)[0]


def read_metrics_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Card metrics from a JSON file: ``hf-sae eval``'s ``metrics.json`` (its ``summary``, labelled with the
    ``meta`` hook point, dataset and split) or ``{hook point: {fvu, l0, dead_fraction, delta_loss, split}}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"metrics file {path} does not exist (give hf-sae eval's metrics.json or a JSON "
            "{hook point: {fvu, l0, dead_fraction, delta_loss}})."
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"metrics file {path} is not valid JSON ({e}).") from None
    if isinstance(data, dict) and isinstance(data.get("summary"), dict) and isinstance(data.get("meta"), dict):
        meta = data["meta"]
        if not meta.get("hook_point"):
            raise ValueError(f"{path} (hf-sae eval output) does not name its hook point in meta.hook_point.")
        return {meta["hook_point"]: {**data["summary"], "split": meta.get("split"), "dataset": meta.get("dataset")}}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"metrics file {path} must be hf-sae eval's metrics.json or a JSON object "
            "{hook point: {metric: value}}."
        )
    return data


def hub_dataset_id(name) -> str | None:
    """``name`` if it can be a Hub dataset id (``org/name`` or a canonical ``name``), else None (local paths,
    ``default``, ``name:config`` strings, descriptions with spaces stay out of the card's metadata)."""
    if not isinstance(name, str) or name.lower() == "default" or not _HUB_DATASET_ID.fullmatch(name):
        return None
    return None if os.path.exists(name) else name


def describe_dataset(name) -> str | None:
    """A reader's label for a recorded dataset (the embedded corpus gets its real name)."""
    if name is None:
        return None
    name = str(name)
    base, _, split = name.partition(":")
    if base.lower() == "default" or name.startswith("kjv (hf_sae"):
        return "King James Bible (the corpus embedded in hf_sae)" + (f", split {split}" if split else "")
    return name


def _info_value(sae: SparseAutoencoder, keys: Sequence[str]):
    info = dict(sae.config.training_info or {})
    for key in keys:
        if info.get(key) is not None:
            return info[key]
    return None


def _index_entry(sae: SparseAutoencoder, folder: str, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = sae.config
    entry = {
        "folder": folder,
        "d_in": cfg.d_in,
        "n_latents": cfg.n_latents,
        "activation": cfg.activation,
        "k": cfg.k if cfg.activation in ("topk", "batchtopk", "topafa") else None,
        "base_model": cfg.base_model,
        "dataset": _info_value(sae, _DATASET_KEYS),
        "training_tokens": _info_value(sae, _TOKENS_KEYS),
    }
    entry["metrics"], entry["metrics_split"] = card_metrics_and_split(sae, metrics)
    entry["metrics_dataset"] = (metrics or {}).get("dataset") or (sae.config.training_info or {}).get("eval_dataset")
    return entry


def _normalise_saes(saes, layout: str) -> tuple[dict[str, SparseAutoencoder], bool]:
    """-> ({hook point: sae}, at_root)."""
    if layout not in ("auto", "root", "subfolders"):
        raise ValueError(f"layout={layout!r} is invalid; use 'auto', 'root' or 'subfolders'.")
    if isinstance(saes, _sae_class()):
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
        if not isinstance(sae, _sae_class()):
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


# --------------------------------------------------------------------------------------------- model card
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_model_card(
    index: Mapping[str, Mapping[str, Any]],
    repo_id: str,
    *,
    base_model: str | None = None,
    dataset: str | None = None,
    training_tokens: int | None = None,
    license: str | None = None,
    description: str | None = None,
) -> str:
    """The README.md text for a repo holding the SAEs described by ``index`` ({hook point: index entry},
    see :func:`save_for_hub`). YAML metadata is produced by ``huggingface_hub.ModelCardData`` (so the
    model-index parses back with ``ModelCard.load``); the body comes from the template."""
    from huggingface_hub import EvalResult, ModelCardData

    hook_points = sorted(index, key=_sort_key)
    entries = [index[hp] for hp in hook_points]
    base_model = base_model or next((e.get("base_model") for e in entries if e.get("base_model")), None)
    dataset = dataset or next((e.get("dataset") for e in entries if e.get("dataset")), None)
    if training_tokens is None:
        training_tokens = next((e.get("training_tokens") for e in entries if e.get("training_tokens")), None)
    name = repo_id.split("/")[-1]
    dataset = str(dataset) if dataset is not None else None
    license_confirmed = license is not None
    license = license or DEFAULT_LICENSE
    # Only Hub ids go into the metadata (a local path as base_model would be rejected by the Hub); the body
    # still names whatever was recorded.
    meta_base = base_model if isinstance(base_model, str) and _HUB_ID.fullmatch(base_model) else None

    eval_results = []
    for hp, entry in zip(hook_points, entries):
        for key, display, _ in CARD_METRICS:
            value = (entry.get("metrics") or {}).get(key)
            if value is None:
                continue
            measured_on = entry.get("metrics_dataset") or dataset
            eval_results.append(
                EvalResult(
                    task_type="sparse-autoencoding",
                    task_name=f"SAE reconstruction at {hp or 'the hook point'}",
                    dataset_type=hub_dataset_id(measured_on) or "activations",
                    dataset_name=describe_dataset(measured_on) or "activations",
                    dataset_config=hp or None,
                    dataset_split=entry.get("metrics_split") or None,
                    metric_type=key,
                    metric_name=display,
                    metric_value=float(value),
                )
            )
    tags = ["sparse-autoencoder", "hf_sae", "interpretability"]
    tags += sorted({f"hook-point:{hp}" for hp in hook_points if hp}, key=lambda t: _sort_key(t.split(":", 1)[1]))
    tags += sorted({f"activation:{e['activation']}" for e in entries})
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=meta_base,
        datasets=[hub_dataset_id(dataset)] if hub_dataset_id(dataset) else None,
        license=license,
        tags=tags,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
        pipeline_tag="feature-extraction",
    )

    rows = []
    for hp, e in zip(hook_points, entries):
        m = e.get("metrics") or {}
        folder = e.get("folder") or "root"
        where = f"`{hp}`" if hp and folder == hp else f"`{hp or '–'}` ({folder})"
        rows.append(
            f"| {where} | {e['d_in']} | {e['n_latents']} | {e['activation']} | "
            f"{_fmt(e.get('k'))} | {_fmt(m.get('fvu'))} | {_fmt(m.get('l0'))} | "
            f"{_fmt(m.get('dead_fraction'))} | {_fmt(m.get('delta_loss'))} |"
        )
    first = entries[0]
    subfolder_arg = f', subfolder="{first["folder"]}"' if first.get("folder") else ""
    n = len(entries)
    if description is None:
        kinds = ", ".join(sorted({e["activation"] for e in entries}))
        where = "one folder per hook point" if any(e.get("folder") for e in entries) else "at the repository root"
        description = (
            f"{n} sparse autoencoder{'s' if n > 1 else ''} ({kinds}) on the activations of "
            f"{'`' + base_model + '`' if base_model else 'a language model'}, saved with the `hf_sae` "
            f"library ({where})."
        )
    training = [
        f"- Base model: {'`' + base_model + '`' if base_model else 'not recorded'}",
        f"- Dataset: {'`' + str(dataset) + '`' if dataset else 'not recorded'}"
        + (f" ({describe_dataset(dataset)})" if dataset and describe_dataset(dataset) != dataset else ""),
        f"- Training tokens: {f'{int(training_tokens):,}' if training_tokens else 'not recorded'}",
        "- Metrics measured on: "
        + (
            ", ".join(
                sorted(
                    {
                        f"split `{e.get('metrics_split') or 'not recorded'}`"
                        + (f" of {describe_dataset(e.get('metrics_dataset'))}" if e.get("metrics_dataset") else "")
                        for e in entries
                        if e.get("metrics")
                    }
                )
            )
            or "no metrics recorded"
        ),
        f"- License: `{license}`"
        + (
            ""
            if license_confirmed
            else " (hf_sae's default, not confirmed by the uploader: check it matches "
            "the base model's and the data's terms)"
        ),
    ]
    files = "\n".join(
        f"- `{e.get('folder') or '.'}/`: `config.json`, `model.safetensors` ({hp or 'root SAE'})"
        for hp, e in zip(hook_points, entries)
    )
    files += (
        "\n- `sae_index.json`: hook point → folder, sizes and metrics\n"
        "- `configuration_sae.py`, `modeling_sae.py`, `activations.py`: model code for `trust_remote_code`"
    )
    text = template_path().read_text(encoding="utf-8")
    return text.format(
        card_data=card_data.to_yaml(),
        title=name,
        description=description,
        table="\n".join(rows),
        repo_id=repo_id,
        subfolder_arg=subfolder_arg,
        d_in=first["d_in"],
        n_latents=first["n_latents"],
        example_hook=f"`{hook_points[0]}`" if hook_points[0] else "its hook point",
        training="\n".join(training),
        files=files,
    )


def card_metrics(card) -> dict[str, dict[str, float]]:
    """Parse a model card (a ``huggingface_hub.ModelCard``, a path to README.md or its text) back to
    ``{hook point: {metric: value}}`` from its model-index."""
    from huggingface_hub import ModelCard

    if not isinstance(card, ModelCard):
        card = ModelCard.load(card) if os.path.exists(str(card)) else ModelCard(str(card))
    out: dict[str, dict[str, float]] = {}
    for r in card.data.eval_results or []:
        out.setdefault(r.dataset_config or "", {})[r.metric_type] = r.metric_value
    return out


def _sort_key(hp: str):
    try:
        return (0, *hook_point_sort_key(hp))
    except ValueError:
        return (1, 0, 0)


# --------------------------------------------------------------------------------------------- saving / pushing
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


# --------------------------------------------------------------------------------------------- loading
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


# --------------------------------------------------------------------------------------------- loading errors
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


# --------------------------------------------------------------------------------------------- CLI
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
        if isinstance(saes, SparseAutoencoder):
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
