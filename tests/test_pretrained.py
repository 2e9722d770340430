"""``SAE.from_pretrained`` / ``hf_sae.hub.load_all`` on other libraries' Hub repos (hf_sae.pretrained), against the
local fake Hub (tests/hub_server.py): repos laid out as the public ones are (folder names, file names, cfg
fields), converted on the fly with the format's check, cached, then loaded again offline with zero requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_hub import hub  # noqa: F401  (the fake-Hub fixture)

from hf_sae import SAE
from hf_sae import hub as H
from hf_sae import pretrained as P

F64 = torch.float64
D, N = 8, 24


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SAE_CACHE", str(tmp_path / "hf_sae_cache"))


def _upload(repo_id, folder):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder))


def _x(seed=5, m=64):
    x = _rand(m, D, seed=seed)
    return x * torch.linspace(0.2, 20, m, dtype=F64)[:, None] + 0.3  # token norms over two decades


def _close(a, b, tol=1e-4):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------- Gemma Scope
def _gemma_params(seed):
    return {"W_enc": _rand(D, N, seed=seed).numpy(), "W_dec": _rand(N, D, seed=seed + 1, scale=0.3).numpy(),
            "b_enc": _rand(N, seed=seed + 2, scale=0.3).numpy(), "b_dec": _rand(D, seed=seed + 3).numpy(),
            "threshold": _rand(N, seed=seed + 4, scale=0.5).abs().numpy()}


def test_registry_id_gemma_scope_then_offline_with_zero_requests(hub, tmp_path):  # noqa: F811
    import huggingface_hub.constants as hc

    # google/gemma-scope-2b-pt-res: layer_{L}/width_{W}/average_l0_{X}/params.npz
    root = tmp_path / "gemma"
    params = {}
    for sub, seed in (("layer_3/width_16k/average_l0_71", 1), ("layer_3/width_16k/average_l0_12", 2),
                      ("layer_4/width_65k/average_l0_40", 3)):
        (root / sub).mkdir(parents=True)
        params[sub] = _gemma_params(seed)
        np.savez(root / sub / "params.npz", **params[sub])
    _upload("google/gemma-scope-2b-pt-res", root)
    sub = "layer_3/width_16k/average_l0_71"
    sae = SAE.from_pretrained("gemma-scope-2b-pt-res", subfolder=sub)
    assert sae.config.hook_point == "layers.3.resid_post" and sae.config.base_model == "google/gemma-2-2b"
    assert sae.config.activation == "jumprelu"
    t = {k: torch.from_numpy(v) for k, v in params[sub].items()}
    x = _x()
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * pre.relu()  # Gemma Scope's JumpReLUSAE
    with torch.no_grad():
        out = sae(x.float(), return_dense=True)
    _close(out.latents, acts)
    _close(out.reconstruction, acts @ t["W_dec"] + t["b_dec"])
    assert torch.equal(out.latents != 0, acts != 0)
    # only that folder was downloaded; the converted copy is cached
    downloaded = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert all("average_l0_71" in p for p in downloaded) and downloaded
    assert list((P.converted_cache_dir() / "google--gemma-scope-2b-pt-res").rglob("model.safetensors"))
    # the repo id works as well, and everything again offline without one request
    n = len(hub.requests)
    hc.HF_HUB_OFFLINE = True
    try:
        again = SAE.from_pretrained("gemma-scope-2b-pt-res", subfolder=sub)
        by_repo = SAE.from_pretrained("google/gemma-scope-2b-pt-res", subfolder=sub)
    finally:
        hc.HF_HUB_OFFLINE = False
    assert len(hub.requests) == n
    for other in (again, by_repo):
        with torch.no_grad():
            assert torch.equal(other(x.float()).reconstruction, out.reconstruction)
    with pytest.raises(ValueError, match=r"expected layer_\(\?P<layer>.*e.g. 'layer_20/width_16k/average_l0_71'"):
        SAE.from_pretrained("gemma-scope-2b-pt-res", subfolder="layer_3")
    with pytest.raises(ValueError, match="pass subfolder="):
        SAE.from_pretrained("gemma-scope-2b-pt-res")


# ----------------------------------------------------------------------------------------- SAELens (OpenAI v5)
def test_openai_v5_release_in_saelens_files_returns_lm_units(hub, tmp_path):  # noqa: F811
    # jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs: v5_32k_layer_{L}.pt/{cfg.json, sae_weights.safetensors}
    # (a folder named like the original .pt), a pre-6 SAELens cfg with topk and layer_norm
    folder = tmp_path / "oai" / "v5_32k_layer_6.pt"
    folder.mkdir(parents=True)
    sd = {"W_enc": _rand(D, N, seed=11), "b_enc": _rand(N, seed=12, scale=0.2),
          "W_dec": _rand(N, D, seed=13, scale=0.4),
          "b_dec": _rand(D, seed=14, scale=0.3)}
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
           "hook_name": "blocks.6.hook_resid_post", "hook_layer": 6, "hook_head_index": None,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "context_size": 64, "dataset_path": "Skylion007/openwebtext",
           "prepend_bos": False, "normalize_activations": "layer_norm", "sae_lens_training_version": None}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _upload("jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs", tmp_path / "oai")
    sae = SAE.from_pretrained("gpt2-small-resid-post-v5-32k", subfolder="v5_32k_layer_6.pt")
    assert sae.config.input_norm == "layer_norm" and sae.config.k == 4
    assert sae.config.hook_point == "layers.6.resid_post" and sae.config.base_model == "openai-community/gpt2"
    x = _x(seed=7)
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    w = {k: v.float().double() for k, v in sd.items()}
    pre = ((x - mu) / (std + 1e-5) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    v, i = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
    rec = (acts @ w["W_dec"] + w["b_dec"]) * std + mu
    with torch.no_grad():
        out = sae(x.float(), return_dense=True)
    _close(out.latents, acts)
    _close(out.reconstruction, rec)
    assert torch.equal(out.latents != 0, acts != 0)


# ---------------------------------------------------------------------------------- sparsify, dictionary_learning
def test_load_all_on_a_sparsify_repo_and_a_dictionary_learning_subfolder(hub, tmp_path):  # noqa: F811
    # EleutherAI/sae-llama-3-8b-32x: layers.{L}/{cfg.json, sae.safetensors}
    root = tmp_path / "eleuther"
    for layer in (0, 1):
        f = root / f"layers.{layer}"
        f.mkdir(parents=True)
        (f / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "normalize_decoder": True, "num_latents": 0,
                                                "k": 3, "multi_topk": False, "skip_connection": False, "d_in": D}))
        save_file({"encoder.weight": _rand(N, D, seed=20 + layer).float(), "encoder.bias": _rand(N, seed=30).float(),
                   "W_dec": _rand(N, D, seed=40 + layer).float(), "b_dec": _rand(D, seed=50).float()},
                  str(f / "sae.safetensors"))
    _upload("EleutherAI/sae-llama-3-8b-32x", root)
    saes = H.load_all("EleutherAI/sae-llama-3-8b-32x")
    assert list(saes) == ["layers.0.resid_post", "layers.1.resid_post"]
    import huggingface_hub.constants as hc

    n = len(hub.requests)
    hc.HF_HUB_OFFLINE = True
    try:  # the listing comes from the cached snapshot, the SAEs from the converted copies
        assert list(H.load_all("EleutherAI/sae-llama-3-8b-32x")) == list(saes)
    finally:
        hc.HF_HUB_OFFLINE = False
    assert len(hub.requests) == n
    assert list(H.load_all("EleutherAI/sae-llama-3-8b-32x", "layers.1*")) == ["layers.1.resid_post"]
    one = SAE.from_pretrained("eleuther-llama-3-8b-32x", subfolder="layers.1")
    with torch.no_grad():
        x = _x().float()
        assert torch.equal(one(x).reconstruction, saes["layers.1.resid_post"](x).reconstruction)

    # a dictionary_learning release: <submodule>/trainer_<i>/{ae.pt, config.json}
    dl = tmp_path / "dl" / "resid_post_layer_3" / "trainer_0"
    dl.mkdir(parents=True)
    sd = {"encoder.weight": _rand(N, D, seed=60).float(), "encoder.bias": _rand(N, seed=61, scale=0.2).float(),
          "decoder.weight": _rand(D, N, seed=62, scale=0.4).float(), "b_dec": _rand(D, seed=63).float(),
          "k": torch.tensor(3), "threshold": torch.tensor(0.2)}
    torch.save(sd, dl / "ae.pt")
    (dl / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TopKTrainer", "dict_class":
                                                            "AutoEncoderTopK", "activation_dim": D, "dict_size": N,
                                                            "k": 3, "layer": 3, "lm_name": "google/gemma-2-2b",
                                                            "submodule_name": "resid_post_layer_3"},
                                                "buffer": {"d_submodule": D, "io": "out", "ctx_len": 128}}))
    _upload("test-org/dl-saes", tmp_path / "dl")
    sae = SAE.from_pretrained("test-org/dl-saes", subfolder="resid_post_layer_3/trainer_0")
    assert sae.config.activation == "topk" and sae.config.hook_point == "layers.3.resid_post"
    w = {k: v.double() for k, v in sd.items()}
    x = _x(seed=9)
    r = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    v, i = r.topk(3, dim=-1)
    f = torch.zeros_like(r).scatter(-1, i, v)
    with torch.no_grad():
        out = sae(x.float(), return_dense=True)
    _close(out.latents, f)
    _close(out.reconstruction, f @ w["decoder.weight"].T + w["b_dec"])


def test_a_repo_in_no_known_layout_keeps_the_original_error(hub, tmp_path):  # noqa: F811
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an SAE")
    _upload("test-org/junk", tmp_path / "junk")
    with pytest.raises(OSError, match="test-org/junk"):  # hf_sae's own error (no SAE there)
        SAE.from_pretrained("test-org/junk")
    with pytest.raises(ValueError, match="no SAE folder in another library's format"):
        H.load_all("test-org/junk")
    with pytest.raises(OSError, match="test-org/does-not-exist"):  # hf_sae's own error, not the fallback's
        SAE.from_pretrained("test-org/does-not-exist")
    with pytest.raises(OSError, match="test-org/junk"):  # hf_sae's own error (no SAE there)
        SAE.from_pretrained("test-org/junk", subfolder="no/such/folder")


def test_local_foreign_folder_loads_directly(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_30"
    folder.mkdir(parents=True)
    p = _gemma_params(4)
    np.savez(folder / "params.npz", **p)
    sae = SAE.from_pretrained(tmp_path / "gemma-scope-2b-pt-res", subfolder="layer_5/width_16k/average_l0_30")
    assert sae.config.hook_point == "layers.5.resid_post"
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    x = _x(seed=3)
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * pre.relu()
    with torch.no_grad():
        _close(sae(x.float()).reconstruction, acts @ t["W_dec"] + t["b_dec"])
    assert not P.converted_cache_dir().exists()  # local folders are converted, not cached
