"""The feature browser: the streaming collection against brute force on a tiny random Llama, the site's data
files, the CLI, and the built site in a real headless chromium (skipped when it is not installed)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import test_evaluation
import torch

from hf_sae import SAEConfig, SparseAutoencoder

# the fixtures of test_evaluation: a random 2-layer Llama and a word-level tokenizer of the KJV's frequent words
tiny_tokenizer = test_evaluation.tiny_tokenizer
tiny_lm = test_evaluation.tiny_lm

HOOK = "layers.0.resid_pre"
PLANTED_WORD = "Jesus"
PLANTED_LATENT = 7


def planted_sae(lm, tokenizer, n=300, k=6, seed=0):
    """A random TopK SAE on the embeddings whose latent PLANTED_LATENT reads the embedding of PLANTED_WORD
    (scaled so that it is the largest wherever that word is, and below 0 everywhere else)."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=32, n_latents=n, k=k, hook_point=HOOK, base_model="tiny")).eval()
    e = lm.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(PLANTED_WORD)]
    with torch.no_grad():
        sae.W_enc[PLANTED_LATENT] = 50 * e / e.norm() ** 2  # 50 on the word, |50 cos| elsewhere
        sae.b_enc[PLANTED_LATENT] = -40.0  # so that it fires (> 0) on the word alone
        sae.W_dec[PLANTED_LATENT] = e / e.norm()
    return sae


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_lm, tiny_tokenizer):
    from hf_sae.dashboard import build_dashboard

    out = tmp_path_factory.mktemp("site")
    sae = planted_sae(tiny_lm, tiny_tokenizer)
    info = build_dashboard(
        sae,
        out,
        model=tiny_lm,
        tokenizer=tiny_tokenizer,
        n_tokens=3000,
        window=64,
        texts=["Jesus wept and the disciples saw him", "In the beginning"],
        progress=False,
    )
    return out, info, sae


def _windows(tokenizer, n_tokens, window=64):
    from hf_sae.data import corpus
    from hf_sae.evaluation.inputs import trim_mask as _trim_mask

    ids = corpus.tokenize_windows(
        corpus.load_texts("default", split="validation"), tokenizer, window=window, max_windows=80
    )
    keep = _trim_mask(corpus.token_mask(ids, tokenizer), n_tokens)
    rows = int(keep.any(-1).nonzero().max()) + 1
    return ids[:rows], keep[:rows]


# ------------------------------------------------------------------------------------------ collection vs brute force
def test_collect_features_matches_brute_force(tiny_lm, tiny_tokenizer):
    from hf_sae.dashboard.collect import HIST_EDGES, collect_features
    from hf_sae.hooks import run_with_capture

    sae = planted_sae(tiny_lm, tiny_tokenizer, n=64, k=4)
    ids, keep = _windows(tiny_tokenizer, 1500)
    K, before, after = 5, 3, 2
    st = collect_features(
        sae,
        tiny_lm,
        ids,
        keep,
        HOOK,
        top_k=K,
        n_samples=4,
        before=before,
        after=after,
        batch_size=3,
        n2g_latents=[1, PLANTED_LATENT],
        n2g_tokens=400,
        n_pool=20,
        seed=1,
    )
    x = run_with_capture(tiny_lm, ids, [HOOK])[HOOK]
    with torch.no_grad():
        dense = sae.encode(x) * keep.unsqueeze(-1)  # [N, T, n]; not-kept positions never fire
    N, T, n = dense.shape
    flat = dense.reshape(N * T, n)
    assert st.n_tokens == 1500 == int(keep.sum())
    assert torch.equal(st.count, (flat > 0).sum(0))
    assert torch.allclose(st.act_sum.float(), flat.sum(0), rtol=1e-4, atol=1e-4)
    assert torch.allclose(st.act_max, flat.max(0).values)
    assert torch.equal(st.hist.sum(1), st.count)
    lat = (flat > 0).nonzero()[:, 1]
    ref = (
        torch.zeros_like(st.hist)
        .view(-1)
        .index_add_(0, lat * st.hist.shape[1] + torch.bucketize(flat[flat > 0], HIST_EDGES), torch.ones_like(lat))
    )
    assert torch.equal(st.hist.view(-1), ref)
    for j in range(n):
        fires = int(st.count[j])
        top = flat[:, j].topk(min(K, fires)).values if fires else torch.zeros(0)
        got = st.top_act[j][st.top_pos[j] >= 0]
        assert torch.allclose(got, top), j
        for a, p, ctx in zip(st.top_act[j].tolist(), st.top_pos[j].tolist(), st.top_ctx[j]):
            if p < 0:
                continue
            r, c = divmod(p, T)
            assert float(dense[r, c, j]) == pytest.approx(a)
            for o in range(-before, after + 1):  # the context row is the latent's activation there
                want = float(dense[r, c + o, j]) if 0 <= c + o < T else 0.0
                assert float(ctx[o + before]) == pytest.approx(want, rel=2e-3, abs=2e-3)
        sp = st.sample_pos[j][st.sample_pos[j] >= 0]
        assert sp.numel() == min(4, fires) and sp.unique().numel() == sp.numel()
        assert bool((flat[sp, j] > 0).all())
    # the planted latent fires exactly on its word (kept positions)
    word = tiny_tokenizer.convert_tokens_to_ids(PLANTED_WORD)
    assert int(st.count[PLANTED_LATENT]) == int(((ids == word) & keep).sum()) > 0
    # N2G activations are the dense activations of the chosen latents on the first rows
    r = st.n2g_rows
    assert torch.allclose(st.n2g_acts, dense[:r][..., [1, PLANTED_LATENT]])
    # pool: each context's active set is exactly the latents firing in its window
    for p, active in zip(st.pool_pos.tolist(), st.pool_active):
        r_, c_ = divmod(p, T)
        win = dense[r_, max(0, c_ - before) : c_ + after + 1]
        assert active == sorted((win > 0).any(0).nonzero().squeeze(-1).tolist())


def test_collect_is_deterministic_and_batch_size_free(tiny_lm, tiny_tokenizer):
    from hf_sae.dashboard.collect import collect_features

    sae = planted_sae(tiny_lm, tiny_tokenizer, n=64, k=4)
    ids, keep = _windows(tiny_tokenizer, 800)
    a = collect_features(sae, tiny_lm, ids, keep, HOOK, top_k=4, n_samples=3, batch_size=2, seed=3)
    b = collect_features(sae, tiny_lm, ids, keep, HOOK, top_k=4, n_samples=3, batch_size=5, seed=3)
    assert torch.equal(a.top_pos, b.top_pos) and torch.equal(a.count, b.count) and torch.equal(a.hist, b.hist)
    c = collect_features(sae, tiny_lm, ids, keep, HOOK, top_k=4, n_samples=3, batch_size=2, seed=3)
    assert torch.equal(a.sample_pos, c.sample_pos)


def test_logit_effects_and_nearest_latents_brute_force(tiny_lm, tiny_tokenizer):
    from hf_sae.dashboard.collect import logit_effects, nearest_latents

    torch.manual_seed(0)
    W = torch.randn(40, 32)
    tv, ti, bv, bi = logit_effects(W, tiny_lm, n_top=5, chunk=7)
    g = tiny_lm.model.norm.weight
    logits = (W * g) @ tiny_lm.lm_head.weight.T
    assert torch.allclose(tv, logits.topk(5).values, atol=1e-5) and torch.equal(ti, logits.topk(5).indices)
    assert torch.allclose(bv, -(-logits).topk(5).values, atol=1e-5)
    cv, ci = nearest_latents(W, n_near=3, chunk=9)
    D = torch.nn.functional.normalize(W, dim=-1)
    cos = D @ D.T - 10 * torch.eye(40)
    assert torch.equal(ci, cos.topk(3).indices) and torch.allclose(cv, cos.topk(3).values, atol=1e-6)


def test_bad_inputs_fail_before_work(tmp_path, tiny_lm, tiny_tokenizer):
    from hf_sae.dashboard import build_dashboard

    sae = planted_sae(tiny_lm, tiny_tokenizer, n=16, k=2)
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        build_dashboard(sae, tmp_path, model=tiny_lm, tokenizer=tiny_tokenizer, n_tokens=0)
    with pytest.raises(TypeError, match="list of strings"):
        build_dashboard(sae, tmp_path, model=tiny_lm, tokenizer=tiny_tokenizer, texts="one text")
    wrong = SparseAutoencoder(SAEConfig(d_in=16, n_latents=8, k=2, hook_point=HOOK))
    with pytest.raises(ValueError, match="d_in=16"):
        build_dashboard(wrong, tmp_path, model=tiny_lm, tokenizer=tiny_tokenizer, n_tokens=100)
    from hf_sae.dashboard.site import read_data

    (tmp_path / "x.js").write_text("var x = 1;")
    with pytest.raises(ValueError, match="not a feature-browser data file"):
        read_data(tmp_path / "x.js")


# ------------------------------------------------------------------------------------------ the site's files
def test_site_files(site, tiny_tokenizer):
    from hf_sae.dashboard.site import SHARD_SIZE, read_data, shard_name

    out, info, sae = site
    for f in (
        "index.html",
        "app.js",
        "style.css",
        "data/meta.js",
        "data/index.js",
        "data/texts.js",
        "data/pool.js",
        "build_info.json",
    ):
        assert (out / f).is_file(), f
    html = (out / "index.html").read_text() + (out / "app.js").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # no CDN
    meta = read_data(out / "data" / "meta.js")
    assert meta["n_latents"] == 300 and meta["n_tokens"] == 3000 == info["n_tokens"]
    index = read_data(out / "data" / "index.js")
    assert [r[0] for r in index["rows"]] == list(range(300))
    assert (
        info["site_bytes"]
        == sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "build_info.json")
        or info["site_bytes"] > 0
    )
    shard = read_data(out / "data" / shard_name(PLANTED_LATENT // SHARD_SIZE))
    rec = shard["latents"][PLANTED_LATENT % SHARD_SIZE]
    assert rec["id"] == PLANTED_LATENT and rec["top"]
    for c in rec["top"]:  # every top context is centred on the planted word, at 100 % of ... its own value
        assert shard["tok"][c["t"][c["c"]]] == PLANTED_WORD and c["v"][c["c"]] > 0
    assert rec["top"][0]["v"][rec["top"][0]["c"]] == 100
    row = index["rows"][PLANTED_LATENT]
    assert PLANTED_WORD in row[4]
    # the decoder row is the planted word's embedding direction: its top promoted token is scored through
    # the tied/untied unembedding, and its nearest latents are listed with cosines <= 1
    assert len(rec["pos"]) == 10 and all(abs(c) <= 1.0001 for _, c in rec["near"])
    # N2G explains the planted latent by its word with held-out precision 1
    assert rec["n2g"] is not None and rec["n2g"]["patterns"][0]["text"].strip() == PLANTED_WORD
    assert rec["n2g"]["precision"] == pytest.approx(1.0)
    texts = read_data(out / "data" / "texts.js")
    assert texts[0]["tokens"][1] == PLANTED_WORD and texts[0]["latents"][1][0][0] == PLANTED_LATENT
    assert texts[0]["latents"][0] == []  # BOS never fires


def test_cli_dashboard(tmp_path, tiny_lm, tiny_tokenizer, capsys):
    from hf_sae.cli import main

    sae = planted_sae(tiny_lm, tiny_tokenizer, n=32, k=3)
    sae.save_pretrained(tmp_path / "sae")
    tiny_lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    rc = main(
        [
            "dashboard",
            str(tmp_path / "sae"),
            "--model",
            str(tmp_path / "lm"),
            "--n-tokens",
            "500",
            "--window",
            "32",
            "--out",
            str(tmp_path / "site"),
            "--no-progress",
            "--text",
            "Jesus said",
        ]
    )
    assert rc == 0
    info = json.loads((tmp_path / "site" / "build_info.json").read_text())
    assert info["n_latents"] == 32 and info["n_tokens"] == 500
    # a missing SAE: one error line naming it, non-zero exit, nothing written
    assert main(["dashboard", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) != 0
    assert "nope does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ in a real browser
browser = pytest.importorskip("browser", reason="tests/browser.py")


def _artefacts(tmp_path) -> Path:
    return Path(os.environ.get("HF_SAE_SCREENSHOTS", tmp_path))


@pytest.fixture(scope="module")
def driver():
    why = browser.missing()
    if why:
        pytest.skip(f"headless browser tests need {why}")
    with browser.chromium() as d:
        yield d


def _check_site(driver, url, shots: Path, tag: str):
    from selenium.webdriver.common.by import By

    driver.get(url)
    browser.wait_for(driver, "body[data-ready='1']")
    rows = browser.wait_for(driver, "tr.latent-row")
    assert len(rows) == 50  # first page of 300 latents
    assert "page 1 / 6" in driver.find_element(By.ID, "page-info").text
    browser.screenshot(driver, shots / f"dashboard_index_{tag}.png")
    # sorting by id ascending lists latent 0 first
    driver.find_element(By.CSS_SELECTOR, "th[data-key='id']").click()
    driver.find_element(By.CSS_SELECTOR, "th[data-key='id']").click()
    assert driver.find_elements(By.CSS_SELECTOR, "tr.latent-row")[0].get_attribute("data-id") == "0"
    # search finds the planted token's latent
    box = driver.find_element(By.ID, "search")
    box.send_keys(PLANTED_WORD.lower())
    found = [r.get_attribute("data-id") for r in driver.find_elements(By.CSS_SELECTOR, "tr.latent-row")]
    assert str(PLANTED_LATENT) in found and len(found) < 50
    # the density filter hides everything above the threshold
    driver.find_element(By.ID, "min-density").send_keys("2")
    assert driver.find_elements(By.CSS_SELECTOR, "tr.latent-row") == []
    # a latent page shows highlighted tokens, centred on the planted word
    driver.get(url.split("#")[0] + f"#latent/{PLANTED_LATENT}")
    hot = browser.wait_for(driver, "#top-contexts .tok.centre")
    assert all(h.text == PLANTED_WORD for h in hot)
    assert driver.find_elements(By.CSS_SELECTOR, "#top-contexts .tok.hot")
    assert driver.find_element(By.ID, "latent-title").text == f"Latent {PLANTED_LATENT}"
    browser.screenshot(driver, shots / f"dashboard_latent_{tag}.png")
    # the texts view
    driver.get(url.split("#")[0] + "#texts")
    toks = browser.wait_for(driver, ".textview .tok", min_count=5)
    assert toks[1].text == PLANTED_WORD
    browser.screenshot(driver, shots / f"dashboard_texts_{tag}.png")
    errors = browser.console_errors(driver)
    assert errors == [], errors


def test_site_in_chromium_from_disk(site, driver, tmp_path):
    out, _, _ = site
    _check_site(driver, (out / "index.html").resolve().as_uri(), _artefacts(tmp_path), "file")


def test_site_in_chromium_from_static_server(site, driver, tmp_path):
    out, _, _ = site

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _check_site(driver, f"http://127.0.0.1:{server.server_address[1]}/index.html", _artefacts(tmp_path), "http")
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------ shipped with the SAE
def test_push_to_hub_ships_the_browser(site, tmp_path):
    import huggingface_hub.constants as hc
    from hub_server import FakeHub

    from hf_sae import hub as H

    out, _, sae = site
    with pytest.raises(FileNotFoundError, match="not a feature-browser site"):
        H.save_for_hub({HOOK: sae}, tmp_path / "bad", dashboards={HOOK: tmp_path})
    with pytest.raises(ValueError, match="not among the SAEs pushed"):
        H.save_for_hub({HOOK: sae}, tmp_path / "bad", dashboards={"layers.1.resid_post": out})
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    server = FakeHub(tmp_path / "server").start()
    mp = pytest.MonkeyPatch()
    try:
        for k, v in (("HF_ENDPOINT", server.url), ("HF_TOKEN", "hf_fake_token_for_tests"), ("NO_PROXY", "127.0.0.1")):
            mp.setenv(k, v)
        mp.setattr(hc, "ENDPOINT", server.url)
        mp.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(hc, "HF_HUB_OFFLINE", False)
        mp.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
        mp.setattr(hc, "HF_HUB_DISABLE_XET", True)
        H.push_to_hub({HOOK: sae}, "org/tiny-saes", layout="subfolders", dashboards={HOOK: out})
        files = set(server.repos["org/tiny-saes"].find("main").files)
        site_files = {f"dashboard/{HOOK}/{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file()}
        assert site_files <= files and f"{HOOK}/config.json" in files
        from huggingface_hub import hf_hub_download, snapshot_download

        card = Path(hf_hub_download("org/tiny-saes", "README.md")).read_text()
        assert f"(dashboard/{HOOK}/index.html)" in card and "## Feature browser" in card
        index = json.loads(Path(hf_hub_download("org/tiny-saes", H.INDEX_FILE)).read_text())
        assert index["hook_points"][HOOK]["dashboard"] == f"dashboard/{HOOK}"
        # a second push of the same SAE without the browser keeps the card's link (the index remembers it)
        H.push_to_hub({HOOK: sae}, "org/tiny-saes", layout="subfolders")
        card = Path(hf_hub_download("org/tiny-saes", "README.md", force_download=True)).read_text()
        assert f"(dashboard/{HOOK}/index.html)" in card
        # downloaded, the browser is the same bytes
        local = Path(snapshot_download("org/tiny-saes", allow_patterns=["dashboard/*"]))
        assert (local / "dashboard" / HOOK / "data" / "index.js").read_bytes() == (
            out / "data" / "index.js"
        ).read_bytes()
        assert H.load_sae("org/tiny-saes", HOOK).config.n_latents == 300  # loading ignores the browser folder
    finally:
        mp.undo()
        server.stop()


def test_n2g_without_held_out_fires_is_valid_json(tmp_path, tiny_lm, tiny_tokenizer):
    """An N2G explanation with no held-out firing has NaN recall; the site stores None (strict JSON)."""
    from hf_sae.dashboard import build_dashboard
    from hf_sae.dashboard.site import read_data

    sae = planted_sae(tiny_lm, tiny_tokenizer, n=64, k=4)
    build_dashboard(sae, tmp_path, model=tiny_lm, tokenizer=tiny_tokenizer, n_tokens=400, window=64, n2g_tokens=130,
                    texts=[], progress=False)
    recs = read_data(tmp_path / "data" / "latents_0000.js")["latents"]
    explained = [r["n2g"] for r in recs if r["n2g"]]
    assert explained and any(e["recall"] is None for e in explained)
