"""Activation cache on the real SmolLM2 and a cache run killed with SIGKILL (slow tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sae.data import CachedActivations, cache_activations, load_texts, token_mask, tokenize_windows
from hf_sae.data.cache import cache_main
from hf_sae.hooks import run_with_capture

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smollm2_cache_two_hook_points_matches_forward(smollm2, tmp_path):
    model, tok = smollm2
    hooks = ["layers.3.resid_post", "layers.6.mlp_out"]
    windows = tokenize_windows(load_texts("default", split="validation"), tok, window=256, max_windows=80)
    assert windows.shape == (80, 256)
    meta = cache_activations(model, tok, windows, hooks, tmp_path / "c", max_tokens=20_000, batch_windows=8,
                             shard_tokens=8192, progress=False)
    assert meta["num_tokens"] == 20_000 and meta["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    keep = token_mask(windows, tok)
    refs = {}
    with torch.no_grad():  # the first and the last LM batch (same 8-window batches as the cache run)
        for lo in (0, 72):
            refs[lo] = run_with_capture(model, windows[lo:lo + 8], hooks)
    for h in hooks:
        r = CachedActivations(tmp_path / "c", h, shuffle=False)
        assert r.d_in == 576 and r.num_tokens == 20_000
        x = r.to_tensor()
        ids, pos, win = r.tokens()
        assert torch.equal(ids, windows[keep][:20_000]) and (pos > 0).all()
        m = r.metadata
        assert m["mean_sq_norm"] == pytest.approx(float((x.double() ** 2).sum(1).mean()), rel=1e-6)
        assert m["input_scale"] == pytest.approx((576 / m["mean_sq_norm"]) ** 0.5, rel=1e-12)
        for lo, ref in refs.items():
            sel = (win >= lo) & (win < lo + 8)
            assert sel.sum() > 1000
            torch.testing.assert_close(x[sel], ref[h][win[sel] - lo, pos[sel]].half().float(), rtol=0, atol=0)
        if h == "layers.3.resid_post":
            # position 0 (excluded) is an outlier: ~10x the typical norm of the cached tokens
            norms = x.norm(dim=1)
            assert refs[0][h][:, 0].norm(dim=-1).min() > 8 * norms.median()
            assert (norms > 8 * norms.median()).float().mean() < 0.01
    # shuffled reading covers all rows once
    r = CachedActivations(tmp_path / "c", hooks[1], batch_size=4096)
    assert sum(b.shape[0] for b in r) == 20_000


_CHILD = """
import sys
from hf_sae.data.cache import cache_main
cache_main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_cache_run_resumes_with_exact_token_count(tmp_path):
    from test_data import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), d=64, layers=4)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "killed"
    args = ["--model", str(tmp_path / "m"), "--hook-points", "layers.1.resid_post", "layers.3.mlp_out",
            "--max-tokens", "12000", "--shard-tokens", "600", "--window", "64", "--device", "cpu", "--out"]
    # killed from inside, right after its 3rd shard is recorded: deterministic, no race with a timer
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_SAE_FAULT": "cache.shard_recorded:3"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args, str(out)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -9
    done = json.loads((out / "progress.json").read_text())
    assert len(done["shards"]) == 3 and done["num_tokens"] < 12_000 and not (out / "metadata.json").exists()
    torch.set_num_threads(1)
    meta = cache_main(args + [str(out)])
    assert meta["num_tokens"] == 12_000
    fresh = cache_main(args + [str(tmp_path / "fresh")])
    for h in ("layers.1.resid_post", "layers.3.mlp_out"):
        a = json.loads((out / h / "metadata.json").read_text())
        b = json.loads((tmp_path / "fresh" / h / "metadata.json").read_text())
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
        assert a["num_tokens"] == 12_000 and a["mean_sq_norm"] == b["mean_sq_norm"]
        r = CachedActivations(out, h, shuffle=False)
        assert torch.equal(r.to_tensor(), CachedActivations(tmp_path / "fresh", h, shuffle=False).to_tensor())
    assert fresh["num_tokens"] == 12_000
