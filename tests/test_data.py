"""hf_sae.data on tiny random Llama models (fast): corpus, windows, mask, stream, cache, reader, corruption, resume."""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_sae.data import (
    ActivationStream,
    CachedActivations,
    CorruptShardError,
    cache_activations,
    load_texts,
    load_windows,
    norm_stats_to_input_scale,
    token_mask,
    tokenize_windows,
)
from hf_sae.data import cache as cache_mod
from hf_sae.data.models import is_default_model, load_model
from hf_sae.hooks import run_with_capture

HOOKS = ["layers.0.resid_post", "layers.2.mlp_out"]
WORDS = ("in the beginning god created heaven and earth was without form void darkness upon face of deep "
         "let there be light it good day night").split()


def tiny_tokenizer():
    """A word-level tokenizer built in memory: <unk>=0, <s>=1 (BOS), </s>=2 (EOS = pad), then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + list("abcdefghijklmnopqrstuvwxyz.,;:"):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tiny_model(vocab: int, d: int = 32, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: a second OpenMP thread only adds contention on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    texts = list(load_texts("default", max_texts=40))
    windows = tokenize_windows(texts, tok, window=32, max_windows=320)
    return model, tok, windows


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    model, tok, windows = tiny
    out = tmp_path_factory.mktemp("cache") / "c"
    meta = cache_activations(model, tok, windows, HOOKS, out, max_tokens=3000, dtype="float32",
                             shard_tokens=700, progress=False)
    return out, meta


def direct(model, tok, windows, hook):
    """Reference: plain forward, then the default mask, flattened in window order -> [n, d]."""
    with torch.no_grad():
        a = run_with_capture(model, windows, [hook], stop_early=False)[hook]
    keep = token_mask(windows, tok)
    return a[keep], windows[keep], torch.arange(windows.shape[1]).expand_as(windows)[keep]


# ----------------------------------------------------------------------------------- corpus


def test_default_corpus_splits_are_disjoint_and_cover_kjv():
    train = list(load_texts("default"))
    val = list(load_texts("default", split="validation"))
    everything = list(load_texts("default", split="all"))
    assert (len(train), len(val), len(everything)) == (1133, 56, 1189)
    assert train[0].startswith("In the beginning God created the heaven and the earth.")
    assert val[0].startswith("God, who at sundry times and in divers manners")  # Hebrews 1:1
    assert everything[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sorted(train + val) == sorted(everything)
    assert len(list(load_texts("default", max_texts=5))) == 5
    with pytest.raises(ValueError, match="splits"):
        next(load_texts("default", split="test"))
    shipped = sum(p.stat().st_size for p in (Path(cache_mod.__file__).parent / "texts").glob("*.gz"))
    assert shipped < 1.5e6 and all(p.stat().st_size <= 1_000_000
                                   for p in (Path(cache_mod.__file__).parent / "texts").glob("*.gz"))


def test_local_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "from jsonl"}) + "\n\n" + json.dumps({"body": "again"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["pq one", "", "pq two"]}), tmp_path / "c.parquet")
    assert list(load_texts(str(tmp_path / "a.txt"))) == ["first para\nline two", "second para"]
    assert list(load_texts(str(tmp_path / "b.jsonl.gz"), text_column="body")) == ["from jsonl", "again"]
    assert list(load_texts(str(tmp_path / "c.parquet"), text_column="body")) == ["pq one", "pq two"]
    # a folder reads its files in sorted order (a.txt, b.jsonl.gz, c.parquet)
    (tmp_path / "a.txt").write_text("only\n")
    assert list(load_texts(str(tmp_path), text_column="body")) == ["only", "from jsonl", "again", "pq one", "pq two"]
    with pytest.raises(ValueError, match="'text'"):
        list(load_texts(str(tmp_path / "c.parquet")))
    with pytest.raises(FileNotFoundError):
        list(load_texts(str(tmp_path / "missing.txt")))


def test_tokenize_windows_packs_with_eos_and_bos():
    tok = tiny_tokenizer()
    v = tok.get_vocab()
    the, god, created, heaven, light = (v[w] for w in ("the", "god", "created", "heaven", "light"))
    w = tokenize_windows(["in the", "god created heaven", "light"], tok, window=4)
    # stream: in the </s> god created heaven </s> light </s>; each window = <s> + 3 stream tokens
    assert w.tolist() == [[1, v["in"], the, 2], [1, god, created, heaven], [1, 2, light, 2]]
    w2 = tokenize_windows(["in the", "god created heaven", "light"], tok, window=4, add_bos=False)
    assert w2.tolist() == [[v["in"], the, 2, god], [created, heaven, 2, light]]
    assert tokenize_windows(["in the"], tok, window=4, max_windows=0).shape == (0, 4)
    with pytest.raises(TypeError):
        tokenize_windows("in the beginning", tok)


def test_token_mask_excludes_first_and_special():
    tok = tiny_tokenizer()
    ids = torch.tensor([[1, 5, 2, 6], [7, 0, 8, 1]])
    assert token_mask(ids, tok).tolist() == [[False, True, False, True], [False, False, True, False]]
    want = [[False, True, False, True], [True, False, True, False]]
    assert token_mask(ids, tok, exclude_first=False).tolist() == want
    assert token_mask(ids, tok, exclude_special=False).tolist() == [
        [False, True, True, True],
        [False, True, True, True],
    ]
    assert token_mask(ids, [5, 8], exclude_first=False).tolist() == [
        [True, False, True, True],
        [True, True, False, True],
    ]
    with pytest.raises(ValueError):
        token_mask(torch.zeros(2, 2, 2, dtype=torch.long), tok)


def test_model_aliases_and_local_folder(tmp_path):
    assert all(is_default_model(a) for a in ("smollm2-135m", "default", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert not is_default_model("gpt2")
    tok = tiny_tokenizer()
    m = tiny_model(len(tok))
    m.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, tok2 = load_model(str(tmp_path / "m"))
    assert not m2.training and all(not p.requires_grad for p in m2.parameters())
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    assert tok2("in the").input_ids == tok("in the").input_ids
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope"))


def test_input_scale_formula():
    assert norm_stats_to_input_scale(4.0, 16) == 2.0
    with pytest.raises(ValueError):
        norm_stats_to_input_scale(float("nan"), 16)


# ----------------------------------------------------------------------------------- cache


def test_cache_matches_direct_forward_and_stats(tiny, cached):
    model, tok, windows = tiny
    out, meta = cached
    assert meta["num_tokens"] == 3000 and meta["hook_points"] == HOOKS
    n_win = meta["windows_done"]
    for h in HOOKS:
        ref, ids, pos = direct(model, tok, windows[:n_win], h)
        reader = CachedActivations(out, h, shuffle=False)
        x = reader.to_tensor()
        assert x.shape == (3000, 32) and reader.num_tokens == 3000 and reader.d_in == 32
        torch.testing.assert_close(x, ref[:3000], rtol=0, atol=0)
        rid, rpos, rwin = reader.tokens()
        assert torch.equal(rid, ids[:3000]) and torch.equal(rpos, pos[:3000])
        assert (rpos > 0).all() and torch.equal(load_windows(out)[rwin, rpos], rid)
        m = json.loads((out / h / "metadata.json").read_text())
        ref64 = ref[:3000].double()
        np.testing.assert_allclose(m["mean"], ref64.mean(0).numpy(), rtol=1e-9, atol=1e-12)
        msn = float((ref64**2).sum(1).mean())
        assert m["mean_sq_norm"] == pytest.approx(msn, rel=1e-9)
        assert m["input_scale"] == pytest.approx((32 / msn) ** 0.5, rel=1e-9)
        assert reader.input_scale == m["input_scale"]
        assert sum(s["num_rows"] for s in m["shards"]) == 3000 and len(m["shards"]) == 5
    assert torch.equal(load_windows(out), windows[:n_win])


def test_cache_is_a_datasets_folder(cached):
    import datasets

    out, _ = cached
    ds = datasets.load_from_disk(str(out / HOOKS[0]))
    assert ds.num_rows == 3000 and ds.column_names == ["activation", "input_ids", "position", "window"]
    x = CachedActivations(out, HOOKS[0], shuffle=False).to_tensor()
    assert torch.equal(torch.tensor(ds[100:105]["activation"]), x[100:105])


def test_fp16_and_bf16_storage_round_trip(tiny, tmp_path):
    model, tok, windows = tiny
    ref, _, _ = direct(model, tok, windows[:40], HOOKS[0])
    for dt, tdt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        cache_activations(model, tok, windows[:40], HOOKS[0], tmp_path / dt, max_tokens=400, dtype=dt, progress=False)
        r = CachedActivations(tmp_path / dt, shuffle=False, dtype=None)
        x = r.to_tensor()
        assert x.dtype == tdt and torch.equal(x, ref[:400].to(tdt))
        assert torch.equal(
            next(iter(CachedActivations(tmp_path / dt, shuffle=False, batch_size=400))), ref[:400].to(tdt).float()
        )


def test_reader_epochs_cover_every_row_once(cached):
    out, _ = cached
    r = CachedActivations(out, HOOKS[0], batch_size=256, shuffle_buffer_shards=2, return_tokens=True)
    full = r.to_tensor()
    ids, pos, win = r.tokens()
    key = {(int(w), int(p)): i for i, (w, p) in enumerate(zip(win, pos))}
    assert len(key) == 3000
    orders = []
    for epoch in (0, 1, 0):
        r.set_epoch(epoch)
        batches = list(r)
        assert len(batches) == len(r) == 12 and [b[HOOKS[0]].shape[0] for b in batches] == [256] * 11 + [184]
        idx = [key[(int(w), int(p))] for b in batches for w, p in zip(b["windows"], b["positions"])]
        assert sorted(idx) == list(range(3000))
        for b in batches[:3]:
            rows = torch.tensor([key[(int(w), int(p))] for w, p in zip(b["windows"], b["positions"])])
            assert torch.equal(b[HOOKS[0]], full[rows]) and torch.equal(b["input_ids"], ids[rows])
        orders.append(idx)
    assert orders[0] == orders[2] and orders[0] != orders[1]
    # batches mix shards: the first batch draws rows from at least 2 shards
    assert len({i // 700 for i in orders[0][:256]}) >= 2
    seq = torch.cat(list(CachedActivations(out, HOOKS[0], batch_size=1000, shuffle=False)))
    assert torch.equal(seq, full)
    # a background prefetch thread yields the very same batches; stopping early ends the thread
    pre = CachedActivations(out, HOOKS[0], batch_size=256, shuffle_buffer_shards=2, prefetch=2)
    pre.set_epoch(1)
    plain = CachedActivations(out, HOOKS[0], batch_size=256, shuffle_buffer_shards=2)
    plain.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(pre, plain, strict=True))
    it = iter(pre)
    next(it)
    it.close()


def test_reader_process_sharding_and_workers(cached):
    out, _ = cached
    per, keys = [], []
    for rank in range(3):
        r = CachedActivations(out, HOOKS[0], batch_size=200, process_index=rank, num_processes=3, return_tokens=True)
        bs = list(r)
        assert len(bs) == len(r) == 5  # 15 batches of 200 over 3 processes
        per.append(torch.cat([b[HOOKS[0]] for b in bs]))
        keys += [(int(w), int(p)) for b in bs for w, p in zip(b["windows"], b["positions"])]
    assert len(keys) == 3000 and len(set(keys)) == 3000
    single = torch.cat(list(CachedActivations(out, HOOKS[0], batch_size=200)))
    assert torch.equal(torch.cat([per[r][i * 200 : (i + 1) * 200] for i in range(5) for r in range(3)]), single)
    # DataLoader workers split a process's batches but keep its order
    r = CachedActivations(out, HOOKS[0], batch_size=200, process_index=1, num_processes=3)
    assert torch.equal(torch.cat(list(r)), per[1])
    dl = torch.utils.data.DataLoader(r, batch_size=None, num_workers=2)
    assert torch.equal(torch.cat(list(dl)), per[1])
    # an Accelerator (anything with process_index / num_processes) gives the same shard
    from types import SimpleNamespace

    acc = SimpleNamespace(process_index=2, num_processes=3)
    assert torch.equal(torch.cat(list(CachedActivations(out, HOOKS[0], batch_size=200, accelerator=acc))), per[2])
    # resume mid-epoch
    r.set_epoch(0, skip_batches=2)
    assert torch.equal(torch.cat(list(r)), per[1][400:])


def test_reader_multi_hook_rows_are_aligned(cached):
    out, _ = cached
    both = CachedActivations(out, HOOKS, batch_size=512, return_tokens=True)
    fa = CachedActivations(out, HOOKS[0], shuffle=False).to_tensor()
    fb = CachedActivations(out, HOOKS[1], shuffle=False).to_tensor()
    _, pos, win = both.tokens()
    key = {(int(w), int(p)): i for i, (w, p) in enumerate(zip(win, pos))}
    b = next(iter(both))
    rows = torch.tensor([key[(int(w), int(p))] for w, p in zip(b["windows"], b["positions"])])
    assert torch.equal(b[HOOKS[0]], fa[rows]) and torch.equal(b[HOOKS[1]], fb[rows])
    assert not torch.equal(fa[rows], fa[:512])
    with pytest.raises(ValueError, match="several hook points"):
        CachedActivations(out)
    with pytest.raises(ValueError, match="not in the cache"):
        CachedActivations(out, "layers.1.resid_post")
    with pytest.raises(FileNotFoundError):
        CachedActivations(out / "nope")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_shards_raise_naming_the_file(cached, tmp_path):
    out, _ = cached
    # truncated
    c1 = _copy(out, tmp_path / "t")
    shard = c1 / HOOKS[0] / "shard-00002.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=r"shard-00002\.arrow is truncated.*--resume"):
        list(CachedActivations(c1, HOOKS[0], batch_size=500))
    with pytest.raises(CorruptShardError, match=r"shard-00002\.arrow is truncated"):
        list(CachedActivations(c1, HOOKS[0], verify=False))
    with pytest.raises(CorruptShardError, match=r"shard-00002\.arrow is truncated"):
        list(CachedActivations(c1, HOOKS[0], prefetch=3))
    # flipped bytes in the data region: same size, caught by the checksum
    c2 = _copy(out, tmp_path / "f")
    shard = c2 / HOOKS[0] / "shard-00003.arrow"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00003\.arrow is corrupt \(sha256"):
        list(CachedActivations(c2, HOOKS[0], batch_size=500))
    # flipped bytes in the Arrow header without checksum verification: unreadable -> named too
    c3 = _copy(out, tmp_path / "h")
    shard = c3 / HOOKS[0] / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[0:8] = b"\x13" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00000\.arrow"):
        list(CachedActivations(c3, HOOKS[0], verify=False))


def _shas(path):
    meta = json.loads((Path(path) / "metadata.json").read_text())
    return [
        [s["sha256"] for s in json.loads((Path(path) / h / "metadata.json").read_text())["shards"]]
        for h in meta["hook_points"]
    ]


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_exactly(tiny, cached, tmp_path, monkeypatch):
    model, tok, windows = tiny
    ref_out, _ = cached
    out = tmp_path / "r"
    real_write = cache_mod._ShardWriter._write
    calls = {"n": 0}

    def dying_write(self, p):
        calls["n"] += 1
        if calls["n"] == 3:  # die while writing the third shard: a temp file is left behind
            (out / HOOKS[0] / "shard-00002.arrow.x.tmp").write_bytes(b"partial")
            (out / HOOKS[0] / "shard-00002.arrow").write_bytes(b"renamed but never recorded")
            raise _Killed
        return real_write(self, p)

    monkeypatch.setattr(cache_mod._ShardWriter, "_write", dying_write)
    kw = dict(max_tokens=3000, dtype="float32", shard_tokens=700, progress=False)
    with pytest.raises(_Killed):
        cache_activations(model, tok, windows, HOOKS, out, **kw)
    prog = json.loads((out / "progress.json").read_text())
    assert len(prog["shards"]) == 2 and not (out / "metadata.json").exists()
    with pytest.raises(ValueError, match="incomplete"):
        CachedActivations(out / HOOKS[0])
    monkeypatch.setattr(cache_mod._ShardWriter, "_write", real_write)
    with pytest.raises(ValueError, match="different settings"):
        cache_activations(model, tok, windows, HOOKS, out, **{**kw, "max_tokens": 2000})
    with pytest.raises(ValueError, match="resume=True"):
        cache_activations(model, tok, windows, HOOKS, out, resume=False, **kw)
    meta = cache_activations(model, tok, windows, HOOKS, out, **kw)
    assert meta["num_tokens"] == 3000
    assert _shas(out) == _shas(ref_out)  # byte-identical to the uninterrupted run
    assert not list((out / HOOKS[0]).glob("*.tmp"))
    # a corrupted shard is regenerated by a resume run
    shard = out / HOOKS[1] / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="shard-00001"):
        cache_activations(model, tok, windows, HOOKS, out, **kw)
    assert _shas(out) == _shas(ref_out)


def test_cache_errors(tiny, tmp_path):
    model, tok, windows = tiny
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other.txt").write_text("hi")
    with pytest.raises(ValueError, match="not an hf_sae cache"):
        cache_activations(model, tok, windows, HOOKS, tmp_path / "x", max_tokens=10, progress=False)
    with pytest.raises(ValueError, match="layers.9"):
        cache_activations(model, tok, windows, ["layers.9.resid_post"], tmp_path / "y", max_tokens=10, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        cache_activations(model, tok, windows, HOOKS, tmp_path / "z", max_tokens=10, dtype="int8", progress=False)
    with pytest.warns(UserWarning, match="ran out after"):
        meta = cache_activations(model, tok, windows[:3], HOOKS[0], tmp_path / "w", max_tokens=10_000, progress=False)
    assert meta["num_tokens"] == int(token_mask(windows[:3], tok).sum())


def test_cache_cli(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny
    from hf_sae.data import models

    monkeypatch.setattr(models, "load_model", lambda name, dtype=None, device=None, **placement: (model, tok))
    (tmp_path / "t.txt").write_text(" ".join(WORDS * 40) + "\n\n" + " ".join(WORDS[::-1] * 40) + "\n")
    meta = cache_mod.cache_main(
        [
            "--model",
            "tiny",
            "--hook-points",
            "layers.1.resid_post,layers.1.attn_out",
            "--dataset",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "o"),
            "--max-tokens",
            "500",
            "--window",
            "64",
            "--device",
            "cpu",
        ]
    )
    assert meta["num_tokens"] == 500 and meta["hook_points"] == ["layers.1.resid_post", "layers.1.attn_out"]
    assert CachedActivations(tmp_path / "o", "layers.1.attn_out").num_tokens == 500


# ----------------------------------------------------------------------------------- stream


def test_activation_stream_matches_forward_and_shards(tiny):
    model, tok, windows = tiny
    w = windows[:24]
    with torch.no_grad():
        full = run_with_capture(model, w, HOOKS, stop_early=False)
    keep = token_mask(w, tok)
    seen = []
    for rank in range(2):
        s = ActivationStream(
            model,
            tok,
            HOOKS,
            w,
            batch_tokens=100,
            shuffle_buffer_tokens=300,
            process_index=rank,
            num_processes=2,
            batch_windows=5,
        )
        batches = list(s)
        assert all(b[HOOKS[0]].shape == (100, 32) for b in batches[:-1])
        assert set(batches[0]) == set(HOOKS) | {"input_ids", "positions", "windows"}
        win = torch.cat([b["windows"] for b in batches])
        pos = torch.cat([b["positions"] for b in batches])
        assert (win % 2 == rank).all() and (pos > 0).all()  # rank r owns windows r, r+2, ...
        assert keep[win, pos].all() and torch.equal(torch.cat([b["input_ids"] for b in batches]), w[win, pos])
        for h in HOOKS:
            assert torch.equal(torch.cat([b[h] for b in batches]), full[h][win, pos])
        assert not torch.equal(win, win.sort().values)  # shuffled
        seen += list(zip(win.tolist(), pos.tolist()))
    assert sorted(seen) == sorted(zip(*[t.tolist() for t in keep.nonzero(as_tuple=True)]))
    ref = full[HOOKS[1]][keep]
    # unshuffled stream = forward order; max_tokens is exact
    s = ActivationStream(model, tok, HOOKS[1], w, batch_tokens=64, shuffle_buffer_tokens=0, max_tokens=300)
    got = torch.cat([b[HOOKS[1]] for b in s])
    assert torch.equal(got, ref[:300])


def test_write_activations_round_trip(tmp_path):
    from hf_sae.data import write_activations

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 24, generator=g) * 3 + 1
    y = torch.randn(1000, 8, generator=g)
    meta = write_activations(
        tmp_path / "w",
        {"layers.1.resid_post": x, "layers.1.mlp_out": y},
        dtype="float32",
        input_ids=torch.arange(1000),
        shard_tokens=300,
    )
    assert meta["num_tokens"] == 1000 and meta["num_shards"] == 4
    r = CachedActivations(tmp_path / "w", "layers.1.resid_post", shuffle=False)
    assert torch.equal(r.to_tensor(), x) and torch.equal(r.tokens()[0], torch.arange(1000))
    assert r.metadata["mean_sq_norm"] == pytest.approx(float((x.double() ** 2).sum(1).mean()), rel=1e-12)
    assert r.input_scale == pytest.approx((24 / r.metadata["mean_sq_norm"]) ** 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="same N"):
        write_activations(tmp_path / "v", {"a": x, "b": y[:10]})
