"""``hf-sae dashboard SAE --n-tokens N --out DIR``: build the static feature browser of one SAE.

Python use::

    from hf_sae.dashboard import build_dashboard
    info = build_dashboard(sae, "site/", n_tokens=20000)      # model/tokenizer default to the SAE's base model
    # open site/index.html (file://) or serve the folder with any static server

One LM pass over held-out text (``hf_sae.dashboard.collect``), then the logit effects of every decoder
row, decoder-cosine neighbours, N2G explanations for ``n2g_latents`` latents, the "which latents fire"
view of ``texts``, and the site files (``hf_sae.dashboard.site``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from ..cli_args import add_dashboard_args  # noqa: F401  (the arguments, defined without torch)

__all__ = ["DEFAULT_TEXTS", "build_dashboard", "add_dashboard_args", "run_dashboard"]

DEFAULT_TEXTS = (
    "In the beginning God created the heaven and the earth.",
    "The quick brown fox jumps over the lazy dog, and then it runs away.",
    "def add(a, b):\n    return a + b",
    "Paris is the capital of France. Its population was 2,102,650 in 2023.",
)


def _text_view(
    sae, model, tokenizer, hook: str, texts: Sequence[str], max_code_width: int, device, per_token: int = 5
) -> list[dict]:
    """[{text, tokens, latents}] with each token's ``per_token`` strongest latents ([[latent, act], ...]);
    position 0 (BOS) and special tokens get none."""
    from hf_sae.data.corpus import token_mask
    from hf_sae.hooks import run_with_capture

    from .collect import sparse_codes

    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(([bos] if bos is not None else []) + list(ids), dtype=torch.long)[None]
        keep = token_mask(ids, tokenizer)
        acts = run_with_capture(model, ids.to(device), [hook])[hook][0]
        v, i = sparse_codes(sae, acts.float(), max_code_width)
        v, i = v.cpu(), i.cpu()
        m = min(per_token, v.shape[1])
        tv, tj = v.topk(m, dim=-1)
        lat = i.gather(-1, tj)
        rows = []
        for t in range(ids.shape[1]):
            rows.append(
                [[int(a), round(float(b), 3)] for a, b in zip(lat[t].tolist(), tv[t].tolist()) if b > 0]
                if keep[0, t]
                else []
            )
        out.append({"text": text, "tokens": [tokenizer.decode([int(t)]) for t in ids[0].tolist()], "latents": rows})
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stages:
    """Wall and CPU seconds (``time.process_time``: all threads of this process) of the build's stages."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self._t0 = (time.perf_counter(), time.process_time())
        self._open = None

    def start(self, name: str) -> None:
        self._open = (name, time.perf_counter(), time.process_time())

    def stop(self) -> None:
        name, w, c = self._open
        self.wall[name] = time.perf_counter() - w
        self.cpu[name] = time.process_time() - c

    def finish(self) -> None:
        self.wall["total"] = time.perf_counter() - self._t0[0]
        self.cpu["total"] = time.process_time() - self._t0[1]


@torch.no_grad()
def build_dashboard(
    sae,
    out,
    *,
    model=None,
    tokenizer=None,
    model_name: Optional[str] = None,
    hook_point: Optional[str] = None,
    dataset: str = "default",
    split: str = "validation",
    text_column: str = "text",
    n_tokens: int = 20_000,
    window: int = 128,
    batch_size: int = 8,
    top_k: int = 10,
    n_samples: int = 10,
    before: int = 8,
    after: int = 3,
    n2g_latents: int = 512,
    n2g_tokens: int = 20_000,
    texts: Sequence[str] = DEFAULT_TEXTS,
    seed: int = 0,
    device="cpu",
    sae_label: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Build the feature browser of ``sae`` into ``out``; returns a summary dict (paths, sizes, timings,
    peak resident memory) also written to ``out/build_info.json``.

    Args:
        sae: a :class:`~hf_sae.SparseAutoencoder`.
        model, tokenizer: the LM (default: ``model_name`` or the SAE's ``config.base_model``, else the embedded
            SmolLM2-135M).
        hook_point: default ``sae.config.hook_point``.
        dataset, split, text_column: the text source (``hf_sae.data.corpus.load_texts``); held-out split by default.
        n_tokens: kept tokens to read (position 0 and special tokens do not count).
        top_k, n_samples: top-activating contexts and random (quantile) samples kept per latent.
        before, after: context tokens shown around the activating token.
        n2g_latents: N2G explanations for all latents when n <= n2g_latents, else for a seeded random sample.
        n2g_tokens: tokens the N2G explanations are built and scored on (even windows build, odd test).
        texts: texts for the "which latents fire on this text" view.
    """
    from hf_sae.evaluation.inputs import MAX_CODE_WIDTH, finite_or_none, kept_windows, load_lm_for
    from hf_sae.evaluation.n2g import n2g_evaluate

    from .collect import collect_features, logit_effects, nearest_latents
    from .site import site_size, write_site

    for name, value in (("n_tokens", n_tokens), ("window", window), ("batch_size", batch_size), ("top_k", top_k)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if n_samples < 0 or before < 0 or after < 0 or n2g_latents < 0 or n2g_tokens < 0:
        raise ValueError("n_samples, before, after, n2g_latents and n2g_tokens must be >= 0.")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string.")
    clock = _Stages()
    device = torch.device(device)
    sae = sae.to(device).eval()
    cfg = sae.config
    model, tokenizer, hook, model_name = load_lm_for(sae, model, tokenizer, hook_point, model_name, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    clock.start("tokenize")
    ids, keep = kept_windows(dataset, tokenizer, n_tokens, window=window, split=split, text_column=text_column,
                             command="dashboard")
    ids, keep = ids[: int(keep.any(-1).nonzero().max()) + 1], keep[: int(keep.any(-1).nonzero().max()) + 1]
    n = cfg.n_latents
    g = torch.Generator().manual_seed(seed)
    chosen = list(range(n)) if n <= n2g_latents else sorted(torch.randperm(n, generator=g)[:n2g_latents].tolist())
    clock.stop()

    clock.start("collect")
    st = collect_features(
        sae,
        model,
        ids,
        keep,
        hook,
        top_k=top_k,
        n_samples=n_samples,
        before=before, after=after, batch_size=batch_size, n2g_latents=chosen, n2g_tokens=n2g_tokens,
        max_code_width=MAX_CODE_WIDTH, seed=seed, device=device, progress=progress,
    )
    clock.stop()
    for part, (wall, cpu) in st.seconds.items():
        clock.wall[f"of_which_{part}"], clock.cpu[f"of_which_{part}"] = wall, cpu

    clock.start("logits_and_neighbours")
    W_dec = sae.W_dec.detach()
    logits = logit_effects(W_dec, model)
    near = nearest_latents(W_dec)
    clock.stop()

    clock.start("n2g")
    n2g = {}
    if st.n2g_acts is not None and st.n2g_rows >= 2:
        r = st.n2g_rows
        n_ids = ids[:r]
        base = max(len(tokenizer), int(ids.max()) + 1)
        train_rows = torch.arange(r) % 2 == 0
        exps = n2g_evaluate(
            n_ids, keep[:r], train_rows, st.n2g_acts, st.n2g_latents, vocab_size=base, progress=progress
        )
        # NaN (no held-out firing to score) -> None: the site's data is strict JSON
        n2g = {e.latent: finite_or_none(e.to_dict(tokenizer, base)) for e in exps if e.patterns}
    clock.stop()

    clock.start("write_site")
    text_view = _text_view(sae, model, tokenizer, hook, list(texts), MAX_CODE_WIDTH, device)
    meta = {
        "title": sae_label or f"{model_name} {hook}",
        "model": model_name,
        "hook_point": hook,
        "activation": cfg.activation,
        "k": cfg.k,
        "d_in": cfg.d_in,
        "dataset": dataset,
        "split": split,
        "n2g_latents": len(chosen),
        "n2g_tokens": int(keep[: st.n2g_rows].sum()) if st.n2g_rows else 0,
    }
    write_site(st, out, tokenizer, meta=meta, logits=logits, near=near, n2g=n2g, texts=text_view, progress=progress)
    clock.stop()
    clock.finish()
    info = {
        "out": str(out),
        "index_html": str((out / "index.html").resolve()),
        "n_latents": n,
        "n_tokens": st.n_tokens,
        "n_windows": int(ids.shape[0]),
        "window": window,
        "site_bytes": site_size(out),
        "n_files": sum(1 for f in out.rglob("*") if f.is_file()),
        "n2g_explained": len(n2g),
        "dead_latents": int((st.count == 0).sum()),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "timings_s": {k: round(v, 2) for k, v in clock.wall.items()},
        "cpu_seconds": {k: round(v, 2) for k, v in clock.cpu.items()},
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    return info


def run_dashboard(args: argparse.Namespace) -> int:
    from hf_sae.evaluation.inputs import load_sae

    sae = load_sae(args.sae_path, args.subfolder, torch.device(args.device))
    out = Path(args.out) if args.out else Path(f"dashboard_{Path(str(args.sae_path)).name or 'sae'}")
    info = build_dashboard(
        sae,
        out,
        model_name=args.model,
        hook_point=args.hook_point,
        dataset=args.dataset,
        split=args.split,
        text_column=args.text_column,
        n_tokens=args.n_tokens,
        window=args.window,
        batch_size=args.batch_size,
        top_k=args.top_k,
        n_samples=args.samples,
        before=args.context[0],
        after=args.context[1],
        n2g_latents=args.n2g_latents,
        n2g_tokens=args.n2g_tokens,
        texts=args.texts or DEFAULT_TEXTS,
        seed=args.seed,
        device=args.device,
        sae_label=str(args.sae_path),
        progress=not args.no_progress,
    )
    print(
        f"[hf-sae dashboard] {info['n_latents']} latents over {info['n_tokens']} tokens in "
        f"{info['timings_s']['total']:.1f} s; site {info['site_bytes'] / 1e6:.1f} MB: {info['index_html']}"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m hf_sae.dashboard.build SAE [options]`` (same as ``hf-sae dashboard``)."""
    parser = argparse.ArgumentParser(prog="hf-sae dashboard", description="Build the static feature browser of an SAE.")
    return run_dashboard(add_dashboard_args(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
