"""Exactness of every importer at a released SAE's size: float32 checkpoints written in each library's own file
layout (GPT-2-like d = 768), converted to a float32 hf_sae SAE, compared in the caller's units with the library's
reference forward in float64 (``hf_sae.convert.reference_forward``, which follows each released version's code);
the converted SAE runs in float64 (the conversion's own exactness) and in float32.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_importers.py [--d 768] [--n 8192] [--tokens 512] [--out FILE]

Prints (and writes, with --out) a Markdown table: per case and for the converted SAE in float64 and in float32, the
max |error| of latents and reconstructions relative to the reference's largest value, whether
``allclose(atol=rtol=1e-4)`` holds, and the fraction of tokens whose set of active latents is identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hf_sae import convert as C


def _r(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _saelens(folder: Path, g, d, n, arch, **cfg_extra):
    W_dec = _r(g, n, d) / d ** 0.5
    sd = {"W_enc": W_dec.T.contiguous() * 2, "b_enc": _r(g, n, scale=0.1) - 0.2, "W_dec": W_dec,
          "b_dec": _r(g, d, scale=0.2)}
    if arch == "jumprelu":
        sd["threshold"] = _r(g, n).abs() * 0.5
    cfg = {"architecture": arch, "d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.6.hook_resid_post", "model_name": "gpt2"},
           **cfg_extra}
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, {}


def _saelens_pre6_oai(folder: Path, g, d, n):
    folder, _ = _saelens(folder, g, d, n, "topk")
    cfg = {"d_in": d, "d_sae": n, "hook_name": "blocks.6.hook_resid_post", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 32}, "apply_b_dec_to_input": True, "normalize_activations": "layer_norm"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, {}


def _sparsify(folder: Path, g, d, n):
    folder.mkdir(parents=True)
    W = _r(g, n, d) / d ** 0.5
    save_file({"encoder.weight": W * 2, "encoder.bias": _r(g, n, scale=0.1), "W_dec": W, "b_dec": _r(g, d, scale=0.2)},
              str(folder / "sae.safetensors"))
    cfg = {"expansion_factor": n // d, "normalize_decoder": True, "num_latents": n, "k": 32, "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": d}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, {}


def _openai(folder: Path, g, d, n, topk: bool):
    folder.mkdir(parents=True)
    W = _r(g, n, d) / d ** 0.5
    sd = {"pre_bias": _r(g, d, scale=0.2), "encoder.weight": W * 2, "latent_bias": _r(g, n, scale=0.1),
          "decoder.weight": W.T.contiguous(), "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
          "latents_activation_frequency": torch.ones(n), "latents_mean_square": torch.zeros(n)}
    if topk:  # what Autoencoder.state_dict() of openai/sparse_autoencoder emits for a TopK autoencoder
        sd.update({"activation.k": 32, "activation.postact_fn": "ReLU", "activation": "TopK",
                   "activation_state_dict": {"k": 32, "postact_fn": "ReLU"}})
    else:
        sd.update({"activation": "ReLU", "activation_state_dict": {}})
    torch.save(sd, folder / "6.pt")
    return folder / "6.pt", {}


def _gemmascope(folder: Path, g, d, n):
    folder.mkdir(parents=True)
    W = _r(g, n, d) / d ** 0.5
    np.savez(folder / "params.npz", W_enc=(W.T * 2).numpy(), W_dec=W.numpy(), b_enc=(_r(g, n, scale=0.1) - 0.2).numpy(),
             b_dec=_r(g, d, scale=0.2).numpy(), threshold=(_r(g, n).abs() * 0.5).numpy())
    return folder, {}


def _dl(folder: Path, g, d, n, cls, **opts):
    folder.mkdir(parents=True)
    W = _r(g, n, d) / d ** 0.5
    if cls == "JumpReluAutoEncoder":
        sd = {"W_enc": W.T.contiguous() * 2, "b_enc": _r(g, n, scale=0.1),
              "W_dec": W * torch.rand(n, 1, generator=g) * 3,
              "b_dec": _r(g, d, scale=0.2), "threshold": _r(g, n).abs() * 0.5}
    else:
        sd = {"encoder.weight": W * 2, "encoder.bias": _r(g, n, scale=0.1), "decoder.weight": W.T.contiguous(),
              "b_dec": _r(g, d, scale=0.2), "k": torch.tensor(32), "threshold": torch.tensor(0.4)}
    torch.save(sd, folder / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": d, "dict_size": n, "layer": 6, "lm_name": "gpt2"}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder, opts


CASES = {
    "SAELens standard": lambda f, g, d, n: _saelens(f, g, d, n, "standard"),
    "SAELens topk": lambda f, g, d, n: _saelens(f, g, d, n, "topk", k=32),
    "SAELens topk, rescale_acts_by_decoder_norm": lambda f, g, d, n: _saelens(f, g, d, n, "topk", k=32,
                                                                              rescale_acts_by_decoder_norm=True),
    "SAELens jumprelu": lambda f, g, d, n: _saelens(f, g, d, n, "jumprelu"),
    "SAELens topk, layer_norm": lambda f, g, d, n: _saelens(f, g, d, n, "topk", k=32,
                                                            normalize_activations="layer_norm"),
    "SAELens pre-6 cfg (OpenAI v5 on the Hub), layer_norm": _saelens_pre6_oai,
    "sparsify 1.3.3 topk": _sparsify,
    "OpenAI TopK (real state_dict keys, layer norm)": lambda f, g, d, n: _openai(f, g, d, n, True),
    "OpenAI ReLU": lambda f, g, d, n: _openai(f, g, d, n, False),
    "Gemma Scope JumpReLU": _gemmascope,
    "dictionary_learning AutoEncoderTopK": lambda f, g, d, n: _dl(f, g, d, n, "AutoEncoderTopK"),
    "dictionary_learning BatchTopKSAE (threshold)": lambda f, g, d, n: _dl(f, g, d, n, "BatchTopKSAE"),
    "dictionary_learning BatchTopKSAE (use_threshold=False)": lambda f, g, d, n: _dl(f, g, d, n, "BatchTopKSAE",
                                                                                     use_threshold=False),
    "dictionary_learning JumpReLU 0.1.0": lambda f, g, d, n: _dl(f, g, d, n, "JumpReluAutoEncoder"),
    "dictionary_learning JumpReLU before 0.1.0": lambda f, g, d, n: _dl(f, g, d, n, "JumpReluAutoEncoder",
                                                                        dictionary_learning_version="0.0.9"),
}


def _compare(sae, x: torch.Tensor, ref) -> dict:
    with torch.no_grad():
        out = sae.train(ref.batch_mode)(x.to(sae.W_enc.dtype), return_dense=True)
    lat, rec = out.latents.double(), out.reconstruction.double()
    return {"latents": float((lat - ref.latents).abs().max() / ref.latents.abs().max()),
            "reconstruction": float((rec - ref.reconstruction).abs().max() / ref.reconstruction.abs().max()),
            "allclose": bool(torch.allclose(lat, ref.latents, atol=1e-4, rtol=1e-4)
                             and torch.allclose(rec, ref.reconstruction, atol=1e-4, rtol=1e-4)),
            "same_support": float(((lat != 0) == (ref.latents != 0)).all(-1).double().mean())}


def measure(name, make, d, n, tokens, tmp: Path) -> dict:
    """The converted SAE in float64 (the conversion's exactness: same support expected) and cast to float32 (what
    a user runs: threshold / top-k boundary cases may flip by one rounding), both against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    path, opts = make(tmp / name.replace(" ", "_").replace("/", "_"), g, d, n)
    t0 = time.perf_counter()
    sae = C.convert(path, dtype=torch.float64, check=True, **opts)
    seconds = time.perf_counter() - t0
    # LM-like inputs: an offset direction plus noise, token norms spread over a decade
    x = ((_r(g, tokens, d) + 2 * _r(g, 1, d)) * torch.logspace(-0.5, 0.5, tokens)[:, None]).double()
    ref = C.reference_forward(C.read_checkpoint(path, **opts), x, **opts)
    f64 = _compare(sae, x, ref)
    f32 = _compare(sae.float(), x, ref)
    return {"case": name, "activation": sae.config.activation, "input_norm": sae.config.input_norm,
            **{f"f64_{k}": v for k, v in f64.items()}, **{f"f32_{k}": v for k, v in f32.items()}, "convert_s": seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in CASES.items():
            rows.append(measure(name, make, args.d, args.n, args.tokens, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"d = {args.d}, n = {args.n}, {args.tokens} tokens, float32 checkpoints; the converted SAE in float64 "
             "and in float32 against the library's forward in float64, caller's units "
             "(max |error| / max |reference|).", "",
             "| case | hf_sae activation | input_norm | "
             "float64: err latents / reconstruction, allclose 1e-4, same support | "
             "float32: err latents / reconstruction, allclose 1e-4, same support | convert + check (s) |",
             "|---|---|---|---|---|---|"]

    def cell(r, p):
        return (f"{r[p + 'latents']:.1e} / {r[p + 'reconstruction']:.1e}, {'yes' if r[p + 'allclose'] else 'NO'}, "
                f"{r[p + 'same_support']:.4f}")

    lines += [f"| {r['case']} | {r['activation']} | {r['input_norm']} | {cell(r, 'f64_')} | {cell(r, 'f32_')} | "
              f"{r['convert_s']:.1f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
