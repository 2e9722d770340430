"""Converters of other SAE libraries' formats (hf_sae.convert) and the SAELens export.

Each test writes a small synthetic checkpoint in the source's own file layout, key names and tensor
orientation, converts it, and compares the hf_sae SAE with a reference forward written here from that
library's published math (independently of hf_sae.convert's own ``_ref_*``), in float64.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_sae import SparseAutoencoder
from hf_sae import convert as C

D, N = 6, 10
F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_g(seed), dtype=F64) * scale


@pytest.fixture
def x():
    return _rand(64, D, seed=123, scale=1.3) + 0.4


def _ours(sae, x):
    with torch.no_grad():
        out = sae(x, return_dense=True)
    return out.latents, out.reconstruction


def _assert_close(a, b, tol=1e-10):
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= tol * (1 + float(b.abs().max())), err


def _topk_dense(pre, k):
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v)


# ------------------------------------------------------------------------------------------- SAELens
def _saelens_weights(seed=0, unit_dec=False):
    W_dec = _rand(N, D, seed=seed + 1, scale=0.5) + 0.05
    if unit_dec:
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return {"W_enc": _rand(D, N, seed=seed), "b_enc": _rand(N, seed=seed + 2, scale=0.3),
            "W_dec": W_dec, "b_dec": _rand(D, seed=seed + 3, scale=0.5)}


def _write_saelens(folder, cfg, sd):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _saelens_cfg(arch, **kw):
    return {"architecture": arch, "d_in": D, "d_sae": N, "dtype": "float64", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "metadata": {"sae_lens_version": "6.1.0", "model_name": "gpt2", "hook_name": "blocks.4.hook_resid_post",
                         "dataset_path": "Skylion007/openwebtext", "context_size": 128}, **kw}


def saelens_reference(cfg, sd, x, scale=1.0):
    """SAELens (sae_lens/saes/{standard,topk,jumprelu}_sae.py): sae_in = x - b_dec*apply_b_dec_to_input;
    hidden_pre = sae_in @ W_enc + b_enc; standard: relu; topk: (x ||W_dec|| if rescale) topk then relu;
    jumprelu: relu(pre) * (pre > relu(threshold)); decode: acts (* finetuning scale) (/ ||W_dec|| if rescale)
    @ W_dec + b_dec. ``expected_average_only_in``: inputs times the scaling factor, outputs divided by it."""
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":
        arch, k = "topk", cfg["activation_fn_kwargs"]["k"]
    else:
        k = cfg.get("k")
    apply = cfg.get("apply_b_dec_to_input", True)
    pre = (x * scale - sd["b_dec"] * apply) @ sd["W_enc"] + sd["b_enc"]
    norms = sd["W_dec"].norm(dim=1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * norms
    if arch == "standard":
        acts = pre.relu()
    elif arch == "topk":
        acts = _topk_dense(pre, k).relu()
    else:
        acts = pre.relu() * (pre > sd["threshold"].relu())
    dec = acts * sd.get("finetuning_scaling_factor", torch.ones(N, dtype=F64))
    if rescale:
        dec = dec / norms
    return acts, (dec @ sd["W_dec"] + sd["b_dec"]) / scale


@pytest.mark.parametrize("variant", ["standard", "standard_no_bdec_input", "topk", "topk_rescale", "jumprelu",
                                     "pre6_topk", "expected_average", "finetuning_scale", "log_threshold"])
def test_saelens_matches_its_reference(tmp_path, x, variant):
    sd = _saelens_weights(seed=7)
    cfg = _saelens_cfg("standard")
    scale, opts = 1.0, {}
    if variant == "standard_no_bdec_input":
        cfg["apply_b_dec_to_input"] = False
    elif variant == "topk":
        cfg = _saelens_cfg("topk", k=3)
    elif variant == "topk_rescale":
        cfg = _saelens_cfg("topk", k=3, rescale_acts_by_decoder_norm=True)
    elif variant in ("jumprelu", "log_threshold"):
        cfg = _saelens_cfg("jumprelu")
        sd["threshold"] = _rand(N, seed=9, scale=0.8)  # some negative: relu(theta) = 0 there (F3)
    elif variant == "pre6_topk":  # SAELens < 6 config layout
        cfg = {"d_in": D, "d_sae": N, "hook_name": "blocks.2.hook_mlp_out", "model_name": "gpt2",
               "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True,
               "normalize_activations": False, "sae_lens_training_version": "3.1.0"}
    elif variant == "expected_average":
        cfg["normalize_activations"] = "expected_average_only_in"
        scale = 0.37
        opts = {"input_scale": scale}
    elif variant == "finetuning_scale":
        cfg["finetuning_scaling_factor"] = True
        sd["scaling_factor"] = _rand(N, seed=11).abs() + 0.5
    ref_sd = dict(sd)
    if "scaling_factor" in ref_sd:
        ref_sd["finetuning_scaling_factor"] = ref_sd.pop("scaling_factor")
    if variant == "log_threshold":  # older SAELens JumpReLU checkpoints store log_threshold
        sd["log_threshold"] = sd.pop("threshold").abs().log()
        ref_sd["threshold"] = sd["log_threshold"].exp()
    folder = _write_saelens(tmp_path / variant, cfg, sd)
    assert C.detect_format(folder) == "saelens"
    sae = C.convert(folder, dtype=F64, **opts)
    ref_lat, ref_rec = saelens_reference(cfg, ref_sd, x, scale)
    lat, rec = _ours(sae, x)
    _assert_close(rec, ref_rec)
    _assert_close(lat, ref_lat)
    assert (lat != 0).any() and (lat == 0).any()  # the probe exercises both firing and silent latents
    expected_hook = {"pre6_topk": "layers.2.mlp_out"}.get(variant, "layers.4.resid_post")
    assert sae.config.hook_point == expected_hook
    assert sae.config.base_model == "gpt2"
    assert sae.config.training_info["converted_from"]["format"] == "saelens"
    if variant == "topk_rescale":  # (F2): decoder rows become unit norm
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N, dtype=F64))


def test_saelens_batchtopk_training_form(tmp_path, x):
    sd = _saelens_weights(seed=3)
    sd["topk_threshold"] = torch.tensor(0.2, dtype=F64)
    cfg = _saelens_cfg("batchtopk", k=2.5)  # rescale_acts_by_decoder_norm defaults to True for BatchTopK training
    sae = C.convert(_write_saelens(tmp_path / "b", cfg, sd), dtype=F64)
    assert sae.config.activation == "batchtopk" and sae.config.k == 2
    sae.eval()
    pre = ((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]) * sd["W_dec"].norm(dim=1)
    acts = pre.relu() * (pre > 0.2)  # SAELens' inference form of BatchTopK: JumpReLU at the batch threshold
    rec = (acts / sd["W_dec"].norm(dim=1)) @ sd["W_dec"] + sd["b_dec"]
    lat, ours = _ours(sae, x)
    _assert_close(ours, rec)
    _assert_close(lat, acts)


def _layer_norm(x):
    """SAELens 6.54.12 run_time_activation_ln_in / OpenAI LN: (x - mu) / (std + 1e-5), unbiased std."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + 1e-5), mu, std


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_saelens_layer_norm_returns_the_lm_units(tmp_path, x, arch):
    sd = _saelens_weights(seed=9)
    cfg = {**_saelens_cfg(arch, **({"k": 3} if arch == "topk" else {})), "normalize_activations": "layer_norm"}
    sae = C.convert(_write_saelens(tmp_path / arch, cfg, sd), dtype=F64)
    assert sae.config.input_norm == "layer_norm" and sae.config.input_norm_eps == 1e-5
    xs = x * torch.linspace(0.1, 30, x.shape[0], dtype=F64)[:, None] - 2  # tokens of very different norms
    xn, mu, std = _layer_norm(xs)
    acts, rec_n = saelens_reference(cfg, sd, xn)
    lat, rec = _ours(sae, xs)
    _assert_close(lat, acts)
    _assert_close(rec, rec_n * std + mu)  # run_time_activation_ln_out
    assert torch.equal(lat != 0, acts != 0)
    # and back out: the export keeps normalize_activations="layer_norm"
    back = C.convert(C.export_saelens(sae, tmp_path / "out"), dtype=F64)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    _assert_close(_ours(back, xs)[1], rec)


def test_saelens_cfg_without_architecture(tmp_path, x):
    sd = _saelens_weights(seed=3)
    cfg6 = _saelens_cfg("topk", k=3)
    del cfg6["architecture"]  # a SAELens >= 6 cfg must name it
    with pytest.raises(ValueError, match="no 'architecture' field"):
        C.convert(_write_saelens(tmp_path / "six", cfg6, sd))
    unversioned = {k: v for k, v in cfg6.items() if k != "metadata"}
    with pytest.raises(ValueError, match="'k' but no 'architecture'"):
        C.convert(_write_saelens(tmp_path / "k", unversioned, sd))
    # SAELens < 6 (no version): its handle_pre_6_0_config defaults to standard, or topk from activation_fn_str
    old = {"d_in": D, "d_sae": N, "hook_point": "blocks.4.hook_resid_post", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": True, "normalize_activations": False}
    sae = C.convert(_write_saelens(tmp_path / "old", old, sd), dtype=F64)
    assert sae.config.activation == "topk" and sae.config.k == 2
    old_relu = {k: v for k, v in old.items() if not k.startswith("activation_fn")}
    assert C.convert(_write_saelens(tmp_path / "old_relu", old_relu, sd), dtype=F64).config.activation == "relu"


def test_saelens_refuses_what_it_cannot_represent(tmp_path):
    sd = _saelens_weights()
    with pytest.raises(ValueError, match="constant_norm_rescale.*not supported"):
        C.convert(_write_saelens(tmp_path / "a", {**_saelens_cfg("standard"),
                                                  "normalize_activations": "constant_norm_rescale"}, sd))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        C.convert(_write_saelens(tmp_path / "b", _saelens_cfg("gated"), sd))
    with pytest.raises(ValueError, match="input_scale=<that factor>"):
        C.convert(_write_saelens(tmp_path / "c", {**_saelens_cfg("standard"),
                                                  "normalize_activations": "expected_average_only_in"}, sd))
    with pytest.raises(ValueError, match="needs 'k'"):
        C.convert(_write_saelens(tmp_path / "d", _saelens_cfg("topk"), sd))
    with pytest.raises(ValueError, match="per-head"):
        cfg = _saelens_cfg("standard")
        cfg["metadata"]["hook_head_index"] = 3
        C.convert(_write_saelens(tmp_path / "e", cfg, sd))


def test_saelens_bad_files(tmp_path):
    sd = _saelens_weights()
    bad = dict(sd)
    del bad["b_enc"]
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\]"):
        C.convert(_write_saelens(tmp_path / "missing", _saelens_cfg("standard"), bad))
    with pytest.raises(ValueError,
                       match=r"'W_enc' has shape \[6, 10\] but cfg.json \(d_in=6, d_sae=12\) implies \[6, 12\]"):
        C.convert(_write_saelens(tmp_path / "shape", {**_saelens_cfg("standard"), "d_sae": 12}, sd))
    with pytest.raises(ValueError, match=r"does not define \['W_skip'\]"):
        C.convert(
            _write_saelens(tmp_path / "extra", _saelens_cfg("standard"), {**sd, "W_skip": torch.eye(D, dtype=F64)})
        )
    nan = dict(sd)
    nan["W_dec"] = nan["W_dec"].clone()
    nan["W_dec"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'W_dec' contains 1 NaN"):
        C.convert(_write_saelens(tmp_path / "nan", _saelens_cfg("standard"), nan))
    folder = _write_saelens(tmp_path / "corrupt", _saelens_cfg("standard"), sd)
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        C.convert(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors not found"):
        C.convert(folder, "saelens")
    with pytest.raises(ValueError, match="no known SAE format"):
        C.convert(folder)
    (folder / "cfg.json").write_text("{not json")
    (folder / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not valid JSON"):
        C.convert(folder)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_export_round_trip(tmp_path, x, activation):
    from hf_sae import SAEConfig

    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=D,
        n_latents=N,
        activation=activation,
        k=3,
        input_scale=2.5,
        hook_point="layers.3.attn_z",
        base_model="HuggingFaceTB/SmolLM2-135M",
    )
    sae = SparseAutoencoder(cfg).to(F64).eval()
    with torch.no_grad():
        sae.b_enc.copy_(_rand(N, seed=5, scale=0.3))
        sae.b_dec.copy_(_rand(D, seed=6, scale=0.5))
        if activation == "jumprelu":
            sae.log_threshold.copy_(_rand(N, seed=8, scale=0.5) - 1.5)
        if activation == "batchtopk":
            sae.batchtopk_threshold.fill_(0.3)
    out = C.export_saelens(sae, tmp_path / "exported")
    cfg_json = json.loads((out / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == "blocks.3.attn.hook_z"
    assert cfg_json["reshape_activations"] == "hook_z"
    assert cfg_json["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(activation, activation)
    # the exported file, run through SAELens' own math, gives our SAE's outputs ...
    from safetensors.torch import load_file

    ref_lat, ref_rec = saelens_reference(cfg_json, load_file(str(out / "sae_weights.safetensors")), x)
    lat, rec = _ours(sae, x)
    _assert_close(rec, ref_rec)
    _assert_close(lat, ref_lat)
    # ... and importing it back gives the same SAE behaviour (input_scale folded into the weights).
    back = C.convert(out, dtype=F64)
    assert back.config.hook_point == "layers.3.attn_z" and back.config.base_model == "HuggingFaceTB/SmolLM2-135M"
    lat2, rec2 = _ours(back, x)
    _assert_close(rec2, rec)
    _assert_close(lat2, lat)


def test_export_refuses_topafa_and_unset_batchtopk(tmp_path):
    from hf_sae import SAEConfig

    with pytest.raises(ValueError, match="no SAELens architecture"):
        C.export_saelens(SparseAutoencoder(SAEConfig(d_in=D, n_latents=N, activation="topafa", k=None)), tmp_path / "a")
    with pytest.raises(ValueError, match="no inference threshold yet"):
        C.export_saelens(SparseAutoencoder(SAEConfig(d_in=D, n_latents=N, activation="batchtopk", k=2)), tmp_path / "b")


# ------------------------------------------------------------------------------------------- sparsify
def _write_sparsify(folder, k=3, extra_cfg=None, extra_sd=None, seed=0, n=N):
    folder.mkdir(parents=True, exist_ok=True)
    W = _rand(n, D, seed=seed)
    sd = {
        "encoder.weight": W,
        "encoder.bias": _rand(n, seed=seed + 1, scale=0.2),
        "W_dec": W / W.norm(dim=1, keepdim=True),
        "b_dec": _rand(D, seed=seed + 2, scale=0.3),
        **(extra_sd or {}),
    }
    save_file(sd, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": n,
                "k": k,
                "multi_topk": False,
                "skip_connection": False,
                "d_in": D,
                **(extra_cfg or {}),
            }
        )
    )
    return sd


def sparsify_reference(sd, k, x):
    """sparsify SparseCoder: top_acts, top_idx = topk(relu(encoder(x - b_dec)), k);
    out = sum top_acts * W_dec[idx] + b_dec."""
    pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    v, i = pre.topk(k, dim=-1)
    return _topk_dense(pre, k), torch.einsum("nk,nkd->nd", v, sd["W_dec"][i]) + sd["b_dec"]


def test_sparsify_run_folder_converts_every_hook_point(tmp_path, x):
    run = tmp_path / "run"
    sds = {
        "layers.1": _write_sparsify(run / "layers.1", seed=1),
        "layers.2.mlp": _write_sparsify(run / "layers.2.mlp", k=2, seed=2),
    }
    (run / "config.json").write_text(
        json.dumps({"model": "EleutherAI/pythia-70m", "dataset": "EleutherAI/fineweb-edu-dedup-10b"})
    )
    done = C.convert_tree(run, tmp_path / "out", dtype=torch.float64)
    assert sorted(done) == ["layers.1.resid_post", "layers.2.mlp_out"]
    for name, k, hp in (("layers.1", 3, "layers.1.resid_post"), ("layers.2.mlp", 2, "layers.2.mlp_out")):
        sae = SparseAutoencoder.from_pretrained(done[hp])
        assert sae.config.hook_point == hp and sae.config.k == k and sae.config.base_model == "EleutherAI/pythia-70m"
        ref_lat, ref_rec = sparsify_reference(sds[name], k, x)
        lat, rec = _ours(sae, x)
        _assert_close(rec, ref_rec)
        _assert_close(lat, ref_lat)


def test_sparsify_refusals_and_bad_files(tmp_path):
    _write_sparsify(tmp_path / "t", extra_cfg={"transcode": True})
    with pytest.raises(ValueError, match="transcode=true is not supported"):
        C.convert(tmp_path / "t")
    _write_sparsify(tmp_path / "g", extra_cfg={"activation": "groupmax"})
    with pytest.raises(ValueError, match="activation='groupmax' is not supported"):
        C.convert(tmp_path / "g")
    _write_sparsify(tmp_path / "s", extra_sd={"W_skip": torch.zeros(D, D, dtype=F64)})
    with pytest.raises(ValueError, match=r"does not define \['W_skip'\]"):
        C.convert(tmp_path / "s")
    _write_sparsify(tmp_path / "m", extra_cfg={"num_latents": 12})
    with pytest.raises(
        ValueError, match=r"'encoder.weight' has shape \[10, 6\] but cfg.json \(d_in=6, num_latents=12\)"
    ):
        C.convert(tmp_path / "m")
    _write_sparsify(tmp_path / "k", k=11)
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, 10\]"):
        C.convert(tmp_path / "k")


# ------------------------------------------------------------------------------------------- OpenAI
def _openai_sd(activation="TopK", k=3, tied=False, seed=0):
    enc = _rand(N, D, seed=seed).float()
    sd = {
        "pre_bias": _rand(D, seed=seed + 1, scale=0.3).float(),
        "encoder.weight": enc,
        "latent_bias": _rand(N, seed=seed + 2, scale=0.2).float(),
        "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
        "latents_activation_frequency": torch.ones(N),
        "latents_mean_square": torch.zeros(N),
        "activation": activation,
    }
    if tied:
        sd["decoder.linear.weight"] = enc
    else:
        sd["decoder.weight"] = _rand(D, N, seed=seed + 3, scale=0.4).float()
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return sd


def openai_reference(sd, x, layer_norm):
    """openai/sparse_autoencoder Autoencoder.forward: optional LN (x - mu)/(std + 1e-5) with unbiased std;
    latents = act(encoder(x - pre_bias) + latent_bias); recons = decoder(latents) + pre_bias; LN undone."""
    sd = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xin = (x - mu) / (std + 1e-5) if layer_norm else x
    pre = (xin - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    lat = _topk_dense(pre, sd["activation_state_dict"]["k"]).relu() if sd["activation"] == "TopK" else pre.relu()
    dec = sd["decoder.linear.weight"] if "decoder.linear.weight" in sd else sd["decoder.weight"].T
    rec = lat @ dec + sd["pre_bias"]
    return lat, (rec * std + mu if layer_norm else rec)


class _OpenAITopK(torch.nn.Module):
    """The module structure of openai/sparse_autoencoder's TopK activation, for its state_dict keys: the
    activation's own state_dict() adds k and the post-activation's class name under its prefix."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        sd = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        sd.update({prefix + "k": self.k, prefix + "postact_fn": "ReLU"})
        return sd


class _OpenAIAutoencoder(torch.nn.Module):
    """The attribute layout of openai/sparse_autoencoder's Autoencoder (model.py): torch's own state_dict()
    recursion over it yields exactly the keys of their released checkpoints, plus the two entries their
    state_dict() override adds ("activation", "activation_state_dict")."""

    def __init__(self, sd_values, k):
        super().__init__()
        n, d = sd_values["encoder.weight"].shape
        self.pre_bias = torch.nn.Parameter(sd_values["pre_bias"])
        self.encoder = torch.nn.Linear(d, n, bias=False)
        self.latent_bias = torch.nn.Parameter(sd_values["latent_bias"])
        self.activation = _OpenAITopK(k)
        self.decoder = torch.nn.Linear(n, d, bias=False)
        self.register_buffer("stats_last_nonzero", torch.zeros(n, dtype=torch.long))
        self.register_buffer("latents_activation_frequency", torch.ones(n))
        self.register_buffer("latents_mean_square", torch.zeros(n))
        with torch.no_grad():
            self.encoder.weight.copy_(sd_values["encoder.weight"])
            self.decoder.weight.copy_(sd_values["decoder.weight"])

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        sd = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        sd[prefix + "activation"] = "TopK"
        sd[prefix + "activation_state_dict"] = self.activation.state_dict()
        return sd


def test_openai_topk_as_released_imports_with_its_layer_norm(tmp_path, x):
    values = _openai_sd("TopK", seed=2)
    path = tmp_path / "5.pt"  # resid_post_v5_32k/autoencoders/5.pt
    torch.save(_OpenAIAutoencoder(values, k=3).state_dict(), path)
    keys = set(torch.load(path, weights_only=True))
    assert {"activation.k", "activation.postact_fn", "activation", "activation_state_dict"} <= keys
    assert C.detect_format(path) == "openai"
    sae = C.convert(path, dtype=F64)
    assert sae.config.activation == "topk" and sae.config.k == 3 and sae.config.input_norm == "layer_norm"
    xs = x * torch.linspace(0.2, 40, x.shape[0], dtype=F64)[:, None] + 1.5  # LM-like spread of token norms
    lat, rec = _ours(sae, xs)  # in the LM's units: no pre-normalisation by the caller
    ref_lat, ref_rec = openai_reference(values, xs, layer_norm=True)
    _assert_close(rec, ref_rec, tol=1e-6)  # float32 source weights
    _assert_close(lat, ref_lat, tol=1e-6)
    assert torch.equal(lat != 0, ref_lat != 0)
    # the SAE behind the layer norm, on request
    behind = C.convert(path, dtype=F64, layer_norm=False)
    assert behind.config.input_norm == "none"
    _assert_close(_ours(behind, xs)[1], openai_reference(values, xs, layer_norm=False)[1], tol=1e-6)
    # a file whose two copies of k disagree is refused
    sd = torch.load(path, weights_only=True)
    sd["activation.k"] = 4
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"activation.k=4 disagrees with activation_state_dict\['k'\]=3"):
        C.convert(path)


@pytest.mark.parametrize("tied", [False, True])
def test_openai_relu_and_tied_decoder(tmp_path, x, tied):
    path = tmp_path / "relu.pt"
    torch.save(_openai_sd("ReLU", tied=tied), path)
    sae = C.convert(path, dtype=F64, hook_point="layers.8.resid_post")
    assert sae.config.activation == "relu" and sae.config.hook_point == "layers.8.resid_post"
    lat, rec = _ours(sae, x)
    ref_lat, ref_rec = openai_reference(_openai_sd("ReLU", tied=tied), x, layer_norm=False)
    _assert_close(rec, ref_rec, tol=1e-6)  # float32 source weights: compare at float32 precision
    _assert_close(lat, ref_lat, tol=1e-6)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_openai_bad_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({**_openai_sd("ReLU"), "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="pickles a print object.*never unpickles code"):
        C.convert(path)
    torch.save(_openai_sd("ReLU"), path)
    path.write_bytes(path.read_bytes()[:300])  # cut off mid-file
    with pytest.raises(ValueError, match="is truncated or corrupt.*download or copy it again"):
        C.convert(path)
    sd = _openai_sd("ReLU")
    sd["decoder.weight"] = sd["decoder.weight"][:, :7]
    torch.save(sd, path)
    with pytest.raises(
        ValueError, match=r"'decoder.weight' has shape \[6, 7\] but encoder.weight \[10, 6\] implies \[6, 10\]"
    ):
        C.convert(path)
    sd = _openai_sd("ReLU")
    del sd["latent_bias"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing tensors \['latent_bias'\]"):
        C.convert(path)
    torch.save(_openai_sd("TopK", k=0), path)
    with pytest.raises(ValueError, match="integer activation_state_dict"):
        C.convert(path)
    torch.save({**_openai_sd("ReLU"), "activation": "Identity"}, path)
    with pytest.raises(ValueError, match="activation 'Identity' is not supported"):
        C.convert(path)


# ------------------------------------------------------------------------------------------- Gemma Scope
def test_gemmascope_hand_computed(tmp_path):
    """d=2, n=3, worked by hand: pre = x W_enc + b_enc = [2, 0.2, 1.2] for x = [2, 0.2]; threshold 0.5 keeps
    latents 0 and 2; recon = 2*[1, 0] + 1.2*[1, 1] + b_dec [1, -1] = [4.2, 0.2]."""
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=np.array([[1.0, 0, 1], [0, 1, 1]]),
        b_enc=np.array([0.0, 0, -1]),
        W_dec=np.array([[1.0, 0], [0, 1], [1, 1]]),
        b_dec=np.array([1.0, -1]),
        threshold=np.array([0.5, 0.5, 0.5]),
    )
    sae = C.convert(folder, dtype=F64)
    assert sae.config.activation == "jumprelu" and sae.config.hook_point == "layers.12.resid_post"
    lat, rec = _ours(sae, torch.tensor([[2.0, 0.2]], dtype=F64))
    torch.testing.assert_close(lat, torch.tensor([[2.0, 0.0, 1.2]], dtype=F64))
    torch.testing.assert_close(rec, torch.tensor([[4.2, 0.2]], dtype=F64))
    torch.testing.assert_close(sae.b_enc.detach(), torch.tensor([1.0, -1.0, -1.0], dtype=F64))  # (F1): b + W b_dec


def test_gemmascope_random_and_bad_files(tmp_path, x):
    p = {
        "W_enc": _rand(D, N, seed=1).numpy(),
        "W_dec": _rand(N, D, seed=2, scale=0.3).numpy(),
        "b_enc": _rand(N, seed=3, scale=0.3).numpy(),
        "b_dec": _rand(D, seed=4).numpy(),
        "threshold": (_rand(N, seed=5, scale=0.6)).numpy(),
    }
    np.savez(tmp_path / "params.npz", **p)
    sae = C.convert(tmp_path / "params.npz", dtype=F64, hook_point="layers.3.mlp_out")
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * pre.relu()  # Gemma Scope tutorial JumpReLUSAE
    lat, rec = _ours(sae, x)
    _assert_close(lat, acts)
    _assert_close(rec, acts @ t["W_dec"] + t["b_dec"])
    np.savez(tmp_path / "params.npz", **{**p, "threshold": p["threshold"][:4]})
    with pytest.raises(ValueError, match=r"'threshold' has shape \[4\] but W_enc \[6, 10\] implies \[10\]"):
        C.convert(tmp_path)
    np.savez(tmp_path / "params.npz", **{k: v for k, v in p.items() if k != "b_dec"})
    with pytest.raises(ValueError, match=r"missing tensors \['b_dec'\]"):
        C.convert(tmp_path)


# ------------------------------------------------------------------------------------------- dictionary_learning
def _dl_sd(cls, seed=0, k=3, threshold=0.25):
    enc, dec = _rand(N, D, seed=seed).float(), _rand(D, N, seed=seed + 1, scale=0.4).float()
    b_dec, b_enc = _rand(D, seed=seed + 2, scale=0.3).float(), _rand(N, seed=seed + 3, scale=0.2).float()
    if cls == "AutoEncoder":
        return {"bias": b_dec, "encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    if cls == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "decoder.bias": b_dec}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            "encoder.weight": enc,
            "encoder.bias": b_enc,
            "decoder.weight": dec,
            "b_dec": b_dec,
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(threshold),
        }
    return {
        "W_enc": enc.T.contiguous(),
        "b_enc": b_enc,
        "W_dec": dec.T.contiguous(),
        "b_dec": b_dec,
        "threshold": _rand(N, seed=seed + 4, scale=0.5).float(),
    }


def dl_reference(cls, sd, x):
    """dictionary_learning: AutoEncoder f = relu(enc(x - bias)), x^ = dec(f) + bias; AutoEncoderNew f = relu(enc(x)),
    x^ = dec(f) (+ decoder.bias); AutoEncoderTopK topk(relu(enc(x - b_dec))); BatchTopKSAE (use_threshold, the
    default) relu(..) * (relu(..) > threshold); JumpReluAutoEncoder (0.1.0) f = relu(pre*(pre > t)),
    x^ = f W_dec + b_dec with pre = x W_enc + b_enc (before 0.1.0: f times ||W_dec_i||, divided out in decode)."""
    sd = {k: v.double() for k, v in sd.items()}
    if cls in ("JumpReluAutoEncoder", "JumpReluAutoEncoder<0.1"):
        pre = x @ sd["W_enc"] + sd["b_enc"]
        n = sd["W_dec"].norm(dim=1) if cls.endswith("<0.1") else torch.ones(sd["W_dec"].shape[0], dtype=F64)
        f = torch.relu(pre * (pre > sd["threshold"])) * n
        return f, (f / n) @ sd["W_dec"] + sd["b_dec"]
    if cls == "BatchTopKSAE(use_threshold=False)":  # the k * B largest values over the whole batch
        r = (x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]
        flat = r.relu().flatten()
        v, i = flat.topk(int(sd["k"]) * x.shape[0])
        f = torch.zeros_like(flat).scatter(0, i, v).reshape(r.shape)
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    enc = lambda v: v @ sd["encoder.weight"].T + sd["encoder.bias"]  # noqa: E731
    if cls == "AutoEncoder":
        f = enc(x - sd["bias"]).relu()
        return f, f @ sd["decoder.weight"].T + sd["bias"]
    if cls == "AutoEncoderNew":
        f = enc(x).relu()
        return f, f @ sd["decoder.weight"].T + sd["decoder.bias"]
    r = enc(x - sd["b_dec"]).relu()
    f = r * (r > sd["threshold"]) if cls == "BatchTopKSAE" else _topk_dense(r, int(sd["k"]))
    return f, f @ sd["decoder.weight"].T + sd["b_dec"]


@pytest.mark.parametrize(
    "cls", ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"]
)
def test_dictionary_learning_matches_its_reference(tmp_path, x, cls):
    folder = tmp_path / cls
    folder.mkdir()
    sd = _dl_sd(cls, seed=4)
    torch.save(sd, folder / "ae.pt")
    trainer = {
        "dict_class": cls,
        "activation_dim": D,
        "dict_size": N,
        "layer": 5,
        "lm_name": "EleutherAI/pythia-70m-deduped",
    }
    if "k" in sd:
        trainer["k"] = int(sd["k"])
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    assert C.detect_format(folder) == "dictionary_learning"
    sae = C.convert(folder, dtype=F64)
    expected = {
        "AutoEncoder": "relu",
        "AutoEncoderNew": "relu",
        "AutoEncoderTopK": "topk",
        "BatchTopKSAE": "batchtopk",
        "JumpReluAutoEncoder": "jumprelu",
    }[cls]
    assert sae.config.activation == expected
    assert sae.config.hook_point == "layers.5.resid_post" and sae.config.base_model == "EleutherAI/pythia-70m-deduped"
    ref_lat, ref_rec = dl_reference(cls, sd, x)
    lat, rec = _ours(sae, x)
    _assert_close(rec, ref_rec, tol=1e-6)  # float32 source weights
    _assert_close(lat, ref_lat, tol=1e-6)


def _dl_folder(folder, cls, sd, **trainer_extra):
    """ae.pt + config.json as dictionary_learning 0.1.0's trainSAE writes them (trainer.config + buffer.config)."""
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    trainer = {
        "trainer_class": cls.replace("AutoEncoder", "Trainer"),
        "dict_class": cls,
        "lr": 7e-5,
        "steps": 1000,
        "seed": 0,
        "activation_dim": D,
        "dict_size": N,
        "device": "cuda:0",
        "layer": 3,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "wandb_name": cls,
        "submodule_name": "resid_post_layer_3",
        **trainer_extra,
    }
    (folder / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"d_submodule": D, "io": "out", "n_ctxs": 30000, "ctx_len": 128}})
    )
    return folder


def test_dictionary_learning_jumprelu_latents_follow_the_version(tmp_path, x):
    sd = _dl_sd("JumpReluAutoEncoder", seed=6)
    with torch.no_grad():  # decoder rows far from unit norm: a stray ||W_dec,i|| factor cannot hide
        sd["W_dec"] *= torch.linspace(0.3, 3.0, N)[:, None]
    folder = _dl_folder(
        tmp_path / "jr",
        "JumpReluAutoEncoder",
        sd,
        bandwidth=0.001,
        sparsity_penalty=1.0,
        sparsity_warmup_steps=100,
        target_l0=20,
    )
    for version, cls in (
        (None, "JumpReluAutoEncoder"),
        ("0.1.0", "JumpReluAutoEncoder"),
        ("0.0.9", "JumpReluAutoEncoder<0.1"),
    ):
        opts = {} if version is None else {"dictionary_learning_version": version}
        sae = C.convert(folder, dtype=F64, **opts)
        ref_lat, ref_rec = dl_reference(cls, sd, x)
        lat, rec = _ours(sae, x)
        _assert_close(rec, ref_rec, tol=1e-6)
        _assert_close(lat, ref_lat, tol=1e-6)
        assert torch.equal(lat != 0, ref_lat != 0), version
    # the version recorded in config.json is honoured
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dictionary_learning_version"] = "0.0.9"
    (folder / "config.json").write_text(json.dumps(cfg))
    _assert_close(
        _ours(C.convert(folder, dtype=F64), x)[0], dl_reference("JumpReluAutoEncoder<0.1", sd, x)[0], tol=1e-6
    )
    with pytest.raises(ValueError, match="not a version like"):
        C.convert(folder, dictionary_learning_version="latest")


def test_dictionary_learning_batchtopk_without_threshold_selects_over_the_batch(tmp_path, x):
    sd = _dl_sd("BatchTopKSAE", seed=8, k=2, threshold=0.4)
    folder = _dl_folder(tmp_path / "btk", "BatchTopKSAE", sd, k=2)
    sae = C.convert(folder, dtype=F64, use_threshold=False)
    assert sae.config.activation == "batchtopk" and float(sae.batchtopk_threshold) == pytest.approx(0.4)
    ref_lat, ref_rec = dl_reference("BatchTopKSAE(use_threshold=False)", sd, x)
    per_row = _topk_dense(
        ((x - sd["b_dec"].double()) @ sd["encoder.weight"].double().T + sd["encoder.bias"].double()).relu(), 2
    )
    assert not torch.equal(ref_lat != 0, per_row != 0)  # the batch selection differs from a per-row top-k here
    with torch.no_grad():
        out = sae.train()(x, return_dense=True)  # train(): the batch-wide selection
    _assert_close(out.latents, ref_lat, tol=1e-6)
    _assert_close(out.reconstruction, ref_rec, tol=1e-6)
    assert torch.equal(out.latents != 0, ref_lat != 0)


def test_dictionary_learning_special_cases(tmp_path, x):
    # BatchTopK whose threshold was never estimated (-1): its threshold forward is a plain ReLU (F7)
    sd = _dl_sd("BatchTopKSAE", threshold=-1.0)
    torch.save(sd, tmp_path / "b.pt")
    sae = C.convert(tmp_path / "b.pt", "dictionary_learning", dtype=F64, dict_class="BatchTopKSAE")
    assert sae.config.activation == "relu"
    # TopK / BatchTopK tensors are identical: without config.json the class must be named
    with pytest.raises(ValueError, match="pass dict_class="):
        C.convert(tmp_path / "b.pt", "dictionary_learning")
    # config and tensors disagree
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save(_dl_sd("AutoEncoder"), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "dict_size": 99}}))
    with pytest.raises(ValueError, match="config.json says dict_size=99 but the tensors have 10"):
        C.convert(folder)
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    with pytest.raises(ValueError, match="'GatedAutoEncoder' is not supported"):
        C.convert(folder)
    sd = _dl_sd("AutoEncoder")
    sd["decoder.weight"] = sd["decoder.weight"].T.contiguous()
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, folder / "ae.pt")  # torch.compile prefix is stripped
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(
        ValueError, match=r"'decoder.weight' has shape \[10, 6\] but encoder.weight \[10, 6\] implies \[6, 10\]"
    ):
        C.convert(folder)
    # an ae.pt cut off in transfer says so (not "re-save with state_dict")
    torch.save(_dl_sd("AutoEncoder"), folder / "ae.pt")
    (folder / "ae.pt").write_bytes((folder / "ae.pt").read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"ae.pt is truncated or corrupt \(.*\); download or copy it again\.$"):
        C.convert(folder)


def test_export_refuses_a_layer_norm_saelens_cannot_express(tmp_path):
    from hf_sae import SAEConfig

    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=N, k=2, input_norm="layer_norm", input_norm_eps=1e-3))
    with pytest.raises(ValueError, match="input_norm_eps=0.001"):
        C.export_saelens(sae, tmp_path / "out")


def test_fold_decoder_norms_keeps_reconstruction(tmp_path, x):
    sd = _saelens_weights(seed=21)
    sd["threshold"] = _rand(N, seed=22, scale=0.3).abs()
    folder = _write_saelens(tmp_path / "j", _saelens_cfg("jumprelu"), sd)
    plain = C.convert(folder, dtype=F64)
    folded = C.convert(folder, dtype=F64, fold_decoder_norms=True)
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(N, dtype=F64))
    lat_p, rec_p = _ours(plain, x)
    lat_f, rec_f = _ours(folded, x)
    _assert_close(rec_f, rec_p)
    _assert_close(lat_f, lat_p * sd["W_dec"].norm(dim=1))  # latents carry the decoder norms (F2)
    with pytest.raises(ValueError, match="exact only for ReLU/JumpReLU"):
        C.convert(
            _write_saelens(tmp_path / "t", _saelens_cfg("topk", k=2), _saelens_weights()), fold_decoder_norms=True
        )


def test_format_table_and_hook_names():
    assert set(C.FORMATS) == {"saelens", "sparsify", "openai", "gemmascope", "dictionary_learning"}
    assert C.FORMATS["saelens"].export is C.export_saelens
    assert C.hook_point_from_transformerlens("blocks.7.attn.hook_z") == "layers.7.attn_z"
    assert C.hook_point_from_transformerlens("hook_embed") is None  # GPT-2's hook_embed lacks position embeddings
    assert C.hook_point_to_transformerlens("embed") == "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="valid forms"):
        C._validated_hook("blocks.7.hook_resid_post")
    with pytest.raises(FileNotFoundError):
        C.convert("/nonexistent/sae")
    with pytest.raises(ValueError, match="Unknown format 'pickle'"):
        C.read_checkpoint(".", "pickle")


def test_cli_convert_and_export(tmp_path, x):
    run = tmp_path / "run"
    sd = _write_sparsify(run / "layers.0", seed=5)
    parser = C.add_convert_args(argparse.ArgumentParser())
    assert C.run_convert(parser.parse_args([str(run), str(tmp_path / "hf"), "--dtype", "float64"])) == 0
    sae = SparseAutoencoder.from_pretrained(tmp_path / "hf" / "layers.0.resid_post")
    _assert_close(_ours(sae, x)[1], sparsify_reference(sd, 3, x)[1])
    args = parser.parse_args([str(tmp_path / "hf" / "layers.0.resid_post"), str(tmp_path / "sl"), "--to", "saelens"])
    assert C.run_convert(args) == 0
    back = C.convert(tmp_path / "sl", dtype=F64)
    _assert_close(_ours(back, x)[1], _ours(sae, x)[1])


def test_cli_convert_refusals_are_one_line_with_exit_code_2(tmp_path, capsys):
    from hf_sae.cli import main

    sd = _saelens_weights()
    bad = _write_saelens(tmp_path / "gated", _saelens_cfg("gated"), sd)
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-sae convert: error: ") and "'gated' is not supported" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
