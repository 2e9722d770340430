"""What every command that runs an SAE over text shares (``hf-sae eval``, ``hf-sae dashboard``):
loading the SAE, token windows with a kept-token mask, trimming that mask, JSON-safe numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["MAX_CODE_WIDTH", "load_sae", "load_lm_for", "collect_windows", "kept_windows", "trim_mask", "pad_cat",
           "finite_or_none"]

MAX_CODE_WIDTH = 256
"""Dense-activation SAEs (relu, jumprelu, batchtopk at inference): the code kept in memory for probes,
N2G and ablation holds each token's largest MAX_CODE_WIDTH latents (reconstruction metrics use all)."""


def load_sae(path: str, subfolder: Optional[str] = None, device="cpu"):
    """The :class:`~hf_sae.SparseAutoencoder` saved at ``path`` (a folder or Hub id), on ``device``, in eval mode.

    A missing path or SAE raises an error listing what is there (``from_pretrained``)."""
    from hf_sae import SparseAutoencoder

    p = Path(path).expanduser()
    kw = {"subfolder": subfolder} if subfolder else {}
    sae = SparseAutoencoder.from_pretrained(str(p) if p.exists() else path, **kw)
    return sae.to(device).eval()


def load_lm_for(sae, model=None, tokenizer=None, hook_point: Optional[str] = None, model_name: Optional[str] = None,
                device="cpu", placement: Optional[dict] = None) -> tuple:
    """``(model, tokenizer, hook point, model name)`` to run ``sae`` on: the given LM, else ``model_name``, the
    SAE's ``config.base_model`` or the embedded SmolLM2-135M; the hook point defaults to the SAE's. Raises a
    ValueError when there is no hook point or its width is not the SAE's ``d_in``. ``placement``: the
    ``device_map`` / ``max_memory`` / ``offload_folder`` keywords of :func:`~hf_sae.data.models.load_model`,
    for an LM larger than one device."""
    from hf_sae.data.models import DEFAULT_MODEL, load_model
    from hf_sae.hooks import hook_point_dim

    cfg = sae.config
    hook = hook_point or cfg.hook_point
    if not hook:
        raise ValueError("the SAE's config has no hook_point; pass hook_point= (--hook-point), e.g. "
                         "layers.6.resid_post.")
    model_name = model_name or cfg.base_model or DEFAULT_MODEL
    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_name, device=device, **(placement or {}))
    dim = hook_point_dim(model, hook)
    if dim != cfg.d_in:
        raise ValueError(f"hook point {hook!r} of {model_name} has width {dim} but the SAE expects d_in={cfg.d_in}.")
    return model, tokenizer, hook, model_name


def collect_windows(
    dataset: str, tokenizer, n_tokens: int, *, window: int, split: str = "validation", text_column: str = "text"
) -> torch.Tensor:
    """Token windows ``[N, window]`` whose kept positions number >= ``n_tokens`` (or all the source has)."""
    from hf_sae.data import corpus

    return corpus.windows_with_tokens(
        dataset, tokenizer, n_tokens, window=window, split=split, text_column=text_column
    )


def kept_windows(dataset: str, tokenizer, n_tokens: int, *, window: int, split: str = "validation",
                 text_column: str = "text", command: str = "eval") -> tuple:
    """``(input_ids [N, window], keep [N, window])``: windows of ``dataset``/``split`` and the mask of their first
    ``n_tokens`` kept tokens (:func:`hf_sae.data.corpus.token_mask`); prints a warning naming ``hf-sae
    {command}`` when the source has fewer."""
    from hf_sae.data import corpus

    ids = collect_windows(dataset, tokenizer, n_tokens, window=window, split=split, text_column=text_column)
    keep = corpus.token_mask(ids, tokenizer)
    if int(keep.sum()) < n_tokens:
        print(f"[hf-sae {command}] warning: {dataset!r}/{split} has only {int(keep.sum())} usable tokens "
              f"(< n_tokens {n_tokens}); using {int(keep.sum())}.", flush=True)
    return ids, trim_mask(keep, n_tokens)


def trim_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Keep only the first ``n`` True entries (row-major) of a bool ``[N, T]`` mask."""
    flat = keep.flatten().clone()
    idx = flat.nonzero().squeeze(-1)
    flat[idx[n:]] = False
    return flat.view_as(keep)


def pad_cat(chunks: list, fill=0) -> torch.Tensor:
    """Concatenate ``[n_i, w_i]`` chunks along dim 0, right-padding each to the widest ``w_i`` with ``fill``."""
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=fill) for c in chunks])


def finite_or_none(d):
    """``d`` (nested dicts/lists) with NaN/inf floats replaced by None, so that the JSON is standard."""
    if isinstance(d, dict):
        return {k: finite_or_none(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [finite_or_none(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d
