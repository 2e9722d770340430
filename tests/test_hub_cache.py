"""Activation caches pushed to a Hub dataset repo (hf_sae.data.hub_cache), against the local fake Hub:
training from ``hf://datasets/...`` draws the batches of the local cache and trains the same SAE."""

from pathlib import Path

import pytest
import torch
from test_hub import hub  # noqa: F401  (the FakeHub fixture, with huggingface_hub pointed at it)

from hf_sae import SparseAutoencoder
from hf_sae.data.cache import write_activations
from hf_sae.data.hub_cache import HubCachedActivations, parse_hub_path, push_cache
from hf_sae.training import SAETrainingArguments, train

HPS = ["layers.0.resid_post", "layers.1.resid_post"]


def _args(activations, out, **kw):
    return SAETrainingArguments(
        hook_points=HPS, activations=activations, n_latents=64, k=4, batch_size=256, train_tokens=256 * 12,
        checkpoint_every_tokens=0, eval_every_tokens=0, eval_tokens=0, dead_tokens_threshold=512, lr=1e-2,
        seed=3, log_with=["jsonl"], progress_bar=False, plot_report=False, mixed_precision="no",
        init_tokens=512, output_dir=str(out), **kw)


def test_train_from_hub_cache_equals_local_cache(hub, tmp_path):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 16, generator=g)
    write_activations(tmp_path / "acts", {HPS[0]: x, HPS[1]: x.flip(0) * 2 + 1}, dtype="float32", shard_tokens=512)
    address = push_cache(tmp_path / "acts", "test-user/kjv-acts")
    assert address == "hf://datasets/test-user/kjv-acts"

    # the reader yields exactly the local reader's batches (same shuffle, same process sharding)
    local = __import__("hf_sae.data.cache", fromlist=["x"]).CachedActivations(
        tmp_path / "acts", hook_point=HPS, batch_size=300, seed=5, process_index=1, num_processes=2)
    remote = HubCachedActivations(address, hook_point=HPS, batch_size=300, seed=5, process_index=1, num_processes=2)
    pairs = list(zip(local, remote))
    assert len(pairs) == len(local) == len(remote) > 3
    for a, b in pairs:
        for h in HPS:
            assert torch.equal(a[h], b[h])
    shard_gets = [p for m, p in hub.requests if m == "GET" and "/datasets/test-user/kjv-acts/resolve/" in p
                  and p.endswith(".arrow")]
    assert len(shard_gets) == 2 * 8  # every shard of both hook points fetched once, from the Hub

    saes_local = train(_args(str(tmp_path / "acts"), tmp_path / "run-local"))
    saes_hub = train(_args(address, tmp_path / "run-hub"))
    for h in HPS:
        a = SparseAutoencoder.from_pretrained(str(tmp_path / "run-local" / h))
        b = SparseAutoencoder.from_pretrained(str(tmp_path / "run-hub" / h))
        assert a.config.training_info["tokens_trained"] == 256 * 12
        for k, v in a.state_dict().items():
            assert torch.equal(b.state_dict()[k], v), (h, k)
        assert saes_local[h].config.input_scale == saes_hub[h].config.input_scale


def test_hub_cache_address_errors():
    assert parse_hub_path("hf://datasets/org/name@v1") == ("org/name", "v1")
    with pytest.raises(ValueError, match="hf://datasets/<org>/<name>"):
        parse_hub_path("hf://datasets/just-a-name")


def test_streaming_cache_trains_the_same_sae(hub, tmp_path):  # noqa: F811
    """--streaming: the shards arrive through ``datasets`` streaming (a local folder, and the Hub over
    HfFileSystem) with nothing written to disk; the batches and the trained SAE are the local cache's."""
    from hf_sae.data.cache import CachedActivations
    from hf_sae.data.hub_cache import StreamingCachedActivations, StreamingHubCachedActivations, open_cache

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 16, generator=g)
    write_activations(tmp_path / "acts", {HPS[0]: x, HPS[1]: x.flip(0) * 2 + 1}, dtype="float32", shard_tokens=512)
    address = push_cache(tmp_path / "acts", "test-user/streamed-acts")

    kw = dict(hook_point=HPS, batch_size=300, seed=5, process_index=1, num_processes=2, shuffle_buffer_shards=2)
    local = CachedActivations(tmp_path / "acts", **kw)
    streamed = open_cache(str(tmp_path / "acts"), streaming=True, **kw)
    remote = open_cache(address, streaming=True, **kw)
    assert type(streamed) is StreamingCachedActivations and type(remote) is StreamingHubCachedActivations
    triples = list(zip(local, streamed, remote))
    assert len(triples) == len(local) > 3
    for a, b, c in triples:
        for h in HPS:
            assert torch.equal(a[h], b[h]) and torch.equal(a[h], c[h])
    assert len(remote._maps) <= 2 * 2 * len(HPS)  # only the shards of two shuffle groups are held
    assert not list(Path(remote._root).rglob("*.arrow"))  # no shard was written locally: streamed
    assert any(p.endswith(".arrow") for m, p in hub.requests if m == "GET" and "streamed-acts" in p)

    saes_local = train(_args(str(tmp_path / "acts"), tmp_path / "run-local"))
    for name, path in (("stream-local", str(tmp_path / "acts")), ("stream-hub", address)):
        train(_args(path, tmp_path / name, streaming=True))
        for h in HPS:
            b = SparseAutoencoder.from_pretrained(str(tmp_path / name / h))
            for k, v in saes_local[h].state_dict().items():
                assert torch.equal(b.state_dict()[k], v), (name, h, k)


def test_streaming_needs_a_cache(tmp_path):
    with pytest.raises(ValueError, match="--streaming=True is invalid: streams an activation cache"):
        SAETrainingArguments(activations=str(tmp_path / "x.safetensors"), streaming=True).validate()
