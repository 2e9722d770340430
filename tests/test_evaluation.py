"""Tests of hf_sae.evaluation: every metric against hand-computed values on small tensors, streamed
== one-shot, the identity-SAE / planted-latent sanity checks, and `hf-sae eval` end to end (tiny
random Llama + word-level tokenizer; one slow test on SmolLM2)."""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from itertools import islice

import pytest
import torch
import transformers as T
from _helpers import identity_sae

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.evaluation import (
    AFAStats,
    DownstreamStats,
    ReconstructionStats,
    ablation_sparsity,
    add_eval_args,
    afa_norms,
    afa_relative_gap,
    cosine_similarity,
    dead_fraction,
    decoder_cosine_stats,
    downstream_batch,
    explained_variance,
    fire_counts,
    firing_density_histogram,
    fit_probes_dense,
    fit_probes_sparse,
    fvu,
    kl_divergence,
    l0,
    latent_ablation_effects,
    loss_recovered,
    mse,
    n2g_evaluate,
    next_token_ce,
    ngram_codes,
    probe_loss_sparse,
    run_eval,
    run_probe_tasks,
    summarize_n2g,
    summarize_probe_results,
    task_labels,
)
from hf_sae.evaluation.n2g import decode_ngram
from hf_sae.evaluation.report import write_report

HOOK = "layers.0.resid_post"
EXTRA_WORDS = ["(", ")", '"', "0", "1", "42", "NASA", "IBM", "one", "two", "The", "In", "said", "man", "Yes", "No"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """Word-level tokenizer over the 600 most frequent words of the shipped KJV validation text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hf_sae.data.corpus import load_texts

    pre = pre_tokenizers.Whitespace()
    texts = list(islice(load_texts("default", split="validation"), 30))
    cnt = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in [w for w, _ in cnt.most_common(600)] + EXTRA_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _sae(d=32, n=128, k=8, seed=0, **kw):
    torch.manual_seed(seed)
    return SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, hook_point=HOOK, base_model="tiny", **kw)).eval()


def _identity_sae(d=32):
    return identity_sae(d, HOOK)


def _windows(tok, n=6, T_=48, seed=0):
    from hf_sae.data.corpus import load_texts, tokenize_windows

    return tokenize_windows(islice(load_texts("default", split="validation"), 40), tok, window=T_, max_windows=n)


# ------------------------------------------------------------------------------------------ reconstruction


def test_reconstruction_hand_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    xh = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
    # e = [[0,1],[1,0]]: sum||e||^2 = 2; mean x = [2,3], total variance 4; centred e: 4 * 0.25 = 1
    assert fvu(x, xh) == pytest.approx(0.5, abs=1e-15)
    assert mse(x, xh) == pytest.approx(0.5, abs=1e-15)
    assert explained_variance(x, xh) == pytest.approx(0.75, abs=1e-15)
    expected_cos = (3 / math.sqrt(10) + 22 / (5 * math.sqrt(20))) / 2
    assert cosine_similarity(x, xh) == pytest.approx(expected_cos, abs=1e-12)
    # mask keeps only the second token: a single token has zero variance -> FVU undefined (NaN)
    assert math.isnan(fvu(x, xh, mask=torch.tensor([False, True])))
    assert mse(x, xh, mask=torch.tensor([False, True])) == pytest.approx(0.5)


def test_latent_statistics_hand_values():
    vals = torch.tensor([[1.0, 0.0], [2.0, 3.0]])       # slot (0,1) is padding (value 0)
    idx = torch.tensor([[0, 1], [2, 3]])
    assert l0(vals, idx) == pytest.approx(1.5)
    fc = fire_counts(vals, idx, n_latents=5)
    assert fc.tolist() == [1, 0, 1, 1, 0]
    assert dead_fraction(fc) == pytest.approx(0.4)
    dense = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 3.0]])
    assert l0(latents=dense) == pytest.approx(1.0)
    assert fire_counts(latents=dense).tolist() == [1, 1, 1]
    h = firing_density_histogram(torch.tensor([0, 1, 10, 100]), n_tokens=100)
    # densities 1e-2, 1e-1, 1 -> bins starting at -2, -1 and the last bin (0 is clamped in)
    counts = h["counts"]
    assert h["n_dead"] == 1 and sum(counts) == 3
    assert counts[24] == 1 and counts[28] == 1 and counts[-1] == 1
    assert h["edges"][24] == pytest.approx(-2.0) and h["edges"][28] == pytest.approx(-1.0)


def test_reconstruction_stats_stream_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g) + 5.0           # large mean: tests the float64 variance formula
    xh = x + 0.3 * torch.randn(1000, 16, generator=g)
    sae = _sae(d=16, n=64, k=4)
    out = sae(x)
    one = ReconstructionStats(n_latents=64)
    one.update(x, xh, out.latent_values, out.latent_indices)
    stream = ReconstructionStats(n_latents=64)
    a, b = ReconstructionStats(n_latents=64), ReconstructionStats(n_latents=64)
    for i, s in enumerate(range(0, 1000, 137)):
        sl = slice(s, s + 137)
        stream.update(x[sl], xh[sl], out.latent_values[sl], out.latent_indices[sl])
        (a if i % 2 else b).update(x[sl], xh[sl], out.latent_values[sl], out.latent_indices[sl])
    merged = a.merge(b)
    r1, r2, r3 = one.compute(), stream.compute(), merged.compute()
    for k in r1:
        assert r2[k] == pytest.approx(r1[k], rel=1e-12, abs=1e-12), k
        assert r3[k] == pytest.approx(r1[k], rel=1e-12, abs=1e-12), k
    assert r1["fvu"] == pytest.approx(fvu(x, xh), rel=1e-12)
    assert r1["explained_variance"] == pytest.approx(explained_variance(x, xh), rel=1e-12)
    assert r1["cosine_similarity"] == pytest.approx(cosine_similarity(x, xh), rel=1e-12)
    assert r1["l0"] == pytest.approx(4.0)
    assert one.histograms() == stream.histograms()
    assert torch.equal(one.fire_counts, stream.fire_counts)
    # FVU by hand in float64
    xd, xhd = x.double(), xh.double()
    ref = ((xd - xhd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert r1["fvu"] == pytest.approx(float(ref), rel=1e-12)
    # dense latents give the same counts as the sparse code
    dense = ReconstructionStats(n_latents=64)
    dense.update(x, xh, latents=sae.encode(x))
    assert torch.equal(dense.fire_counts, one.fire_counts)


def test_reconstruction_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="must match"):
        fvu(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        fvu(x, torch.full((4, 3), float("nan")))
    s = ReconstructionStats(n_latents=8)
    with pytest.raises(ValueError, match="latent code"):
        s.update(x, x)
    with pytest.raises(ValueError, match="n_latents"):
        s.update(x, x, torch.ones(4, 2), torch.full((4, 2), 9))
    with pytest.raises(ValueError, match="before any update"):
        ReconstructionStats().compute()


# ------------------------------------------------------------------------------------------ downstream


def test_downstream_functions_hand_values():
    logits = torch.zeros(1, 3, 4)
    ids = torch.tensor([[0, 1, 2]])
    assert torch.allclose(next_token_ce(logits, ids), torch.full((1, 2), math.log(4)))
    p = torch.tensor([0.0, math.log(3.0)])     # softmax -> [0.25, 0.75]
    q = torch.tensor([0.0, 0.0])               # [0.5, 0.5]
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(kl_divergence(p, q)) == pytest.approx(expected, abs=1e-6)
    assert float(kl_divergence(p, p)) == 0.0
    assert loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    s1, s2 = DownstreamStats(), DownstreamStats()
    vals = {k: torch.rand(50) for k in ("ce_clean", "ce_spliced", "kl", "ce_zero", "ce_mean")}
    s1.update(**vals)
    for i in range(0, 50, 7):
        s2.update(**{k: v[i:i + 7] for k, v in vals.items()})
    r1, r2 = s1.compute(), s2.compute()
    for k in r1:
        assert r2[k] == pytest.approx(r1[k], rel=1e-12)
    want = float(vals["ce_spliced"].double().mean() - vals["ce_clean"].double().mean())
    assert r1["delta_loss"] == pytest.approx(want)
    assert r1["frac_recovered_zero"] == pytest.approx(
        loss_recovered(r1["ce_clean"], r1["ce_spliced"], float(vals["ce_zero"].double().mean()))
    )


def test_identity_sae_gives_zero_delta_loss_and_kl(tiny_lm, tiny_tokenizer):
    from hf_sae.data.corpus import token_mask

    ids = _windows(tiny_tokenizer, n=3)
    keep = token_mask(ids, tiny_tokenizer)
    sae = _identity_sae()
    x = torch.randn(20, 32)
    assert torch.equal(sae(x).reconstruction, x)  # the construction is exact
    mean = torch.randn(32)
    out = downstream_batch(tiny_lm, sae, ids, keep, HOOK, mean_activation=mean)
    assert out["ce_clean"].numel() == int(keep[:, :-1].sum())
    assert torch.equal(out["ce_spliced"], out["ce_clean"])
    assert float(out["kl"].abs().max()) == 0.0
    s = DownstreamStats()
    s.update(out["ce_clean"], out["ce_spliced"], out["kl"], out["ce_zero"], out["ce_mean"])
    r = s.compute()
    assert r["delta_loss"] == 0.0 and r["kl"] == 0.0
    assert r["frac_recovered_zero"] == 1.0 and r["frac_recovered_mean"] == 1.0
    # a real (random) SAE changes the loss; the zero ablation changes it too
    out2 = downstream_batch(tiny_lm, _sae(), ids, keep, HOOK, mean_activation=mean, ablations=("zero",))
    assert "ce_mean" not in out2
    assert float(out2["kl"].mean()) > 0 and not torch.equal(out2["ce_zero"], out2["ce_clean"])


# ------------------------------------------------------------------------------------------ probes


def test_probe_fit_hand_value_and_sparse_equals_dense():
    # feature f in {0, 1}: f=0 -> 3 positives / 1 negative, f=1 -> 1 positive / 3 negatives.
    # MLE: sigma(b) = 3/4, sigma(w + b) = 1/4, loss = H(1/4) = -(1/4 ln 1/4 + 3/4 ln 3/4) in both groups.
    f = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0])
    y = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0]).bool()
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    w, b, loss = fit_probes_dense(f[:, None], y, l2=0.0)
    assert float(loss[0]) == pytest.approx(h, abs=1e-6)
    assert float(torch.sigmoid(b[0])) == pytest.approx(0.75, abs=1e-4)
    assert float(torch.sigmoid(w[0] + b[0])) == pytest.approx(0.25, abs=1e-4)
    ws, bs, ls = fit_probes_sparse(f[:, None], torch.zeros(8, 1, dtype=torch.long), y, n_latents=1, l2=0.0)
    assert float(ls[0]) == pytest.approx(h, abs=1e-6)
    assert float(ws[0]) == pytest.approx(float(w[0]), abs=1e-3)
    # on random non-separable data the sparse and dense solvers agree and the gradient vanishes
    g = torch.Generator().manual_seed(1)
    v = torch.rand(400, 1, generator=g) * (torch.rand(400, 1, generator=g) < 0.5)
    yy = torch.rand(400, generator=g) < 0.3 + 0.4 * v[:, 0]
    _, _, l_d = fit_probes_dense(v, yy, l2=0.0)
    w_s, b_s, l_s = fit_probes_sparse(v, torch.zeros(400, 1, dtype=torch.long), yy, 1, l2=0.0)
    assert float(l_s[0]) == pytest.approx(float(l_d[0]), abs=1e-7)
    wt = w_s.clone().requires_grad_(True)
    bt = b_s.clone().requires_grad_(True)
    z = v[:, 0].double() * wt + bt
    torch.nn.functional.binary_cross_entropy_with_logits(z, yy.double()).backward()
    assert abs(float(wt.grad)) < 1e-4 and abs(float(bt.grad)) < 1e-4  # vs ~0.1 at the start
    assert float(probe_loss_sparse(v, torch.zeros(400, 1, dtype=torch.long), yy, w_s, b_s)[0]) == pytest.approx(
        float(l_s[0]), abs=1e-9
    )


def test_planted_latent_gets_near_zero_probe_loss():
    g = torch.Generator().manual_seed(0)
    N, T_, n, k = 30, 20, 40, 4
    labels = torch.rand(N, T_, generator=g) < 0.3
    keep = torch.ones(N, T_, dtype=torch.bool)
    keep[:, 0] = False
    M = int(keep.sum())
    y = labels[keep]
    idx = torch.stack([torch.randperm(n - 1, generator=g)[: k - 1] for _ in range(M)])
    idx = torch.where(idx >= 7, idx + 1, idx)  # latent 7 never appears among the random ones
    vals = torch.rand(M, k - 1, generator=g) * 3
    code_i = torch.cat([idx, torch.full((M, 1), 7)], 1)
    code_v = torch.cat([vals, y.float()[:, None] * 2.5], 1)  # latent 7 = 2.5 * label
    x = torch.randn(M, 8, generator=g)
    out = run_probe_tasks({"planted": labels}, keep, torch.arange(N) % 3 != 2, code_v, code_i, n, x=x, n_random=8)
    res = {r.method: r for r in out["results"]}
    assert res["sae"].feature == 7
    assert res["sae"].test_loss < 0.02 and res["sae"].train_loss < 0.02
    assert res["raw_basis"].test_loss > 0.5 and res["random_directions"].test_loss > 0.5
    assert out["mean_probe_loss"]["sae"] == pytest.approx(res["sae"].test_loss)
    s = summarize_probe_results(
        [{"task": "a", "method": "sae", "test_loss": 0.1}, {"task": "b", "method": "sae", "test_loss": 0.3}]
    )
    assert s["mean_probe_loss"]["sae"] == pytest.approx(0.2) and s["n_tasks"]["sae"] == 2


def test_task_labels_hand_checked(tiny_tokenizer):
    text = 'The man said , In the beginning ( one two ) . NASA said " 42 " and 1'
    ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
    words = [tiny_tokenizer.decode([i]) for i in ids[0].tolist()]
    assert words == text.split()
    lab = task_labels(ids, tiny_tokenizer)

    def on(task):
        return [w for w, m in zip(words, lab[task][0].tolist()) if m]

    assert on("is_capitalised") == ["The", "In", "NASA"]
    assert on("is_all_caps") == ["NASA"]
    assert on("is_digit") == ["42", "1"]
    assert on("is_punctuation") == [",", "(", ")", ".", '"', '"']
    assert on("is_determiner") == ["The", "the"]
    assert on("is_number_word") == ["one", "two"]
    assert on("after_comma") == ["In"]
    assert on("starts_sentence") == ["NASA"]
    assert on("inside_parens") == ["one", "two"]
    assert on("inside_quotes") == ["42"]
    assert on("starts_word") == []  # a word-level tokenizer has no word-boundary markers
    with pytest.raises(ValueError, match="unknown probe tasks"):
        task_labels(ids, tiny_tokenizer, tasks=["nope"])


# ------------------------------------------------------------------------------------------ N2G


def test_ngram_codes_hand_values():
    ids = torch.tensor([[1, 2, 3]])
    assert ngram_codes(ids, 1, 10).tolist() == [[1, 2, 3]]
    assert ngram_codes(ids, 2, 10).tolist() == [[-1, 12, 23]]
    assert ngram_codes(ids, 3, 10).tolist() == [[-1, -1, 123]]
    assert decode_ngram(123, 3, 10) == [1, 2, 3]
    with pytest.raises(ValueError):
        ngram_codes(torch.tensor([[11]]), 1, 10)


def test_n2g_planted_token_and_bigram_latents():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (40, 30), generator=g)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    acts = torch.zeros(40, 30, 3)
    acts[..., 0] = (ids == 7).float() * (1 + torch.rand(40, 30, generator=g))  # fires exactly on token 7
    prev = torch.zeros_like(ids)
    prev[:, 1:] = ids[:, :-1]
    acts[..., 1] = ((prev == 3) & (ids == 5)).float()  # fires on the bigram "3 5"
    acts[..., 2] = (torch.rand(40, 30, generator=g) < 0.2).float()  # random: not explainable
    train = torch.arange(40) % 2 == 0
    ex = n2g_evaluate(ids, keep, train, acts, [100, 101, 102], vocab_size=10)
    e0, e1, e2 = ex
    assert e0.latent == 100 and [(n, c) for n, c, _, _ in e0.patterns] == [(1, 7)]
    assert e0.precision == 1.0 and e0.recall == 1.0 and e0.f1 == 1.0
    assert [(n, c) for n, c, _, _ in e1.patterns] == [(2, 35)]
    assert e1.precision == 1.0 and e1.recall == 1.0
    assert e2.f1 < 0.5
    s = summarize_n2g(ex)
    assert s["n_scored"] == 3 and s["f1"] == pytest.approx((2 + e2.f1) / 3)


# ------------------------------------------------------------------------------------------ ablation


def test_ablation_sparsity_hand_values():
    V = 4
    assert float(ablation_sparsity(torch.tensor([0.0, 3.0, 0.0, 0.0]))) == pytest.approx(1 / V)
    assert float(ablation_sparsity(torch.full((V,), -2.0))) == pytest.approx(1.0)
    assert float(ablation_sparsity(torch.tensor([1.0, -1.0, 0.0, 0.0]))) == pytest.approx(0.5)
    assert math.isnan(float(ablation_sparsity(torch.zeros(V))))
    batch = ablation_sparsity(torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert batch.tolist() == pytest.approx([0.25, 1.0])


def test_latent_ablation_effects_on_tiny_lm(tiny_lm, tiny_tokenizer):
    from hf_sae.data.corpus import token_mask
    from hf_sae.hooks import run_with_capture

    ids = _windows(tiny_tokenizer, n=2, T_=24)
    keep = token_mask(ids, tiny_tokenizer)
    sae = _sae()
    acts = run_with_capture(tiny_lm, ids, [HOOK])[HOOK]
    p0 = int(keep[0, 2:12].nonzero()[0]) + 2  # an early kept position of window 0
    p1 = int(keep[1].nonzero()[-1])  # the last kept position of window 1
    with torch.no_grad():
        v, i = sae.encode_sparse(acts[0, p0])
    j_active = int(i[v.argmax()])
    inactive = sorted(set(range(128)) - set(i.tolist()))[0]
    res = latent_ablation_effects(
        tiny_lm, sae, ids, keep, HOOK, [(0, p0, j_active), (0, p0, inactive), (1, p1, j_active)], batch_size=2
    )
    assert res[0]["latent"] == j_active and res[0]["value"] == pytest.approx(float(v.max()), rel=1e-5)
    V = tiny_lm.config.vocab_size
    assert 1 / V <= res[0]["sparsity"] <= 1 and res[0]["n_positions"] == 24 - p0
    assert res[1]["value"] == 0.0 and math.isnan(res[1]["sparsity"])  # nothing to ablate: no effect
    assert res[2]["row"] == 1 and res[2]["position"] == p1
    with pytest.raises(ValueError, match="not a kept position"):
        latent_ablation_effects(tiny_lm, sae, ids, keep, HOOK, [(0, 0, 1)])


# ------------------------------------------------------------------------------------------ AFA


def test_afa_hand_values_and_streaming():
    x = torch.tensor([[3.0, 4.0]])
    xn, zn = afa_norms(x, torch.zeros(2), torch.ones(5), torch.tensor([[3.0]]), torch.tensor([[2]]))
    assert float(xn) == pytest.approx(5.0) and float(zn) == pytest.approx(3.0)
    assert float(afa_relative_gap(xn, zn)) == pytest.approx(0.64)
    # input_scale and b_dec: x*2 - b = [6, 8] - [0, 2] = [6, 6]
    xn2, _ = afa_norms(x, torch.tensor([0.0, 2.0]), torch.ones(5), latents=torch.zeros(1, 5), input_scale=2.0)
    assert float(xn2) == pytest.approx(math.sqrt(72))
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    c = decoder_cosine_stats(W, chunk=2)
    assert c["eps_max"] == pytest.approx(1 / math.sqrt(2))
    assert c["eps_mean"] == pytest.approx(2 * (1 / math.sqrt(2)) / 3)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(500, generator=g) + 0.5, torch.rand(500, generator=g) + 0.5
    xz, fz = a + 1.0, b + 1.0  # a ZF pair (||x||, ||f~||)
    one, stream = AFAStats(max_points=100, n_latents=9), AFAStats(max_points=100, n_latents=9)
    one.update(a, b, zf=(xz, fz))
    for s in range(0, 500, 60):
        stream.update(a[s : s + 60], b[s : s + 60], zf=(xz[s : s + 60], fz[s : s + 60]))
    r1, r2 = one.compute(), stream.compute()
    for k in r1:
        assert r2[k] == pytest.approx(r1[k], rel=1e-12)
    gap = afa_relative_gap(a, b)
    assert r1["afa_gap_mean"] == pytest.approx(float(gap.mean()), rel=1e-12)
    assert r1["afa_norm_mse"] == pytest.approx(float((b.double() - a.double()).square().mean()), rel=1e-12)
    assert one.histogram() == stream.histogram() and sum(one.histogram()["counts"]) == 500
    assert torch.equal(one.points[0], stream.points[0]) and one.points[0].numel() == 100
    r = (xz.double().square() - fz.double().square()) / fz.double().square()
    assert r1["eps_lbo_mean"] == pytest.approx(float(r.abs().mean()) / 8, rel=1e-12)
    assert r1["zf_frac_in_025"] == pytest.approx(float((r.abs() <= 0.25).double().mean()))


def test_afa_from_sae_matches_modeling_loss():
    sae = _sae(d=16, n=64, k=4)
    x = torch.randn(50, 16)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16))  # with b_dec = 0 and unit rows the two AFA forms coincide
        out = sae(x)
    s = AFAStats()
    s.update_from_sae(sae, x, out)
    # the centred AFA loss is mean((||z~|| - ||x - b||)^2): the same quantity
    sae.config.afa_variant = "centred"
    with torch.no_grad():
        centred = sae(x).afa_loss
    assert s.compute()["afa_norm_mse"] == pytest.approx(float(centred), rel=1e-5)
    assert s.compute()["afa_norm_mse"] != pytest.approx(float(out.afa_loss), rel=1e-3)  # the reference form differs


# ------------------------------------------------------------------------------------------ report + CLI


def test_write_report(tmp_path):
    res = {
        "meta": {"hook_point": HOOK},
        "summary": {"fvu": 0.1},
        "reconstruction": {
            "fvu": 0.1,
            "l0": 2.0,
            "histograms": {
                "l0": {"values": [0, 1, 2], "counts": [0, 3, 5]},
                "density_log10": {"edges": [-2, -1, 0], "counts": [1, 2], "n_dead": 0},
            },
        },
        "afa": {"afa_gap_mean": 0.1, "gap_histogram": {"edges": [0, 0.5, 1], "counts": [2, 3]}},
    }
    written = write_report(res, tmp_path, zf_points=([1.0, 2.0], [1.1, 1.9]))
    names = {p.name for p in written}
    assert {"report.html", "l0_histogram.png", "firing_density.png", "afa_zf_plot.png", "afa_gap.png"} <= names
    html = (tmp_path / "report.html").read_text()
    assert "<img src='data:image/png;base64," in html and "Reconstruction" in html  # inlined: the page alone suffices
    assert (tmp_path / "afa_zf_plot.png").read_bytes()[:4] == b"\x89PNG"


def _eval_args(sae_path, out, extra=()):
    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args([str(sae_path), "--out", str(out), "--no-progress", *extra])


def test_run_eval_end_to_end_tiny(tmp_path, tiny_lm, tiny_tokenizer):
    sae = _sae()
    sae.save_pretrained(tmp_path / "sae")
    args = _eval_args(
        tmp_path / "sae",
        tmp_path / "out",
        [
            "--n-tokens",
            "3000",
            "--window",
            "64",
            "--downstream-tokens",
            "200",
            "--probe-tokens",
            "2500",
            "--n2g-latents",
            "8",
            "--ablation-latents",
            "4",
            "--ablation-context",
            "32",
            "--split",
            "all",
        ],
    )
    res = run_eval(args, model=tiny_lm, tokenizer=tiny_tokenizer)
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["meta"]["n_tokens"] == 3000 == res["reconstruction"]["n_tokens"]
    for key in (
        "fvu",
        "l0",
        "dead_fraction",
        "delta_loss",
        "kl",
        "frac_recovered_zero",
        "mean_probe_loss_sae",
        "mean_probe_loss_raw_basis",
        "n2g_f1",
        "ablation_sparsity",
        "afa_gap_mean",
        "eps_max",
    ):
        assert key in on_disk["summary"], key
    assert on_disk["reconstruction"]["l0"] == pytest.approx(8.0)
    assert len(on_disk["probes"]["per_task"]) >= 5
    assert on_disk["downstream"]["n_predictions"] == 200
    for f in (
        "report.html",
        "l0_histogram.png",
        "firing_density.png",
        "downstream.png",
        "probes.png",
        "afa_zf_plot.png",
        "afa_gap.png",
    ):
        assert (tmp_path / "out" / f).is_file(), f
    # the reconstruction numbers equal a direct one-shot computation on the same tokens
    from hf_sae.data import corpus
    from hf_sae.hooks import run_with_capture

    ids = corpus.tokenize_windows(corpus.load_texts("default", split="all"), tiny_tokenizer, window=64, max_windows=70)
    keep = corpus.token_mask(ids, tiny_tokenizer)
    flat = keep.flatten().clone()
    flat[flat.nonzero().squeeze(-1)[3000:]] = False
    keep = flat.view_as(keep)
    x = run_with_capture(tiny_lm, ids, [HOOK])[HOOK][keep]
    assert res["reconstruction"]["fvu"] == pytest.approx(fvu(x, sae(x).reconstruction), rel=1e-5)


def test_evaluate_sae_is_the_typed_form_of_run_eval(tmp_path, tiny_lm, tiny_tokenizer):
    """The CLI adapter adds nothing: the typed call (no files) returns the numbers run_eval writes."""
    from hf_sae.evaluation import evaluate_sae

    sae = _sae()
    argv = ["--metrics", "reconstruction,n2g,ablation", "--n-tokens", "1500", "--window", "64",
            "--n2g-latents", "4", "--ablation-latents", "2", "--ablation-context", "32", "--split", "all"]
    cli = run_eval(_eval_args(tmp_path / "sae", tmp_path / "out", argv), sae=sae, model=tiny_lm,
                   tokenizer=tiny_tokenizer)
    typed = evaluate_sae(sae, tiny_lm, tiny_tokenizer, metrics=["reconstruction", "n2g", "ablation"], n_tokens=1500,
                         window=64, n2g_latents=4, ablation_latents=2, ablation_context=32, split="all",
                         progress=False, sae_label=str(tmp_path / "sae"))
    assert "out_dir" not in typed  # no out_dir: nothing written
    for res in (cli, typed):
        res.pop("timings_s")
    cli.pop("out_dir")
    assert typed == cli and set(typed) == {"meta", "reconstruction", "n2g", "ablation", "summary"}
    assert typed["summary"]["fvu"] == typed["reconstruction"]["fvu"] and typed["meta"]["n_tokens"] == 1500
    with pytest.raises(ValueError, match="window must be > 0"):
        evaluate_sae(sae, tiny_lm, tiny_tokenizer, window=0)


def test_run_eval_bad_inputs(tmp_path, tiny_lm, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_eval(_eval_args(tmp_path / "missing", tmp_path / "o"))
    sae = _sae()
    sae.save_pretrained(tmp_path / "sae")
    with pytest.raises(ValueError, match="unknown metrics"):
        run_eval(
            _eval_args(tmp_path / "sae", tmp_path / "o", ["--metrics", "fvu,bogus"]),
            model=tiny_lm,
            tokenizer=tiny_tokenizer,
        )
    wrong = _sae(d=16, n=32, k=4)
    with pytest.raises(ValueError, match="d_in=16"):
        run_eval(_eval_args(tmp_path / "sae", tmp_path / "o"), sae=wrong, model=tiny_lm, tokenizer=tiny_tokenizer)


@pytest.mark.slow
def test_hf_sae_eval_smollm2(tmp_path, smollm2):
    """`hf-sae eval` on a freshly initialised SmolLM2 SAE (layers.3.resid_post): JSON + HTML report."""
    from hf_sae.evaluation.run import main

    model, tok = smollm2
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        SAEConfig(
            d_in=576,
            expansion_factor=4,
            k=32,
            hook_point="layers.3.resid_post",
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    )
    with torch.no_grad():  # b_dec at the data mean keeps FVU meaningful for an untrained SAE
        from hf_sae.hooks import run_with_capture

        ids = torch.tensor([tok("In the beginning God created the heaven and the earth.")["input_ids"]])
        sae.b_dec.copy_(run_with_capture(model, ids, ["layers.3.resid_post"])["layers.3.resid_post"][0, 1:].mean(0))
    sae.save_pretrained(tmp_path / "sae")
    main(
        [
            str(tmp_path / "sae"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--n-tokens",
            "4000",
            "--window",
            "128",
            "--downstream-tokens",
            "256",
            "--probe-tokens",
            "4000",
            "--n2g-latents",
            "8",
            "--ablation-latents",
            "4",
            "--ablation-context",
            "32",
        ]
    )  # the model comes from config.base_model
    out = tmp_path / "out"
    data = json.loads((out / "metrics.json").read_text())
    assert data["meta"]["n_tokens"] == 4000 and data["reconstruction"]["l0"] == pytest.approx(32.0)
    ds = data["downstream"]
    assert 1.0 < ds["ce_clean"] < 6.0 and ds["ce_zero_ablation"] > ds["ce_clean"]
    assert ds["kl"] > 0
    assert (out / "report.html").is_file() and (out / "probes.png").is_file()
    assert len(data["probes"]["per_task"]) >= 8
    assert data["meta"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_run_eval_dense_activation_sae(tmp_path, tiny_lm, tiny_tokenizer):
    """A ReLU (dense-code) SAE goes through the same driver: the code kept for probes/N2G/ablation is
    each token's largest latents, the reconstruction statistics use the full dense code."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, n_latents=800, activation="relu", hook_point=HOOK)).eval()
    args = _eval_args(
        "relu-sae",
        tmp_path / "out",
        [
            "--n-tokens",
            "1500",
            "--window",
            "64",
            "--metrics",
            "reconstruction,probes,n2g,ablation",
            "--probe-tokens",
            "1500",
            "--probe-baselines",
            "",
            "--n2g-latents",
            "4",
            "--ablation-latents",
            "2",
            "--ablation-context",
            "32",
            "--split",
            "all",
            "--no-report",
        ],
    )
    res = run_eval(args, sae=sae, model=tiny_lm, tokenizer=tiny_tokenizer)
    assert res["meta"]["code_truncated_to"] == 256  # ~half of 800 random ReLU latents are active
    assert 256 < res["reconstruction"]["l0"] < 800
    assert "downstream" not in res and "afa" not in res
    assert set(res["probes"]["summary"]) >= {"mean_probe_loss_sae"}
    assert not (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "metrics.json").is_file()


def test_downstream_reuses_clean_log_probs_exactly(tiny_lm, tiny_tokenizer):
    """Scoring several SAEs on the same windows: passing the clean log-probs gives the same numbers as
    recomputing them (and a wrong clean run changes the KL, so the argument is really used)."""
    from hf_sae.data.corpus import token_mask
    from hf_sae.evaluation.downstream import clean_next_token_log_probs

    ids = _windows(tiny_tokenizer, n=2)
    keep = token_mask(ids, tiny_tokenizer)
    sae = _sae()
    ref = downstream_batch(tiny_lm, sae, ids, keep, HOOK, ablations=())
    clean = clean_next_token_log_probs(tiny_lm, ids)
    assert clean.shape == (*ids.shape[:1], ids.shape[1] - 1, len(tiny_tokenizer))
    got = downstream_batch(tiny_lm, sae, ids, keep, HOOK, ablations=(), clean_log_probs=clean)
    for key in ("ce_clean", "ce_spliced", "kl"):
        assert torch.equal(got[key], ref[key]), key
    shifted = downstream_batch(tiny_lm, sae, ids, keep, HOOK, ablations=(), clean_log_probs=clean.roll(1, dims=1))
    assert not torch.equal(shifted["kl"], ref["kl"])
