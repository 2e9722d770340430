"""The model card of an SAE repository: the metrics it reports (from ``hf-sae eval`` files or the
trainer's ``config.training_info``; see :mod:`hf_sae.hub`), the template rendering and parsing back.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_args import DEFAULT_LICENSE  # noqa: F401  (one place, torch-free for --help)
from .hub_layout import _sort_key

if TYPE_CHECKING:
    from .modeling_sae import SparseAutoencoder

TEMPLATE_NAME = "sae_card.md"
LIBRARY_NAME = "hf_sae"
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


def template_path() -> Path:
    """Path of the model-card template (``hf_sae/templates/sae_card.md``; ``model_cards/sae_card.md`` in the
    source tree links to it)."""
    path = Path(__file__).resolve().parent / "templates" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"The model-card template {path} is missing; reinstall hf_sae (it ships as package data)."
        )
    return path


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


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _eval_results(hook_points: list, entries: list, dataset) -> list:
    """The model-index results: one per (hook point, recorded card metric)."""
    from huggingface_hub import EvalResult

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
    return eval_results


def _table_rows(hook_points: list, entries: list) -> list[str]:
    """The card's table: one markdown row per SAE."""
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
    return rows


def _training_lines(entries: list, base_model, dataset, training_tokens, license: str,
                    license_confirmed: bool) -> list[str]:
    """The card's "Training" bullet list."""
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
    return training


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
    from huggingface_hub import ModelCardData

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

    eval_results = _eval_results(hook_points, entries, dataset)
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
    training = _training_lines(entries, base_model, dataset, training_tokens, license, license_confirmed)
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
        table="\n".join(_table_rows(hook_points, entries)),
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


__all__ = ["CARD_METRICS", "DEFAULT_LICENSE", "template_path", "collect_metrics", "card_metrics_and_split",
           "read_metrics_file", "hub_dataset_id", "describe_dataset", "render_model_card", "card_metrics"]
