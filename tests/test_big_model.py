"""An LM larger than the memory allowed to it (accelerate's big-model path, ``--device_map auto --max_memory``):
on this CPU-only machine a tiny Llama whose weights exceed the CPU budget has layers offloaded to disk, and
every consumer of LM activations (capture, ``hf-sae cache``, live training, ``hf-sae eval``) gets exactly
what a plain forward of the same weights gives."""

from __future__ import annotations

import json

import pytest
import test_evaluation
import torch

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.data.models import is_dispatched, load_model
from hf_sae.hooks import run_with_capture

tiny_tokenizer = test_evaluation.tiny_tokenizer  # fixtures
tiny_lm = test_evaluation.tiny_lm
HOOKS = ["layers.0.resid_post", "layers.1.mlp_out", "layers.1.resid_post"]
BUDGET = "cpu=60KB"
"""The CPU may hold 60 kB of weights; the tiny LM has 230 kB, so most of it is offloaded to disk."""


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_lm, tiny_tokenizer):
    d = tmp_path_factory.mktemp("big_model") / "lm"
    tiny_lm.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _placement(tmp_path, name="offload"):
    return {"device_map": "auto", "max_memory": BUDGET, "offload_folder": str(tmp_path / name)}


def test_offloaded_lm_activations_equal_a_plain_forward(lm_dir, tmp_path):
    plain, tok = load_model(str(lm_dir))
    big, _ = load_model(str(lm_dir), **_placement(tmp_path))
    weight_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    assert weight_bytes > 3 * 60_000  # the weights exceed the budget 3 times ...
    assert is_dispatched(big) and "disk" in set(big.hf_device_map.values())  # ... so layers live on disk
    assert not is_dispatched(plain)
    ids = test_evaluation._windows(tok, n=4, T_=24)
    with torch.no_grad():
        want = run_with_capture(plain, ids, HOOKS, stop_early=False)
        got = run_with_capture(big, ids, HOOKS, stop_early=False)
        for h in HOOKS:
            assert got[h].device.type == "cpu"
            torch.testing.assert_close(got[h], want[h], rtol=1e-6, atol=1e-6, msg=h)
        # stop_early aborts inside offloaded blocks; the next full forward is still the plain one
        run_with_capture(big, ids, ["layers.0.resid_post"])
        torch.testing.assert_close(big(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)


def test_cache_train_and_eval_through_the_big_model_path(lm_dir, tmp_path):
    """``hf-sae cache --device_map auto --max_memory cpu=60KB`` writes the plain model's activations; live
    training with --device_map trains the same SAE; ``hf-sae eval --device_map ...`` reports the same metrics."""
    from hf_sae.data.cache import CachedActivations, cache_main
    from hf_sae.evaluation.run import main as eval_main
    from hf_sae.training import SAETrainingArguments, train

    common = ["--model", str(lm_dir), "--hook_points", HOOKS[0], "--max_tokens", "600", "--window", "24",
              "--dtype", "float32", "--shard_tokens", "256", "--device", "cpu"]
    cache_main(common + ["--out", str(tmp_path / "plain")])
    cache_main(common + ["--out", str(tmp_path / "big"), "--device_map", "auto", "--max_memory", BUDGET,
                         "--offload_folder", str(tmp_path / "off")])
    a = CachedActivations(tmp_path / "plain", hook_point=HOOKS[0]).to_tensor()
    b = CachedActivations(tmp_path / "big", hook_point=HOOKS[0]).to_tensor()
    assert a.shape == (600, 32)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)

    def args(out, **kw):
        return SAETrainingArguments(
            hook_points=[HOOKS[0]], model_name_or_path=str(lm_dir), context_length=24, lm_batch_size=4, n_latents=64,
            k=4, batch_size=64, train_tokens=64 * 4, init_tokens=128, shuffle_buffer_tokens=0, eval_tokens=0,
            checkpoint_every_tokens=0, eval_every_tokens=0, lr=1e-2, seed=0, log_with=["jsonl"], progress_bar=False,
            plot_report=False, mixed_precision="no", output_dir=str(out), **kw)

    ref = train(args(tmp_path / "run-plain"))[HOOKS[0]]
    got = train(args(tmp_path / "run-big", **_placement(tmp_path, "off-train")))[HOOKS[0]]
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)

    torch.manual_seed(0)
    SparseAutoencoder(SAEConfig(d_in=32, n_latents=64, k=4, hook_point=HOOKS[0])).save_pretrained(tmp_path / "sae")
    ev = ["--model", str(lm_dir), "--metrics", "reconstruction", "--n-tokens", "300", "--window", "24",
          "--batch-size", "4", "--downstream-tokens", "48"]
    eval_main([str(tmp_path / "sae"), *ev, "--out", str(tmp_path / "ev-plain")])
    eval_main([str(tmp_path / "sae"), *ev, "--out", str(tmp_path / "ev-big"), "--device-map", "auto",
               "--max-memory", BUDGET, "--offload-folder", str(tmp_path / "off-eval")])
    for name in ("off", "off-train", "off-eval"):  # made by from_pretrained's disk offload: the flags reached it
        assert (tmp_path / name).is_dir(), name
    m_plain = json.loads((tmp_path / "ev-plain" / "metrics.json").read_text())["reconstruction"]
    m_big = json.loads((tmp_path / "ev-big" / "metrics.json").read_text())["reconstruction"]
    assert m_plain["fvu"] > 0
    for k, v in m_plain.items():
        if isinstance(v, float):
            assert m_big[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_placement_errors():
    from hf_sae.placement import parse_max_memory
    from hf_sae.training import SAETrainingArguments

    assert parse_max_memory("cpu=2GiB, 0=70GiB,1=1000") == {"cpu": "2GiB", 0: "70GiB", 1: 1000}
    with pytest.raises(ValueError, match="write device=size pairs"):
        parse_max_memory("cpu:2GiB")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        parse_max_memory("gpu0=2GiB")
    with pytest.raises(ValueError, match="--device_map 'everywhere': choose one of auto"):
        load_model("x", device_map="everywhere")
    with pytest.raises(ValueError, match="need --device_map"):
        load_model("x", max_memory="cpu=1GB")
    with pytest.raises(ValueError, match="--max_memory='cpu=1GB' is invalid: needs --device_map"):
        SAETrainingArguments(max_memory="cpu=1GB").validate()
    with pytest.raises(ValueError, match="--device_map='auto' is invalid: places the live LM"):
        SAETrainingArguments(device_map="auto", activations="acts.safetensors").validate()
    with pytest.raises(ValueError, match="--device_map='auto' is invalid: spreads one LM .* 2 processes"):
        SAETrainingArguments(device_map="auto").validate(num_processes=2)
