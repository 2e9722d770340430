"""Faithful N2G (prune to the shortest suffix, wildcards by blanking, a trie): planted explanations are
recovered exactly on an LM-free setup; the real-model activation function matches a full forward."""

import pytest
import torch
import transformers as T
from test_evaluation import tiny_lm, tiny_tokenizer  # noqa: F401  (module-scoped fixtures)

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.evaluation.n2g import (
    WILDCARD,
    N2GTrie,
    n2g_explain,
    n2g_faithful_evaluate,
    n2g_score,
    sae_latent_activation_fn,
)

BLANK, OF, THE, BEGIN, END = 0, 3, 4, 6, 7
VOCAB = 50


def _corpus(seed=0, rows=64, T=32):
    """Random tokens from 8..49 with planted 'of the' (some at positions 0-1, where no token precedes
    'of') and 'begin X end'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (rows, T), generator=g)
    for r in range(rows):
        for _ in range(3):
            t = int(torch.randint(0, T - 1, (1,), generator=g))
            ids[r, t], ids[r, t + 1] = OF, THE
        t = int(torch.randint(0, T - 2, (1,), generator=g))
        if ids[r, t] not in (OF, THE) and ids[r, t + 2] not in (OF, THE):
            ids[r, t], ids[r, t + 2] = BEGIN, END
    ids[::4, 0], ids[::4, 1] = OF, THE  # 'of the' at the very start: the latent does not fire there
    return ids


def _rule_of_the(ids):
    """Latent A: fires (value 2) on 'the' after 'of' after any token."""
    a = torch.zeros(ids.shape)
    a[:, 2:] = 2.0 * ((ids[:, 2:] == THE) & (ids[:, 1:-1] == OF)).float()
    return a


def _rule_begin_end(ids):
    """Latent B: fires (value 1.5) on 'end' two tokens after 'begin', whatever lies between."""
    a = torch.zeros(ids.shape)
    a[:, 2:] = 1.5 * ((ids[:, 2:] == END) & (ids[:, :-2] == BEGIN)).float()
    return a


def _fn(rule):
    """activation_fn: the rule at the last token of each sequence run alone."""
    return lambda seqs: torch.tensor([float(rule(torch.tensor([s]))[0, -1]) for s in seqs])


def _top_contexts(acts, ids, rows, n=8, width=8):
    T = ids.shape[1]
    flat = torch.where(rows.unsqueeze(-1), acts, torch.zeros_like(acts)).flatten()
    top = flat.topk(n).indices.tolist()
    return [ids[p // T, max(0, p % T - width + 1): p % T + 1].tolist() for p in top]


@pytest.mark.parametrize("rule, expected", [(_rule_of_the, [WILDCARD, OF, THE]),
                                            (_rule_begin_end, [BEGIN, WILDCARD, END])])
def test_planted_explanation_recovered_with_precision_and_recall_one(rule, expected):
    ids = _corpus()
    acts = rule(ids)
    train = torch.arange(ids.shape[0]) % 2 == 0
    trie = n2g_explain(_top_contexts(acts, ids, train), _fn(rule), blank_id=BLANK)
    pats = trie.patterns()
    assert [p for p, _, _ in pats] == [expected]
    assert pats[0][1] == pytest.approx(acts.max().item())  # mean activation of the pruned contexts
    assert pats[0][2] == 8  # all eight contexts merged into one trie leaf
    test_keep = ~train.unsqueeze(-1).expand_as(ids)
    fires = acts > 0
    assert int((fires & test_keep).sum()) >= 20  # enough held-out firings to score
    p, r, f = n2g_score(trie, ids, test_keep, fires)
    assert (p, r, f) == (1.0, 1.0, 1.0)


def test_check_can_fail_without_the_wildcard():
    """The same score drops when the leading wildcard is removed: 'of the' at the window start is a
    false positive, so precision 1 above is not automatic."""
    ids = _corpus()
    acts = _rule_of_the(ids)
    keep = torch.ones_like(ids, dtype=torch.bool)
    trie = N2GTrie()
    trie.add([OF, THE], 2.0)
    p, r, _ = n2g_score(trie, ids, keep, acts > 0)
    assert r == 1.0 and p < 0.95


def test_trie_merges_shared_suffixes_and_matches_any_pattern():
    trie = N2GTrie()
    trie.add([5, OF, THE], 1.0)
    trie.add([9, OF, THE], 3.0)
    trie.add([WILDCARD, END], 2.0)
    assert len(trie.root["children"]) == 2  # 'the' and 'end' roots; both 'of the' patterns share two nodes
    assert set(trie.root["children"][THE]["children"]) == {OF}
    ids = torch.tensor([[5, OF, THE, 9, OF, THE, 8, OF, THE, END, 12, END]])
    want = torch.zeros_like(ids, dtype=torch.bool)
    want[0, [2, 5, 9, 11]] = True
    assert torch.equal(trie.match(ids), want)
    assert torch.equal(N2GTrie().match(ids), torch.zeros_like(want))
    with pytest.raises(ValueError, match="keep_frac"):
        n2g_explain([[1, 2]], _fn(_rule_of_the), blank_id=0, keep_frac=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    lm = T.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    sae = SparseAutoencoder(SAEConfig(d_in=32, n_latents=64, k=8, hook_point="layers.0.resid_post")).eval()
    return lm, sae


def test_sae_activation_fn_matches_full_forward_despite_padding(tiny):
    """Sequences of different lengths in one right-padded batch give the latent value of their own
    unpadded forward (BOS prepended)."""
    from hf_sae.hooks import run_with_capture

    lm, sae = tiny
    seqs = [[5, 9, 11, 20], [7], [30, 31]]
    z_all = []
    for s in seqs:
        acts = run_with_capture(lm, torch.tensor([[1] + s]), ["layers.0.resid_post"])["layers.0.resid_post"]
        z_all.append(sae.encode(acts[0, -1].float()))
    lat = int(torch.stack(z_all).sum(0).argmax())
    got = sae_latent_activation_fn(lm, sae, "layers.0.resid_post", lat, bos_id=1, pad_id=0)(seqs)
    want = torch.stack([z[lat] for z in z_all])
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_faithful_evaluate_end_to_end_on_a_tiny_lm(tiny_lm, tiny_tokenizer):
    """The whole pipeline on text (tiny LM + word-level tokenizer): scores in [0, 1], patterns made of
    vocabulary tokens and wildcards, at most one pattern per top context."""
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=32, n_latents=64, k=4, hook_point="layers.1.resid_post")).eval()
    out = n2g_faithful_evaluate(tiny_lm, tiny_tokenizer, sae, "layers.1.resid_post", n_tokens=1500, n_latents=3,
                                top_contexts=3, max_context=4, window=32)
    s = out["summary"]
    assert s["n_latents"] == 3 and s["n_scored"] >= 1
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= s[key] <= 1.0
    V = len(tiny_tokenizer)
    for lat in out["latents"]:
        assert 1 <= sum(p["contexts"] for p in lat["patterns"]) <= 3
        assert all(t == WILDCARD or 0 <= t < V for p in lat["patterns"] for t in p["pattern"])


def test_hf_sae_eval_runs_faithful_n2g_only_when_named(tmp_path, tiny_lm, tiny_tokenizer):
    import argparse

    from hf_sae.evaluation.pipeline import parse_metrics as _parse_metrics
    from hf_sae.evaluation.run import add_eval_args, run_eval

    assert "n2g_faithful" not in _parse_metrics("all")
    with pytest.raises(ValueError, match="n2g_faithful"):
        _parse_metrics("n2g_faithfull")
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=32, n_latents=64, k=4, hook_point="layers.1.resid_post")).eval()
    args = add_eval_args(argparse.ArgumentParser()).parse_args(
        ["tiny-sae", "--out", str(tmp_path), "--no-progress", "--no-report", "--metrics", "n2g_faithful",
         "--n-tokens", "1200", "--window", "32", "--n2g-latents", "2"])
    res = run_eval(args, sae=sae, model=tiny_lm, tokenizer=tiny_tokenizer)
    assert res["n2g_faithful"]["summary"]["n_latents"] == 2
    assert res["summary"]["n2g_faithful_precision"] == res["n2g_faithful"]["summary"]["precision"]
    assert "n2g" not in res and "downstream" not in res
