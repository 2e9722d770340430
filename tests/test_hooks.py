"""Tests of hf_sae.hooks on tiny randomly initialised models of each supported family.

No downloads: models are built from transformers config classes (3 blocks, hidden 32, vocab 100).
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as T

from hf_sae.hooks import (
    HOOK_KINDS,
    capture,
    format_hook_point,
    hook_point_dim,
    hook_point_sort_key,
    list_hook_points,
    model_parts,
    parse_hook_point,
    register_hook,
    resolve_hook_point,
    run_with_capture,
    splice,
)

N_LAYERS, D, VOCAB = 3, 32, 100
_COMMON = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=N_LAYERS,
               num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)


def _build(family: str):
    if family == "llama":  # SmolLM2 is a Llama; GQA as in SmolLM2
        return T.LlamaForCausalLM(T.LlamaConfig(**_COMMON, num_key_value_heads=2))
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**_COMMON, num_key_value_heads=2))
    if family == "qwen2":  # q/k/v biases
        return T.Qwen2ForCausalLM(T.Qwen2Config(**_COMMON, num_key_value_heads=2))
    if family == "gpt2":  # Conv1D projections with biases, learned position embeddings
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=N_LAYERS, n_head=4,
                                              n_positions=64, bos_token_id=1, eos_token_id=2))
    if family in ("neox_parallel", "neox_sequential"):
        cfg = T.GPTNeoXConfig(**_COMMON, use_parallel_residual=family == "neox_parallel")
        return T.GPTNeoXForCausalLM(cfg)
    if family == "gemma":  # head_dim 16: n_heads*d_head = 64 != d_model
        return T.GemmaForCausalLM(T.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=16))
    if family == "gemma2":  # sandwich norms
        return T.Gemma2ForCausalLM(T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=8,
                                                  final_logit_softcapping=None))
    if family == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=8,
                                                      final_logit_softcapping=None))
    if family == "olmo2":  # post-norms only (no input norm)
        return T.Olmo2ForCausalLM(T.Olmo2Config(**_COMMON, num_key_value_heads=2))
    if family == "phi":  # parallel attention + MLP, biases, "dense" output projection
        return T.PhiForCausalLM(T.PhiConfig(**_COMMON))
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "neox_parallel", "neox_sequential", "gemma",
            "gemma2", "gemma3", "olmo2", "phi"]
SANDWICH = {"gemma2", "gemma3", "olmo2"}
D_HEAD = {"gemma": 16, "gemma2": 8, "gemma3": 8}


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = _build(family).eval()
    # Random init is tiny (std 0.02); scale weights up so that every block moves the residual
    # by O(1) and an error anywhere shows in the numbers.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]) if "emb" not in name and "wte" not in name else 1.0)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    return model


def make_ids(batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def hook_state(model):
    """All hooks of every module (ids), to check nothing was left registered."""
    return {
        n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs),
            tuple(m._forward_pre_hooks_with_kwargs))
        for n, m in model.named_modules()
    } | {"<forward patched>": "forward" in model.__dict__}


def no_hooks(model) -> bool:
    return all(not any(v) for k, v in hook_state(model).items() if k != "<forward patched>") and (
        "forward" not in model.__dict__)


# ----------------------------------------------------------------------------- names


def test_parse_and_format_hook_points():
    assert parse_hook_point("layers.6.mlp_out") == (6, "mlp_out")
    assert parse_hook_point("layers.0.attn_z") == (0, "attn_z")
    assert parse_hook_point("layers.12.resid_pre") == (12, "resid_pre")
    assert parse_hook_point("embed") == (None, "embed")
    for kind in HOOK_KINDS:
        assert format_hook_point(*parse_hook_point(f"layers.3.{kind}")) == f"layers.3.{kind}"
    assert format_hook_point(None, "embed") == "embed"
    for bad in ["layers.6", "layer.6.mlp_out", "layers.-1.resid_post", "layers.6.resid", "layers.x.mlp_out",
                "Layers.6.mlp_out", "layers.6.mlp_out ", "", "embed_tokens", "layers.06.mlp_out"]:
        with pytest.raises(ValueError, match="valid forms"):
            parse_hook_point(bad)
    with pytest.raises(ValueError, match=r"did you mean 'layers\.6\.resid_post'"):
        parse_hook_point("blocks.6.hook_resid_post")
    with pytest.raises(ValueError, match=r"did you mean 'layers\.2\.attn_z'"):
        parse_hook_point("blocks.2.attn.hook_z")
    with pytest.raises(ValueError, match="is a string"):
        parse_hook_point(6)
    names = ["layers.1.resid_post", "layers.0.mlp_out", "embed", "layers.1.resid_pre", "layers.0.attn_z",
             "layers.0.resid_post", "layers.0.attn_out", "layers.0.resid_pre"]
    assert sorted(names, key=hook_point_sort_key) == [
        "embed", "layers.0.resid_pre", "layers.0.attn_z", "layers.0.attn_out", "layers.0.mlp_out",
        "layers.0.resid_post", "layers.1.resid_pre", "layers.1.resid_post"]


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("family", FAMILIES)
def test_model_parts_and_hook_points(family):
    model = make_model(family)
    parts = model_parts(model)
    assert parts.n_layers == N_LAYERS and len(parts.blocks) == N_LAYERS
    assert parts.d_model == D and parts.n_heads == 4
    assert parts.d_head == D_HEAD.get(family, D // 4)
    assert parts.embed is model.get_input_embeddings()
    assert parts.lm_head is model.get_output_embeddings()
    assert parts.final_norm is not None and "norm" in type(parts.final_norm).__name__.lower()
    for i in range(N_LAYERS):
        assert "attention" in type(parts.attn(i)).__name__.lower()
        assert "mlp" in type(parts.mlp(i)).__name__.lower()
        proj = parts.attn_out_proj(i)
        assert proj.weight.numel() == D * parts.n_heads * parts.d_head
        assert (parts.post_attn_norm(i) is not None) == (family in SANDWICH)
        assert (parts.post_mlp_norm(i) is not None) == (family in SANDWICH)
    with pytest.raises(ValueError, match=r"has layers 0\.\.2"):
        parts.attn(3)

    names = list_hook_points(model)
    assert len(names) == 1 + 5 * N_LAYERS
    assert names[:6] == ["embed", "layers.0.resid_pre", "layers.0.attn_z", "layers.0.attn_out",
                         "layers.0.mlp_out", "layers.0.resid_post"]
    assert names[-1] == f"layers.{N_LAYERS - 1}.resid_post"
    assert names == sorted(names, key=hook_point_sort_key)
    assert hook_point_dim(model, "layers.1.attn_z") == parts.n_heads * parts.d_head
    assert hook_point_dim(model, "layers.1.mlp_out") == D

    site = resolve_hook_point(model, "layers.1.resid_pre")
    assert site.module is parts.blocks[1] and site.io == "input" and site.kwarg_name == "hidden_states"
    assert resolve_hook_point(model, "embed").module is parts.blocks[0]
    assert resolve_hook_point(model, "layers.2.resid_post").io == "output"
    site = resolve_hook_point(model, "layers.2.attn_z")
    assert site.module is parts.attn_out_proj(2) and site.io == "input"
    assert model.get_submodule(site.module_path) is site.module
    assert site.module_path.endswith(".2." + {"gpt2": "attn.c_proj", "phi": "self_attn.dense"}.get(
        family, "attention.dense" if family.startswith("neox") else "self_attn.o_proj"))
    site = resolve_hook_point(model, "layers.1.mlp_out")
    assert model.get_submodule(site.module_path) is site.module
    expected_attn = parts.post_attn_norm(0) if family in SANDWICH else parts.attn(0)
    assert resolve_hook_point(model, "layers.0.attn_out").module is expected_attn


@pytest.mark.parametrize("bad, match", [
    ("layers.3.resid_post", r"layers\.3 does not exist: .*has layers 0\.\.2"),
    ("layers.40.mlp_out", r"layers\.40 does not exist: .*LlamaForCausalLM.*has layers 0\.\.2"),
    ("layers.1.mlp", r"valid forms"),
    ("blocks.1.hook_mlp_out", r"layers\.1\.mlp_out"),
])
def test_unknown_hook_points_raise(bad, match):
    model = make_model("llama")
    with pytest.raises(ValueError, match=match):
        resolve_hook_point(model, bad)
    ids = make_ids()
    with pytest.raises(ValueError, match=match):
        run_with_capture(model, ids, ["layers.0.resid_post", bad])
    with pytest.raises(ValueError, match=match):
        with splice(model, {"layers.0.mlp_out": lambda x: x, bad: lambda x: x}):
            pass
    assert no_hooks(model)


def test_model_parts_rejects_non_transformers():
    with pytest.raises(ValueError, match="could not find the transformer blocks"):
        model_parts(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="nn.Module"):
        model_parts("gpt2")


# ----------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_hidden_states_and_decomposes(family):
    model = make_model(family)
    parts = model_parts(model)
    ids = make_ids()
    names = list_hook_points(model)
    with torch.no_grad(), capture(model, names, stop_early=False) as acts:
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == N_LAYERS + 1
    assert set(acts) == set(names)
    for n, a in acts.items():
        assert a.shape == (2, 7, hook_point_dim(model, n)), n

    # hidden_states[i] is the input of block i; hidden_states[-1] is after the final norm.
    assert torch.equal(acts["embed"], hs[0])
    for i in range(N_LAYERS):
        assert torch.equal(acts[f"layers.{i}.resid_pre"], hs[i])
    for i in range(N_LAYERS - 1):
        assert torch.equal(acts[f"layers.{i}.resid_post"], hs[i + 1])
        assert torch.equal(acts[f"layers.{i}.resid_post"], acts[f"layers.{i + 1}.resid_pre"])
    last = acts[f"layers.{N_LAYERS - 1}.resid_post"]
    assert not torch.allclose(last, hs[-1], atol=1e-3)
    torch.testing.assert_close(parts.final_norm(last), hs[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.lm_head(hs[-1]), out.logits, rtol=0, atol=1e-4)

    # embed is the residual entering block 0 (with GPT-2's position embeddings, Gemma's sqrt(d) scale).
    W = parts.embed.weight
    if family == "gpt2":
        expected = W[ids] + model.transformer.wpe.weight[:7][None]
    elif family.startswith("gemma"):
        expected = W[ids] * torch.tensor(math.sqrt(D))
    else:
        expected = W[ids]
    torch.testing.assert_close(acts["embed"], expected, rtol=1e-6, atol=1e-6)

    # What attention and MLP add is exactly the residual update (parallel-residual families too).
    for i in range(N_LAYERS):
        pre, post = acts[f"layers.{i}.resid_pre"], acts[f"layers.{i}.resid_post"]
        attn, mlp = acts[f"layers.{i}.attn_out"], acts[f"layers.{i}.mlp_out"]
        assert attn.abs().mean() > 0.05 and mlp.abs().mean() > 0.05  # both terms matter
        torch.testing.assert_close(pre + attn + mlp, post, rtol=0, atol=1e-5)

    # attn_z through the output projection (and the post-attention norm of sandwich blocks) is attn_out.
    with torch.no_grad():
        for i in range(N_LAYERS):
            z = acts[f"layers.{i}.attn_z"]
            assert z.shape[-1] == parts.n_heads * parts.d_head
            y = parts.attn_out_proj(i)(z)
            if parts.post_attn_norm(i) is not None:
                y = parts.post_attn_norm(i)(y)
            torch.testing.assert_close(y, acts[f"layers.{i}.attn_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox_parallel", "gemma2"])
def test_stop_early_runs_fewer_blocks_same_values(family):
    model = make_model(family)
    parts = model_parts(model)
    calls = [0] * N_LAYERS
    head_calls = [0]
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(parts.blocks)]
    handles.append(parts.lm_head.register_forward_pre_hook(lambda m, a: head_calls.__setitem__(0, head_calls[0] + 1)))
    before = hook_state(model)
    ids = make_ids()
    wanted = ["layers.0.mlp_out", "layers.0.resid_post", "embed", "layers.0.attn_z"]
    try:
        with torch.no_grad():
            early = run_with_capture(model, ids, wanted)
            assert calls == [1, 0, 0] and head_calls == [0]
            assert hook_state(model) == before
            full = run_with_capture(model, ids, wanted, stop_early=False)
            assert calls == [2, 1, 1] and head_calls == [1]
            assert list(early) == wanted
            for n in wanted:
                assert torch.equal(early[n], full[n]), n

            # capture() directly: the aborted forward returns None, the with-body goes on,
            # and a second forward in the same block is captured (and stopped) again.
            with capture(model, ["layers.1.resid_post"]) as acts:
                assert model(ids) is None
                first = acts["layers.1.resid_post"]
                assert model(ids[:1]) is None
                assert acts["layers.1.resid_post"].shape == (1, 7, D)
            assert calls == [4, 3, 1] and head_calls == [1]
            assert torch.equal(first[:1], acts["layers.1.resid_post"])
            # forward on a submodule: the abort is swallowed at the end of the with block
            with capture(model, ["layers.0.resid_post"]) as acts:
                model.base_model(ids)
                raise AssertionError("not reached: the forward was aborted")  # pragma: no cover
            assert torch.equal(acts["layers.0.resid_post"], full["layers.0.resid_post"])
        assert hook_state(model) == before
    finally:
        for h in handles:
            h.remove()
    assert no_hooks(model)


def test_run_with_capture_attention_mask_and_grad():
    model = make_model("llama")
    ids = make_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    gen = (n for n in ["layers.0.mlp_out", "layers.0.mlp_out", "layers.0.attn_out"])
    assert list(run_with_capture(model, ids, gen)) == ["layers.0.mlp_out", "layers.0.attn_out"]
    acts = run_with_capture(model, ids, "layers.1.resid_post", attention_mask=mask)
    assert list(acts) == ["layers.1.resid_post"] and not acts["layers.1.resid_post"].requires_grad
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        unmasked = run_with_capture(model, ids, ["layers.1.resid_post"])["layers.1.resid_post"]
    before = hook_state(model)  # output_hidden_states installed transformers' own recorders
    torch.testing.assert_close(acts["layers.1.resid_post"], hs[2], rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked[1], hs[2][1], atol=1e-3)  # the mask was used
    torch.testing.assert_close(unmasked[0], hs[2][0], rtol=0, atol=1e-6)
    live = run_with_capture(model, ids, ["layers.1.resid_post"], detach=False)["layers.1.resid_post"]
    assert live.requires_grad and live.grad_fn is not None
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        run_with_capture(model, ids[0], ["layers.1.resid_post"])
    with pytest.raises(ValueError, match="attention_mask shape"):
        run_with_capture(model, ids, ["layers.1.resid_post"], attention_mask=mask[:, :3])
    assert hook_state(model) == before


def test_capture_reads_keyword_inputs():
    """Decoder layers may get hidden_states as a keyword: the pre-hook reads (and splices) it."""
    model = make_model("gpt2")
    block = model_parts(model).blocks[0]
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        ref = block(x)
        with capture(model, ["layers.0.resid_pre", "layers.0.resid_post"], stop_early=False) as acts:
            out_kw = block(hidden_states=x)
        assert torch.equal(acts["layers.0.resid_pre"], x)
        assert torch.equal(out_kw, ref) and torch.equal(acts["layers.0.resid_post"], ref)
        with splice(model, {"layers.0.resid_pre": lambda h: h * 0.5}):
            out_pos, out_kw = block(x), block(hidden_states=x)
        assert torch.equal(out_pos, block(x * 0.5)) and torch.equal(out_kw, out_pos)
    assert no_hooks(model)


def test_hooks_removed_after_exceptions():
    model = make_model("qwen2")
    ids = make_ids()
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["layers.0.resid_post", "layers.2.attn_z"]) as acts:
            assert "forward" in model.__dict__ and not no_hooks(model)
            raise RuntimeError("boom")
    assert acts == {} and no_hooks(model)
    with pytest.raises(RuntimeError, match="inside"):
        with splice(model, {"layers.1.attn_z": lambda z: (_ for _ in ()).throw(RuntimeError("inside"))}):
            model(ids)
    assert no_hooks(model)
    with pytest.raises(ValueError):
        with splice(model, {"layers.1.mlp_out": lambda x: x[..., :-1]}), capture(model, ["layers.2.resid_post"]):
            model(ids)
    assert no_hooks(model)
    # transformers installs its own (permanent) recorders for output_hidden_states: they are kept.
    model(ids, output_hidden_states=True)
    before = hook_state(model)
    assert not no_hooks(model)
    with pytest.raises(ValueError):
        with splice(model, {"layers.0.resid_pre": lambda x: x[:, :-1]}):
            run_with_capture(model, ids, ["layers.1.resid_post"])
    assert hook_state(model) == before


# ----------------------------------------------------------------------------- splice


@pytest.mark.parametrize("family", FAMILIES)
def test_splice(family):
    model = make_model(family)
    parts = model_parts(model)
    ids = make_ids()
    L = N_LAYERS - 1
    with torch.no_grad():
        ref = model(ids).logits
        # identity: bit-identical, also when fn returns a new tensor (the replacement path runs)
        every = {n: (lambda x: x.clone()) for n in list_hook_points(model)}
        with splice(model, every):
            assert torch.equal(model(ids).logits, ref)
        with splice(model, {"layers.1.mlp_out": lambda x: x}):
            assert torch.equal(model(ids).logits, ref)

        # zero MLP output: the residual after block 1 is resid_pre + attn_out only
        with splice(model, {"layers.1.mlp_out": torch.zeros_like}), \
                capture(model, ["layers.1.resid_pre", "layers.1.attn_out", "layers.1.mlp_out",
                                "layers.1.resid_post"], stop_early=False) as acts:
            zeroed = model(ids).logits
        assert not torch.allclose(zeroed, ref, atol=1e-3)
        assert torch.equal(acts["layers.1.mlp_out"], torch.zeros(2, 7, D))
        torch.testing.assert_close(acts["layers.1.resid_pre"] + acts["layers.1.attn_out"],
                                   acts["layers.1.resid_post"], rtol=0, atol=1e-6)

        # doubling the last residual: logits are the head applied to final_norm(2 h)
        h = run_with_capture(model, ids, [f"layers.{L}.resid_post"])[f"layers.{L}.resid_post"]
        with splice(model, {f"layers.{L}.resid_post": lambda x: x * 2}):
            doubled = model(ids).logits
        assert not torch.equal(doubled, ref)
        torch.testing.assert_close(doubled, parts.lm_head(parts.final_norm(2 * h)), rtol=0, atol=1e-4)

        # zero attn_z: attention adds out_proj(0) (= its bias, then the post-norm if any)
        with splice(model, {"layers.0.attn_z": torch.zeros_like}), \
                capture(model, ["layers.0.attn_out"]) as acts:
            model(ids)
        zero_z = torch.zeros(2, 7, parts.n_heads * parts.d_head)
        expected = parts.attn_out_proj(0)(zero_z)
        if parts.post_attn_norm(0) is not None:
            expected = parts.post_attn_norm(0)(expected)
        torch.testing.assert_close(acts["layers.0.attn_out"], expected, rtol=0, atol=1e-6)

        # embed splice changes everything downstream; splicing embed = splicing layers.0.resid_pre
        # (a non-constant shift: LayerNorm models ignore a constant one)
        shift = torch.linspace(-1.0, 1.0, D)
        with splice(model, {"embed": lambda x: x + shift}):
            a = model(ids).logits
        with splice(model, {"layers.0.resid_pre": lambda x: x + shift}):
            b = model(ids).logits
        assert torch.equal(a, b) and not torch.allclose(a, ref, atol=1e-3)

        # wrong shape: ValueError naming the hook point and both shapes
        with pytest.raises(ValueError, match=r"'layers\.1\.attn_out'.*\(2, 7, 31\).*\(2, 7, 32\)"):
            with splice(model, {"layers.1.attn_out": lambda x: x[..., :-1]}):
                model(ids)
        with pytest.raises(TypeError, match="must return a Tensor"):
            with splice(model, {"layers.1.resid_post": lambda x: x.tolist()}):
                model(ids)
    assert no_hooks(model)


def test_splice_same_module_runs_in_forward_order_and_casts_dtype():
    model = make_model("llama")
    ids = make_ids()
    with torch.no_grad():
        with splice(model, {"layers.0.resid_pre": lambda x: x * 3, "embed": lambda x: x + 1}):
            a = model(ids).logits
        with splice(model, {"embed": lambda x: (x + 1) * 3}):
            b = model(ids).logits
        assert torch.equal(a, b)
        with splice(model, {"layers.1.resid_post": lambda x: x.double()}), \
                capture(model, ["layers.1.resid_post"]) as acts:
            model(ids)
        assert acts["layers.1.resid_post"].dtype == torch.float32
    with pytest.raises(ValueError, match="not callable"):
        with splice(model, {"layers.1.resid_post": 3}):
            pass
    assert no_hooks(model)


@pytest.mark.parametrize("hook_point", ["layers.1.resid_post", "layers.1.attn_z", "layers.0.mlp_out"])
def test_splice_gradients_flow(hook_point):
    """d loss / d delta for fn(x) = x + delta equals the summed gradient at the activation."""
    model = make_model("gemma2")
    ids = make_ids()
    dim = hook_point_dim(model, hook_point)
    delta = torch.zeros(dim, requires_grad=True)
    with splice(model, {hook_point: lambda x: x + delta}):
        loss = model(ids).logits.pow(2).mean()
    (delta_grad,) = torch.autograd.grad(loss, delta)
    with capture(model, [hook_point], stop_early=False, detach=False) as acts:
        loss2 = model(ids).logits.pow(2).mean()
    act = acts[hook_point]
    (g,) = torch.autograd.grad(loss2, act)
    assert torch.equal(loss, loss2)
    assert delta_grad.abs().max() > 1e-6
    torch.testing.assert_close(delta_grad, g.sum(dim=(0, 1)), rtol=1e-5, atol=1e-7)
    assert no_hooks(model)


def test_register_hook_handle():
    model = make_model("mistral")
    ids = make_ids()
    seen = []
    handle = register_hook(model, "layers.2.mlp_out", lambda x: seen.append(x.shape))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 7, D])]
    assert no_hooks(model)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_hook_points(smollm2):
    model, tokenizer = smollm2
    names = list_hook_points(model)
    parts = model_parts(model)
    assert parts.n_layers == 30 and parts.d_model == 576
    assert parts.n_heads == 9 and parts.d_head == 64
    assert len(names) == 1 + 5 * 30 and names[-1] == "layers.29.resid_post"
    with pytest.raises(ValueError, match=r"layers\.40 does not exist: .*has layers 0\.\.29"):
        resolve_hook_point(model, "layers.40.resid_post")
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        acts = run_with_capture(model, ids, ["layers.3.resid_post"])
    x = acts["layers.3.resid_post"][0]
    torch.testing.assert_close(x, hs[4][0], rtol=0, atol=1e-5)
    norms = x.norm(dim=-1)
    ratio = (norms[0] / norms[1:].median()).item()
    print(f"SmolLM2 layers.3.resid_post: position-0 norm {norms[0]:.1f}, median of others "
          f"{norms[1:].median():.1f}, ratio {ratio:.1f}")
    assert ratio > 5  # the attention-sink token carries a much larger residual norm


# ----------------------------------------------------------------------------- non-transformers toy


class _ToyAttention(torch.nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.num_heads = n_heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)  # not a known name: found as the last linear to d_model

    def forward(self, hidden_states):
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return self.out(w @ v), w  # a tuple, like HF attention modules


class _ToyBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.mixer = _ToyAttention(d, n_heads=2)  # found by class name
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU())
        self.mlp = self.ff

    def forward(self, hidden_states, scale=1.0):
        a, _ = self.mixer(hidden_states=self.ln(hidden_states))  # keyword call
        h = hidden_states + a
        return (h + self.mlp(h) * scale, None)  # decoder layers returning tuples (transformers 4 style)


class _ToyLM(torch.nn.Module):
    def __init__(self, d=16, n=2, vocab=20):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(_ToyBlock(d) for _ in range(n))
        self.norm = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, scale=1.0)[0]
        return self.lm_head(self.norm(h))


def test_toy_model_tuple_outputs_and_patched_forward():
    torch.manual_seed(0)
    model = _ToyLM().eval()
    parts = model_parts(model)
    assert (parts.n_layers, parts.d_model, parts.n_heads, parts.d_head) == (2, 16, 2, 8)
    assert parts.final_norm is model.norm and parts.attn_out_proj(1) is model.layers[1].mixer.out
    assert parts.attn(0) is model.layers[0].mixer and parts.mlp(0) is model.layers[0].mlp
    ids = torch.randint(0, 20, (2, 5))
    accel_forward = model.forward  # an instance-level forward, as accelerate's hooks install
    model.forward = accel_forward
    with torch.no_grad():
        acts = run_with_capture(model, ids, list_hook_points(model), stop_early=False)
        for i in range(2):
            torch.testing.assert_close(acts[f"layers.{i}.resid_pre"] + acts[f"layers.{i}.attn_out"]
                                       + acts[f"layers.{i}.mlp_out"], acts[f"layers.{i}.resid_post"])
            torch.testing.assert_close(parts.attn_out_proj(i)(acts[f"layers.{i}.attn_z"]),
                                       acts[f"layers.{i}.attn_out"])
        early = run_with_capture(model, ids, ["layers.0.resid_post"])
        assert torch.equal(early["layers.0.resid_post"], acts["layers.0.resid_post"])
        assert model.__dict__["forward"] is accel_forward  # restored, not deleted
        ref = model(ids)
        with splice(model, {"layers.1.resid_post": lambda x: x * 2}):
            out = model(ids)
        torch.testing.assert_close(out, model.lm_head(model.norm(2 * acts["layers.1.resid_post"])))
        assert not torch.allclose(out, ref)
    del model.forward
    assert no_hooks(model)
