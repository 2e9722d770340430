"""SAGE (hf_sae.evaluation.sage): tasks, patching, attribution, dictionaries, SAE evaluation, report.

Fast tests use a tiny random Llama / GPT-2 and a word-level tokenizer in which every word (and so
every name) is one token; one slow test runs the real SmolLM2-135M.
"""
import json
import re

import pytest
import torch
from _helpers import identity_sae

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.evaluation.sage import (
    Location,
    PrefixCache,
    SupervisedDictionary,
    activation_patching,
    attribution_patching,
    best_probe_latents,
    classify_location,
    enumerate_locations,
    evaluate_sae,
    greedy_latent_edit,
    location_activations,
    logit_diff,
    make_task,
    mean_logit_diff,
    patch_functions,
    patched_logit_diff,
    recompute_sublayers,
    residual_stream_index,
)
from hf_sae.evaluation.sage.tasks import DEFAULT_NAMES, FEMALE_NAMES, GENDER_TEMPLATES, IOI_TEMPLATES, MALE_NAMES

# --------------------------------------------------------------------------- tiny model fixtures


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for t in IOI_TEMPLATES + GENDER_TEMPLATES:
        words.update(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w\}", " ", t)))
    words.update(DEFAULT_NAMES + MALE_NAMES + FEMALE_NAMES + ("he", "she"))
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


def _tiny_llama(vocab_size, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.requires_grad_(False)
    return model


def _tiny_gpt2(vocab_size):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def llama(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def ioi(tokenizer):
    return make_task("ioi", tokenizer, n_prompts=24, seed=0, n_names=8)


def _identity_sae(d, hook):
    return identity_sae(d, hook)


# --------------------------------------------------------------------------- tasks


def test_ioi_task_shapes_positions_and_counterparts(tokenizer, ioi):
    c = ioi.clean
    n, t = c.input_ids.shape
    assert n == 24 and len(c.prompts) == 24
    assert set(ioi.corrupted) == {"io", "s", "order"}
    ar = torch.arange(n)
    assert torch.equal(c.input_ids[ar, c.positions["IO"]], c.answer_ids)  # IO token at IO, and it is the answer
    assert torch.equal(c.input_ids[ar, c.positions["S1"]], c.wrong_ids)
    assert torch.equal(c.input_ids[ar, c.positions["S2"]], c.wrong_ids)
    assert torch.equal(c.positions["END"], c.lengths - 1)
    assert set(c.attributes["order"]) == {"ABB", "BAB"}
    abb = [i for i, o in enumerate(c.attributes["order"]) if o == "ABB"]
    assert all(c.positions["IO"][i] < c.positions["S1"][i] for i in abb)
    for a, p in ioi.corrupted.items():
        assert p.input_ids.shape == (n, t) and torch.equal(p.lengths, c.lengths)
        differ = (p.input_ids != c.input_ids).sum(1)
        changed = [x for x in ioi.attribute_names if p.attributes[x] != c.attributes[x]]
        assert changed == [a]  # exactly the corrupted attribute changes
        assert torch.equal(differ, torch.full((n,), {"io": 1, "s": 2, "order": 2}[a]))
    # the IO corruption's own answer is the new IO name, found at the same slot
    p = ioi.corrupted["io"]
    assert torch.equal(p.input_ids[ar, c.positions["IO"]], p.answer_ids)
    sub = ioi.select([3, 1])
    assert sub.clean.prompts == [c.prompts[3], c.prompts[1]]
    assert sub.corrupted["s"].attributes["s"] == [
        ioi.corrupted["s"].attributes["s"][3],
        ioi.corrupted["s"].attributes["s"][1],
    ]


def test_gender_task(tokenizer):
    task = make_task("gender", tokenizer, n_prompts=12, n_names=4)
    c = task.clean
    he, she = tokenizer.convert_tokens_to_ids(["he", "she"])
    for i, g in enumerate(c.attributes["gender"]):
        assert (int(c.answer_ids[i]), int(c.wrong_ids[i])) == ((he, she) if g == "male" else (she, he))
    assert task.nested == {"name": "gender"} and task.select([0, 1]).nested == task.nested
    g = task.corrupted["gender"]
    assert all(a != b for a, b in zip(g.attributes["gender"], c.attributes["gender"]))
    assert torch.equal(g.answer_ids, c.wrong_ids)
    with pytest.raises(ValueError, match="unknown SAGE task"):
        make_task("nope", tokenizer)


def test_names_must_be_single_tokens(tokenizer):
    with pytest.raises(ValueError, match="single tokens"):
        make_task("ioi", tokenizer, n_prompts=4, names=["Zzyzx", "Qwerty", "Mary"])


# --------------------------------------------------------------------------- dictionaries


def test_supervised_dictionary_hand_computed():
    # 4 prompts, d = 2; attributes x in {p, q}, y in {r, s}
    a = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 10.0]])
    attrs = {"x": ["p", "p", "q", "q"], "y": ["r", "s", "r", "s"]}
    d = SupervisedDictionary.fit(a, attrs, "loc")
    # E[a] = (4, 4); E[a|x=p] = (2, 1) -> u = (-2, -3); E[a|x=q] = (6, 7) -> (2, 3)
    # E[a|y=r] = (3, 2) -> (-1, -2); E[a|y=s] = (5, 6) -> (1, 2)
    assert torch.allclose(d.mean, torch.tensor([4.0, 4.0]))
    assert torch.allclose(d.feature("x", "p"), torch.tensor([-2.0, -3.0]))
    assert torch.allclose(d.feature("x", "q"), torch.tensor([2.0, 3.0]))
    assert torch.allclose(d.feature("y", "r"), torch.tensor([-1.0, -2.0]))
    assert torch.allclose(d.feature("y", "s"), torch.tensor([1.0, 2.0]))
    rec = d.reconstruct(attrs)
    expected = torch.tensor([[1.0, -1.0], [3.0, 3.0], [5.0, 5.0], [7.0, 9.0]])
    assert torch.allclose(rec, expected)
    # edit x: p -> q adds (4, 6)
    assert torch.allclose(d.edit(a[:1], "x", ["p"], ["q"]), torch.tensor([[5.0, 6.0]]))
    assert torch.equal(d.feature("x", "unseen"), torch.zeros(2))
    assert d.counts == {"x": {"p": 2, "q": 2}, "y": {"r": 2, "s": 2}}
    with pytest.raises(ValueError, match="NaN"):
        SupervisedDictionary.fit(torch.tensor([[float("nan"), 0.0]]), {"x": ["p"]})
    with pytest.raises(ValueError, match="missing"):
        d.reconstruct({"x": ["p"]})


def test_supervised_dictionary_nested_attribute_hand_computed():
    # name is nested in gender: without nesting the gender part would be counted twice
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    attrs = {"gender": ["m", "m", "f", "f"], "name": ["m1", "m2", "f1", "f1"]}
    d = SupervisedDictionary.fit(a, attrs, nested={"name": "gender"})
    # E[a] = (1, 1.5); E[a|m] = (2, 0); E[a|f] = (0, 3)
    assert torch.allclose(d.feature("gender", "m"), torch.tensor([1.0, -1.5]))
    assert torch.allclose(d.feature("name", "m1"), torch.tensor([-1.0, 0.0]))  # (1, 0) - E[a|m]
    assert torch.allclose(d.feature("name", "f1"), torch.tensor([0.0, 0.0]))
    assert torch.allclose(d.reconstruct(attrs), torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    plain = SupervisedDictionary.fit(a, attrs)  # the plain formula double-counts gender here
    assert torch.allclose(plain.reconstruct(attrs)[0], torch.tensor([2.0, -1.5]))
    with pytest.raises(ValueError, match="not nested"):
        SupervisedDictionary.fit(
            a, {"gender": ["m", "f", "f", "f"], "name": ["m1", "m1", "f1", "f1"]}, nested={"name": "gender"}
        )


# --------------------------------------------------------------------------- locations and patching


def test_location_keys_and_coverage():
    loc = Location.parse("layers.2.attn_z.h3@END")
    assert (loc.hook, loc.position, loc.head, loc.kind, loc.layer) == ("layers.2.attn_z", "END", 3, "head", 2)
    assert Location.parse(loc.key) == loc
    assert Location.parse("layers.0.resid_pre@IO").head is None
    with pytest.raises(ValueError, match="invalid location"):
        Location.parse("layers.2.attn_z")
    with pytest.raises(ValueError, match="head index"):
        Location("layers.1.mlp_out", "END", 2)
    assert [residual_stream_index(h) for h in ("embed", "layers.3.resid_pre", "layers.3.resid_post")] == [0, 3, 4]
    assert classify_location("layers.1.resid_post", "layers.2.resid_pre@END") == "direct"
    assert classify_location("layers.1.resid_post", "layers.2.attn_z.h0@END") == "sublayer"
    assert classify_location("layers.1.resid_post", "layers.2.mlp_out@IO") == "sublayer"
    assert classify_location("layers.1.resid_post", "layers.1.mlp_out@IO") is None
    assert classify_location("layers.1.mlp_out", "layers.1.mlp_out@IO") == "direct"


def test_patching_writes_only_the_location(llama, ioi):
    prompts = ioi.clean
    loc = Location("layers.1.attn_z", "S2", 2)
    acts = location_activations(llama, prompts, [loc, "layers.1.resid_pre@END"])
    assert acts[loc.key].shape == (24, 8)  # d_head = 32 / 4
    assert acts["layers.1.resid_pre@END"].shape == (24, 32)
    # patching a location with its own values changes nothing
    ld = logit_diff(llama, prompts)
    assert torch.allclose(torch.tensor(patched_logit_diff(llama, prompts, {loc: acts[loc.key]})), ld.mean(), atol=1e-5)
    # the function writes exactly that head slice at that position
    fns = patch_functions(llama, prompts, {loc: torch.full((24, 8), 7.0)})
    act = torch.zeros(24, prompts.input_ids.shape[1], 32)
    out = fns["layers.1.attn_z"](act, slice(0, 24))
    assert out.sum() == 7.0 * 24 * 8
    ar = torch.arange(24)
    assert (out[ar, prompts.positions["S2"], 16:24] == 7.0).all()
    with pytest.raises(ValueError, match="expected"):
        patch_functions(llama, prompts, {loc: torch.zeros(3, 8)})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_cache_resume_matches_full_forward(tokenizer, ioi, llama, arch):
    model = llama if arch == "llama" else _tiny_gpt2(len(tokenizer))
    prompts = ioi.clean
    cache = PrefixCache(model, prompts, batch_size=10)
    assert cache.enabled
    n_layers = 3 if arch == "llama" else 2
    loc = Location(f"layers.{n_layers - 1}.mlp_out", "END")
    vals = torch.randn(len(prompts), 32)
    full = patched_logit_diff(model, prompts, {loc: vals}, batch_size=10)
    resumed = patched_logit_diff(model, prompts, {loc: vals}, batch_size=10, cache=cache)
    assert full != pytest.approx(mean_logit_diff(model, prompts), abs=1e-3)  # the patch matters
    assert resumed == pytest.approx(full, abs=1e-5)
    # no replacement: the clean LD recorded by the cache
    assert mean_logit_diff(model, prompts, batch_size=10, cache=cache) == pytest.approx(
        mean_logit_diff(model, prompts), abs=1e-5
    )
    with pytest.raises(ValueError, match="other prompts"):
        patched_logit_diff(model, prompts.select(range(5)), {loc: vals[:5]}, batch_size=10, cache=cache)


# --------------------------------------------------------------------------- attribution


def test_attribution_matches_finite_difference(tokenizer, ioi):
    model = _tiny_llama(len(tokenizer), dtype=torch.float64)
    task = ioi.select(range(8))
    locs = [
        Location("layers.1.resid_pre", "IO"),
        Location("layers.2.attn_z", "END", 1),
        Location("layers.0.mlp_out", "IO"),
    ]
    res = attribution_patching(model, task, locs, attributes=["io"], batch_size=5, progress=False)
    cf = task.corrupted["io"].as_counterfactual_of(task.clean)
    a = location_activations(model, task.clean, locs)
    a_cf = location_activations(model, cf, locs)
    base = mean_logit_diff(model, task.clean)
    # central differences; eps is not smaller because attention softmax runs in float32 even in a
    # float64 model (noise ~1e-9 in LD), and the O(eps^2) error at 1e-2 is ~1e-4 relative
    eps = 1e-2
    for l in locs:
        up = patched_logit_diff(model, task.clean, {l: a[l.key] + eps * (a_cf[l.key] - a[l.key])})
        down = patched_logit_diff(model, task.clean, {l: a[l.key] - eps * (a_cf[l.key] - a[l.key])})
        fd = (up - down) / (2 * eps)
        assert res.scores["io"][l.key] == pytest.approx(fd, rel=3e-3)
        assert abs(fd) > 1e-4  # a real, non-zero effect
    assert res.ld_clean == pytest.approx(base, abs=1e-9)
    assert res.ld_corrupted["io"] == pytest.approx(mean_logit_diff(model, cf), abs=1e-9)


def test_enumerate_and_activation_patching(llama, ioi):
    locs = enumerate_locations(llama, ioi, kinds=["resid", "head", "mlp"])
    assert len(locs) == 3 * 4 * (1 + 4 + 1)  # layers x positions x (resid + 4 heads + mlp)
    with pytest.raises(ValueError, match="does not exist"):
        enumerate_locations(llama, ioi, layers=[7])
    res = attribution_patching(llama, ioi, locs, batch_size=12, progress=False)
    top = res.top(3, ["resid"])
    assert all(l.kind == "resid_pre" for l in top)
    comb = res.combined()
    assert comb[top[0].key] == max(comb[l.key] for l in locs if l.kind == "resid_pre")
    conf = activation_patching(llama, ioi, top[:2], attributes=["io"], progress=False)
    # patching layer-0 residual at IO from the IO-corrupted prompt == changing the IO token embedding
    l0 = Location("layers.0.resid_pre", "IO")
    full = activation_patching(llama, ioi, [l0], attributes=["io"], progress=False)["io"][l0.key]
    cf_own = mean_logit_diff(llama, ioi.corrupted["io"].as_counterfactual_of(ioi.clean))
    assert full["ld"] == pytest.approx(cf_own, abs=1e-4)  # the only difference is that token
    assert full["fraction"] == pytest.approx(1.0, abs=1e-4)
    assert set(conf["io"]) == {l.key for l in top[:2]}


# --------------------------------------------------------------------------- SAE evaluation


def test_identity_sae_is_perfectly_sufficient_and_necessary(llama, ioi):
    fit, ev = ioi.split(12)
    hook = "layers.0.resid_post"  # stream entering block 1
    sae = _identity_sae(32, hook)
    locs = [
        Location(hook, "END"),
        Location(hook, "S2"),
        Location("layers.1.attn_z", "END", 0),
        Location("layers.1.mlp_out", "END"),
        Location("layers.2.mlp_out", "END"),
    ]
    rec = recompute_sublayers(llama, sae, ev.clean, locs[2:4])
    true = location_activations(llama, ev.clean, locs[2:4])
    for k in rec:
        assert torch.allclose(rec[k], true[k], atol=1e-5)
    res = evaluate_sae(llama, sae, fit, ev, locs, edit_steps=(1, 64), n_control=8, progress=False)
    assert res["uncovered"] == ["layers.2.mlp_out@END"]
    assert {v["mode"] for v in res["locations"].values()} == {"direct", "sublayer"}
    for key, v in res["locations"].items():
        assert abs(v["denominator"]) > 1e-4, key
        assert v["sae"]["sufficiency"] == pytest.approx(1.0, abs=1e-3), key
        assert v["sae"]["necessity"] == pytest.approx(1.0, abs=1e-3), key
        assert v["sae"]["fvu"] == pytest.approx(0.0, abs=1e-8)
    ctrl = res["locations"][f"{hook}@END"]["control"]["io"]
    # with every latent moved, the identity SAE edit equals patching the counterfactual activation
    assert ctrl["ld_sae_edit"]["64"] == pytest.approx(ctrl["ld_counterfactual_patch"], abs=1e-4)
    cos = res["locations"][f"{hook}@END"]["cosine"]["io"]["per_value"]
    assert all(-1.0 <= p["cosine"] <= 1.0 for p in cos.values())


def test_bad_inputs_raise_clear_errors(llama, ioi):
    fit, ev = ioi.split(12)
    sae = _identity_sae(32, None)
    with pytest.raises(ValueError, match="hook_point"):
        evaluate_sae(llama, sae, fit, ev, ["layers.1.resid_pre@END"], progress=False)
    with pytest.raises(ValueError, match="no position 'NAME'"):
        location_activations(llama, ev.clean, ["layers.1.resid_pre@NAME"])
    with pytest.raises(ValueError, match="does not exist"):
        location_activations(llama, ev.clean, ["layers.9.resid_pre@END"])
    with pytest.raises(ValueError, match="n_first"):
        ioi.split(24)
    with pytest.raises(ValueError, match="no corrupted counterpart"):
        attribution_patching(llama, ioi, [Location("layers.0.resid_pre", "END")], attributes=["gender"], progress=False)


def test_supervised_sufficiency_exact_for_additive_activations():
    # When a = E[a] + u_x + u_y exactly (balanced design), the supervised reconstruction is exact.
    torch.manual_seed(0)
    ux = {"p": torch.randn(5), "q": torch.randn(5)}
    uy = {"r": torch.randn(5), "s": torch.randn(5), "t": torch.randn(5)}
    xs, ys = [], []
    for x in ux:
        for y in uy:
            xs += [x] * 2
            ys += [y] * 2
    base = torch.randn(5)
    a = torch.stack([base + ux[x] + uy[y] for x, y in zip(xs, ys)])
    d = SupervisedDictionary.fit(a, {"x": xs, "y": ys})
    assert torch.allclose(d.reconstruct({"x": xs, "y": ys}), a, atol=1e-5)


def test_greedy_edit_and_probe():
    W = torch.eye(4)
    z = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    zt = torch.tensor([[0.0, 2.0, 1.0, 0.5]])
    edits = greedy_latent_edit(z, zt, W, steps=[1, 2, 3, 5])
    assert torch.equal(edits[1], torch.tensor([[0.0, 0.0, 1.0, 0.0]]))  # largest move first (3 -> 0)
    assert torch.equal(edits[2], torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    assert torch.equal(edits[3], zt)
    assert torch.equal(edits[5], zt)  # nothing left to move
    # probe: latent 1 separates value "a" perfectly, latent 0 is noise
    z_fit = torch.tensor([[0.3, 2.0], [0.1, 1.5], [0.2, 0.0], [0.4, 0.1]])
    attrs = {"v": ["a", "a", "b", "b"]}
    res = best_probe_latents(z_fit, attrs, z_fit, attrs)
    pa = res["v"]["per_value"]["a"]
    assert pa["latent"] == 1 and pa["balanced_accuracy"] == 1.0 and 0.1 < pa["threshold"] < 1.5
    assert res["v"]["per_value"]["b"]["balanced_accuracy"] >= 0.5


# --------------------------------------------------------------------------- end to end (CLI)


def test_cli_end_to_end_tiny(tmp_path, tokenizer, llama):
    import argparse

    from hf_sae.evaluation.sage import add_sage_args, run_sage

    model_dir = tmp_path / "tiny"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sae_dir = tmp_path / "sae"
    _identity_sae(32, "layers.1.resid_pre").save_pretrained(sae_dir)
    parser = add_sage_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            str(model_dir),
            "--sae",
            str(sae_dir),
            "--tasks",
            "ioi",
            "gender",
            "--n-fit",
            "16",
            "--n-eval",
            "12",
            "--n-attribution",
            "8",
            "--top-resid",
            "2",
            "--top-head",
            "1",
            "--top-mlp",
            "1",
            "--n-sublayer",
            "2",
            "--edit-steps",
            "1",
            "4",
            "--n-control",
            "6",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    paths = run_sage(args)
    data = json.loads((tmp_path / "out" / "sage.json").read_text())
    ioi = data["tasks"]["ioi"]
    assert ioi["n_eval"] == 12 and len(ioi["cross_section"]) == 4
    ev = ioi["saes"]["sae"]
    assert len(ev["locations"]) == 4 + 2  # 4 IOI positions (direct) + 2 sublayer locations of block 1
    for v in ev["locations"].values():
        if abs(v["denominator"]) > 1e-3:
            assert v["sae"]["sufficiency"] == pytest.approx(1.0, abs=1e-3)
    html = (tmp_path / "out" / "index.html").read_text()
    assert "Task ioi" in html and "Task gender" in html and "ioi_attribution.png" in html
    for key in ("ioi_attribution", "ioi_patching", "ioi_sufficiency", "ioi_control"):
        assert (tmp_path / "out" / f"{key}.png").stat().st_size > 1000, key
    assert paths["html"].endswith("index.html")


# --------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
def test_smollm2_ioi_and_fresh_sae(smollm2):
    model, tok = smollm2
    task = make_task("ioi", tok, n_prompts=32, seed=1)
    ld = logit_diff(model, task.clean, batch_size=32)
    assert ld.mean() > 1.0 and (ld > 0).float().mean() > 0.8  # SmolLM2 does IOI
    fit, ev = task.split(16)
    torch.manual_seed(0)
    hook = "layers.26.resid_pre"  # the END residual stream after SmolLM2's IOI heads (layers 23-25)
    sae = SparseAutoencoder(SAEConfig(d_in=576, expansion_factor=2, activation="topk", k=16, hook_point=hook)).eval()
    res = evaluate_sae(
        model, sae, fit, ev, [Location(hook, "END")], edit_steps=(1, 4), n_control=8, batch_size=16, progress=False
    )
    v = res["locations"][f"{hook}@END"]
    assert v["denominator"] > 2.0  # mean-ablating the END residual here removes most of the LD
    assert v["supervised"]["sufficiency"] > 0.5  # supervised features recover most of it
    assert v["sae"]["fvu"] > 0.5  # an untrained SAE reconstructs poorly ...
    assert v["sae"]["sufficiency"] < v["supervised"]["sufficiency"]  # ... and is less sufficient
    assert set(v["control"]) == {"io", "s", "order"}


# --------------------------------------------------------------------------- SAGE validation checks


def test_regression_dictionary_removes_the_io_s_cross_terms():
    # IOI-like design: io != s on every prompt (all ordered pairs of 4 names), a additive in io and s.
    from hf_sae.evaluation.sage.dictionaries import SupervisedDictionary

    torch.manual_seed(0)
    names = ["A", "B", "C", "D"]
    f_io = {v: torch.randn(6, dtype=torch.float64) for v in names}
    f_s = {v: torch.randn(6, dtype=torch.float64) for v in names}
    io = [a for a in names for b in names if a != b]
    s = [b for a in names for b in names if a != b]
    a = torch.stack([f_io[i] + f_s[j] for i, j in zip(io, s)]) + 0.5
    attrs = {"io": io, "s": s}
    reg = SupervisedDictionary.fit(a, attrs, method="regression")
    mean = SupervisedDictionary.fit(a, attrs)
    torch.testing.assert_close(reg.reconstruct(attrs), a, rtol=0, atol=1e-10)
    # the conditional means carry a -1/(n_names - 1) share of the other attribute's feature of the same
    # name: u_io[v] = g_io[v] - g_s[v] / 3 (g = the feature minus its mean over names)
    g = lambda f, v: f[v] - torch.stack(list(f.values())).mean(0)  # noqa: E731
    for v in names:
        torch.testing.assert_close(mean.feature("io", v), g(f_io, v) - g(f_s, v) / 3, rtol=0, atol=1e-10)
    assert (mean.reconstruct(attrs) - a).norm() > 0.1
    # on a balanced product design both fits agree
    xs = [x for x in "pq" for _ in "rst"]
    ys = [y for _ in "pq" for y in "rst"]
    b = torch.randn(6, 4, dtype=torch.float64)
    m, r = (
        SupervisedDictionary.fit(b, {"x": xs, "y": ys}),
        SupervisedDictionary.fit(b, {"x": xs, "y": ys}, method="regression"),
    )
    torch.testing.assert_close(r.mean, m.mean)
    for attr in ("x", "y"):
        for v in r.features[attr]:
            torch.testing.assert_close(r.feature(attr, v), m.feature(attr, v))
    with pytest.raises(ValueError, match="method"):
        SupervisedDictionary.fit(b, {"x": xs}, method="ols")


def test_cross_section_completeness(llama, ioi):
    from hf_sae.evaluation.sage.validation import cross_section_completeness

    # the last residual stream at END determines the END logits: patching it reproduces the whole effect
    full = cross_section_completeness(llama, ioi, ["layers.2.resid_post@END"], min_effect=0.0)
    for attr, r in full["attributes"].items():
        assert r["ld_patched_all"] == pytest.approx(r["ld_corrupted"], abs=1e-4), attr
        assert r["complete"] is True
    assert full["complete"] is True
    # one early MLP at one position does not
    part = cross_section_completeness(llama, ioi, ["layers.0.mlp_out@S2"], attributes=["io"], min_effect=0.0)
    assert abs(part["attributes"]["io"]["fraction"] - 1) > 0.1 and part["complete"] is False
    # a full effect below min_effect gives no verdict
    none = cross_section_completeness(llama, ioi, ["layers.0.mlp_out@S2"], attributes=["io"], min_effect=1e9)
    assert none["attributes"]["io"]["complete"] is None and none["complete"] is False


def test_sublayer_method_against_sublayer_saes_end_to_end(llama, ioi, capsys, tmp_path):
    from hf_sae.evaluation.sage.validation import compare_sublayer_methods

    fit, ev = ioi.split(12)
    res_sae = _identity_sae(32, "layers.0.resid_post")  # feeds block 1
    subs = {
        "layers.1.mlp_out": _identity_sae(32, "layers.1.mlp_out"),
        "layers.1.attn_out": _identity_sae(32, "layers.1.attn_out"),
    }
    locs = ["layers.1.mlp_out@END", "layers.1.attn_out@S2", "layers.1.attn_z.h0@END", "layers.2.mlp_out@END"]
    out = compare_sublayer_methods(llama, res_sae, subs, fit, ev, locs, edit_steps=(1, 64), n_control=6)
    assert out["skipped"] == ["layers.1.attn_z.h0@END", "layers.2.mlp_out@END"]
    assert set(out["locations"]) == {"layers.1.mlp_out@END", "layers.1.attn_out@S2"}
    for key, r in out["locations"].items():
        for method in ("residual_recomputed", "sublayer_sae"):  # both exact for identity SAEs
            assert r[method]["sufficiency"] == pytest.approx(1.0, abs=1e-3), (key, method)
            assert r[method]["necessity"] == pytest.approx(1.0, abs=1e-3), (key, method)
            assert r[method]["fvu"] == pytest.approx(0.0, abs=1e-8)
        assert r["sublayer_sae_control"]["io"]["ld_sae_edit"]["64"] == pytest.approx(
            r["sublayer_sae_control"]["io"]["ld_counterfactual_patch"], abs=1e-4
        )
    # benchmarks/sage_sublayer.py reports this output: one table row and one bar group per location
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "sage_sublayer", Path(__file__).resolve().parents[1] / "benchmarks" / "sage_sublayer.py"
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    results = {"saes": {"layers.0.resid_post": {"k": 32, "eval_fvu": 0.0, "seconds": 0.0}},
               "tasks": {"ioi": {"blocks": {"1": out}}}}
    assert [(t, k) for t, k, _ in study.rows(results)] == [("ioi", k) for k in out["locations"]]
    study.print_tables(results)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ioi |")]
    assert len(table) == 2 and all("| **1.00** |" in line for line in table)
    study.plot(results, tmp_path / "sublayer.png")
    assert (tmp_path / "sublayer.png").stat().st_size > 1000
    # a residual SAE that reconstructs badly is worse by the sublayer method than the exact sublayer SAE
    bad = SparseAutoencoder(
        SAEConfig(d_in=32, n_latents=64, activation="topk", k=2, hook_point="layers.0.resid_post")
    ).eval()
    out2 = compare_sublayer_methods(llama, bad, subs, fit, ev, locs[:1], control=False)
    r = out2["locations"]["layers.1.mlp_out@END"]
    assert r["residual_recomputed"]["fvu"] > 0.05 and r["sublayer_sae"]["fvu"] == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="hook_point"):
        compare_sublayer_methods(llama, res_sae, {"layers.1.attn_out": subs["layers.1.mlp_out"]}, fit, ev, locs)


def test_supervised_fit_comparison_tiny(llama, ioi):
    from hf_sae.evaluation.sage.validation import supervised_fit_comparison

    fit, ev = ioi.split(12)
    loc = "layers.1.resid_pre@END"
    res = supervised_fit_comparison(llama, fit, ev, [loc])[loc]
    assert set(res) >= {"mean", "regression", "mean_norm_matched", "regression_norm_matched", "norm_ratio_mean"}
    assert 0.5 < res["norm_ratio_mean"] < 1.5 and 0.5 < res["norm_ratio_regression"] < 1.5
    # the same ablation and clean LD underlie every variant; sufficiency is their ratio
    den = res["ld_clean"] - res["ld_mean_ablation"]
    for k in ("mean", "regression", "mean_norm_matched"):
        assert res[k]["sufficiency"] == pytest.approx((res[k]["ld"] - res["ld_mean_ablation"]) / den, rel=1e-9)
    assert res["mean"]["ld"] != pytest.approx(res["mean_norm_matched"]["ld"], abs=1e-6)  # rescaling changes LD
