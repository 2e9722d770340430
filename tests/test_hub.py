"""hf_sae.hub end to end against a fake Hub-API server on 127.0.0.1 (tests/hub_server.py), with the real
huggingface_hub client (create repo, commit, download, snapshot, offline cache) and the real transformers
trust_remote_code path in a process where ``import hf_sae`` fails. Nothing reaches the internet.

huggingface_hub reads ``HF_ENDPOINT`` when it is first imported. The trust_remote_code test starts a fresh
process with ``HF_ENDPOINT`` set before that import; in this process huggingface_hub may already have been
imported by other test modules, so the ``hub`` fixture points ``huggingface_hub.constants`` (read by every
client call at call time) at the fake server instead, and restores them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub

from hf_sae import SAE, SAEConfig
from hf_sae import hub as H

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A running FakeHub, with huggingface_hub (and datasets' Hub access) pointed at it (online, fresh cache,
    fake token)."""
    import huggingface_hub.constants as hc

    tmp = tmp_path_factory.mktemp("hub")
    server = FakeHub(tmp / "server").start()
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", server.url)
    mp.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.setattr(hc, "ENDPOINT", server.url)
    mp.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(hc, "HF_HUB_OFFLINE", False)
    mp.setattr(hc, "HF_HUB_CACHE", str(tmp / "cache"))
    mp.setattr(hc, "HF_HUB_DISABLE_XET", True)
    import datasets.config as dc  # datasets streaming (HfFileSystem) reads its own copy of HF_ENDPOINT

    mp.setattr(dc, "HF_ENDPOINT", server.url)
    mp.setattr(dc, "HUB_DATASETS_URL", server.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    server.cache = tmp / "cache"
    yield server
    mp.undo()
    server.stop()


def _sae(hook_point, activation="topk", seed=0, d=12, n=32, **info):
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=d, n_latents=n, activation=activation, k=4 if activation in ("topk", "batchtopk") else None,
                    hook_point=hook_point, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    training_info={"dataset": "kjv", "tokens": 1_000_000, **info})
    sae = SAE(cfg).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if activation == "jumprelu":
            sae.log_threshold.normal_(-2.0, 0.5)
    return sae


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ignore = {"transformers_version": None, "_name_or_path": None}
    assert a.config.to_dict() | ignore == b.config.to_dict() | ignore
    x = torch.randn(7, a.config.d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x).reconstruction, b(x).reconstruction)


def test_push_set_then_load_by_subfolder_pattern_and_card(hub):
    saes = {"layers.6.resid_post": _sae("layers.6.resid_post", "topk", 0,
                                        metrics={"fvu": 0.125, "l0": 4.0, "dead_frac": 0.03125, "delta_ce": 0.25}),
            "layers.2.mlp_out": _sae(None, "jumprelu", 1)}
    metrics = {"layers.2.mlp_out": {"fvu": 0.5, "l0": 7.5, "dead_fraction": 0.0, "delta_loss": 0.0625}}
    info = H.push_to_hub(saes, "test-org/smol-saes", metrics=metrics)
    files = set(hub.repos["test-org/smol-saes"].find("main").files)
    assert info.oid == hub.repos["test-org/smol-saes"].commits[-1].oid
    assert {"README.md", H.INDEX_FILE, *H.CODE_FILES} <= files  # code at the root for trust_remote_code
    assert {"layers.6.resid_post/config.json", "layers.6.resid_post/model.safetensors",
            "layers.2.mlp_out/config.json", "layers.2.mlp_out/model.safetensors"} <= files
    assert saes["layers.2.mlp_out"].config.hook_point is None  # the caller's config is left as it was

    got = H.load_all("test-org/smol-saes")
    assert list(got) == ["layers.2.mlp_out", "layers.6.resid_post"]  # forward order
    assert got["layers.2.mlp_out"].config.hook_point == "layers.2.mlp_out"
    saes["layers.2.mlp_out"].config.hook_point = "layers.2.mlp_out"
    for hp in saes:
        _same(got[hp], saes[hp])
    only = H.load_all("test-org/smol-saes", pattern="layers.*.resid_post")
    assert list(only) == ["layers.6.resid_post"]
    _same(SAE.from_pretrained("test-org/smol-saes", subfolder="layers.2.mlp_out"), saes["layers.2.mlp_out"])
    _same(H.load_sae("test-org/smol-saes", "layers.6.resid_post"), saes["layers.6.resid_post"])

    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download("test-org/smol-saes", "README.md"))
    assert card.data.library_name == "hf_sae"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["kjv"]
    assert {"hook-point:layers.6.resid_post", "hook-point:layers.2.mlp_out"} <= set(card.data.tags)
    assert H.card_metrics(card) == {
        "layers.6.resid_post": {"fvu": 0.125, "l0": 4.0, "dead_fraction": 0.03125, "delta_loss": 0.25},
        "layers.2.mlp_out": {"fvu": 0.5, "l0": 7.5, "dead_fraction": 0.0, "delta_loss": 0.0625},
    }
    assert "| `layers.6.resid_post` | 12 | 32 | topk | 4 | 0.125 | 4 | 0.03125 | 0.25 |" in card.text
    assert "Training tokens: 1,000,000" in card.text
    assert not hub.unhandled


@pytest.mark.parametrize("first_load", ["transformers", "load_all"])
def test_single_sae_at_root_then_offline_from_cache(hub, first_load):
    import huggingface_hub.constants as hc

    repo = f"test-org/one-sae-{first_load.replace('_', '-')}"
    sae = _sae("layers.9.resid_post", "relu", 3, metrics={"fvu": 0.2})
    H.push_to_hub(sae, repo)
    assert "config.json" in hub.repos[repo].find("main").files
    if first_load == "transformers":
        _same(SAE.from_pretrained(repo), sae)
    else:
        _same(H.load_all(repo)["layers.9.resid_post"], sae)
    n_requests = len(hub.requests)
    hc.HF_HUB_OFFLINE = True
    try:
        if first_load == "load_all":
            _same(H.load_all(repo)["layers.9.resid_post"], sae)
            _same(H.load_sae(repo), sae)
        _same(SAE.from_pretrained(repo), sae)
        with pytest.raises(OSError, match="(?i)offline|outgoing traffic"):
            H.load_all("test-org/never-downloaded")
    finally:
        hc.HF_HUB_OFFLINE = False
    assert len(hub.requests) == n_requests  # everything came from the cache


def test_second_push_keeps_the_other_hook_points(hub):
    a, b = _sae("layers.6.resid_post", seed=4, metrics={"fvu": 0.3}), _sae("layers.7.resid_post", seed=5)
    H.push_to_hub({"layers.6.resid_post": a}, "test-org/grow")
    H.push_to_hub({"layers.7.resid_post": b}, "test-org/grow", metrics={"layers.7.resid_post": {"fvu": 0.4}})
    assert H.repo_hook_points("test-org/grow") == {"layers.6.resid_post": "layers.6.resid_post",
                                                   "layers.7.resid_post": "layers.7.resid_post"}
    got = H.load_all("test-org/grow")
    _same(got["layers.6.resid_post"], a)
    _same(got["layers.7.resid_post"], b)
    from huggingface_hub import hf_hub_download

    assert H.card_metrics(hf_hub_download("test-org/grow", "README.md")) == {
        "layers.6.resid_post": {"fvu": 0.3}, "layers.7.resid_post": {"fvu": 0.4}}
    assert len(hub.repos["test-org/grow"].commits) == 3  # creation + one commit per push


def test_trust_remote_code_in_a_process_without_hf_sae(hub, tmp_path):
    """A fresh interpreter, HF_ENDPOINT set before huggingface_hub is imported, ``import hf_sae`` blocked:
    transformers downloads the code from the repo root and reproduces the SAE's outputs (to float32 rounding)."""
    one, sub = _sae("layers.1.resid_post", "jumprelu", 7), _sae("layers.3.attn_out", "topk", 8)
    H.push_to_hub(one, "test-org/remote-root")
    H.push_to_hub({"layers.3.attn_out": sub}, "test-org/remote-sub")
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(2))
    torch.save({"x": x, "root": one(x).reconstruction.detach(), "sub": sub(x).reconstruction.detach()},
               tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys

        class BlockHfSae:
            def find_spec(self, name, path=None, target=None):
                if name == "hf_sae" or name.startswith("hf_sae."):
                    raise ImportError("hf_sae is not installed in this process")

        sys.meta_path.insert(0, BlockHfSae())
        try:
            import hf_sae  # noqa: F401
            raise SystemExit("hf_sae was importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel

        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        root = AutoModel.from_pretrained("test-org/remote-root", trust_remote_code=True)
        sub = AutoModel.from_pretrained("test-org/remote-sub", subfolder="layers.3.attn_out", trust_remote_code=True)
        assert "hf_sae" not in sys.modules
        assert type(root).__module__.startswith("transformers_modules."), type(root).__module__
        # equal up to float32 summation order: this process may use other thread counts and the dense path
        # where hf_sae's own process used its sparse kernels
        for got, want in ((root(io["x"]).reconstruction, io["root"]), (sub(io["x"]).reconstruction, io["sub"])):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
        print("REMOTE-CODE-OK", type(root).__name__, sub.config.hook_point)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_TOKEN="hf_fake_token_for_tests",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", PYTHONPATH="",
               # any request not to the fake server would go to a closed local port and fail loudly
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", ALL_PROXY="http://127.0.0.1:9",
               NO_PROXY="127.0.0.1,localhost")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "REMOTE-CODE-OK SparseAutoencoder layers.3.attn_out" in res.stdout


def test_bad_inputs_give_clear_errors(hub, tmp_path):
    sae = _sae("layers.6.resid_post")
    with pytest.raises(ValueError, match="valid forms"):
        H.push_to_hub({"blocks.6.hook_resid_post": sae}, "test-org/x")
    with pytest.raises(ValueError, match="must name the same hook point"):
        H.save_for_hub({"layers.5.resid_post": sae}, tmp_path / "a")
    with pytest.raises(ValueError, match="finite number"):
        H.save_for_hub(sae, tmp_path / "b", metrics={"layers.6.resid_post": {"fvu": float("nan")}})
    with pytest.raises(ValueError, match="not among the SAEs pushed"):
        H.save_for_hub(sae, tmp_path / "c", metrics={"layers.1.mlp_out": {"fvu": 0.1}})
    with pytest.raises(ValueError, match="org/name"):
        H.push_to_hub(sae, "no-namespace")
    with pytest.raises(ValueError, match="layout='root' holds one SAE"):
        H.save_for_hub({"layers.1.resid_post": _sae("layers.1.resid_post"), "layers.6.resid_post": sae},
                       tmp_path / "d", layout="root")
    folder = H.save_for_hub({"layers.1.resid_post": _sae("layers.1.resid_post"), "layers.6.resid_post": sae},
                            tmp_path / "e")
    with pytest.raises(ValueError, match=r"holds 2 SAEs \['layers.1.resid_post', 'layers.6.resid_post'\]"):
        H.load_sae(folder)
    with pytest.raises(ValueError, match="No hook point .* matches"):
        H.load_all(folder, pattern="layers.*.mlp_out")
    with pytest.raises(ValueError, match="no SAE at hook point 'layers.2.resid_post'"):
        H.load_sae(folder, "layers.2.resid_post")
    _same(H.load_sae(folder, "layers.6.resid_post"), sae)  # local folders load without any server


def test_cli_push_dry_run_and_push(hub, tmp_path):
    a, b = _sae("layers.4.resid_post", seed=11), _sae("layers.5.mlp_out", "relu", 12)
    a.save_pretrained(tmp_path / "saved" / "a")
    b.save_pretrained(tmp_path / "saved" / "b")
    (tmp_path / "m.json").write_text(json.dumps({"layers.4.resid_post": {"fvu": 0.11, "l0": 4}}))
    parser = H.add_push_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            str(tmp_path / "saved"),
            "--repo-id",
            "test-org/cli",
            "--metrics",
            str(tmp_path / "m.json"),
            "--dry-run",
            str(tmp_path / "layout"),
        ]
    )
    assert H.run_push(args) == 0
    assert (tmp_path / "layout" / "layers.5.mlp_out" / "model.safetensors").is_file()
    assert (tmp_path / "layout" / "modeling_sae.py").is_file()
    assert "test-org/cli" not in hub.repos
    assert (
        H.run_push(
            parser.parse_args(
                [str(tmp_path / "saved"), "--repo-id", "test-org/cli", "--metrics", str(tmp_path / "m.json")]
            )
        )
        == 0
    )
    got = H.load_all("test-org/cli")
    _same(got["layers.4.resid_post"], a)
    _same(got["layers.5.mlp_out"], b)
    index = json.loads((tmp_path / "layout" / H.INDEX_FILE).read_text())["hook_points"]
    assert index["layers.4.resid_post"]["metrics"] == {"fvu": 0.11, "l0": 4.0}


def test_template_is_shipped_and_linked_from_model_cards():
    assert H.template_path().read_text() == (ROOT / "model_cards" / "sae_card.md").read_text()
    assert "{card_data}" in H.template_path().read_text()


def test_card_metadata_only_holds_hub_ids(tmp_path):
    sae = _sae("layers.6.resid_post")
    sae.config.base_model = "/models/smollm2-135m.gguf"  # a local path: named in the text, not in the metadata
    folder = H.save_for_hub(sae, tmp_path / "card", repo_id="me/local")
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and "`/models/smollm2-135m.gguf`" in card.text
    assert card.data.eval_results is None  # no metrics recorded: no model-index
    assert 'SAE.from_pretrained("me/local")' in card.text  # a single SAE lives at the root


def test_model_push_to_hub_method_uses_hf_sae_layout_and_card(hub):
    """`sae.push_to_hub(repo)` (the PreTrainedModel method) goes through hf_sae.hub: card + index + code."""
    from huggingface_hub import ModelCard, hf_hub_download

    sae = _sae("layers.4.resid_post", "topk", 5, metrics={"fvu": 0.125, "l0": 32.0})
    sae.push_to_hub("test-org/method-push")
    files = set(hub.repos["test-org/method-push"].find("main").files)
    assert {"config.json", "model.safetensors", "modeling_sae.py", "README.md", H.INDEX_FILE} <= files
    card = ModelCard.load(hf_hub_download("test-org/method-push", "README.md"))
    assert card.data.library_name == "hf_sae"
    _same(SAE.from_pretrained("test-org/method-push"), sae)
