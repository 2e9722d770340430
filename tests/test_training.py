"""Tests of hf_sae.training: schedules, initialisation, arguments, the trainer, checkpoints and exact resume.

Synthetic activations (a sparse dictionary plus noise) keep every run tiny; the SIGKILL resume test
runs scripts/train.py in subprocesses. Real-SmolLM2 tests are marked slow.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_sae import SparseAutoencoder
from hf_sae.training import (
    SAETrainer,
    SAETrainingArguments,
    default_lr,
    geometric_median,
    initialize_sae,
    lr_at,
    parse_args,
    train,
)
from hf_sae.training import checkpoint as ckpt
from hf_sae.training.sources import IterableSource, TensorSource

REPO = Path(__file__).resolve().parents[1]
HP = "layers.0.resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n_tokens: int, d: int = 16, n_true: int = 64, active: int = 3, seed: int = 0) -> torch.Tensor:
    """x = sum of `active` random unit directions (of n_true) with values in [0, 3) + offset + noise."""
    g = torch.Generator().manual_seed(1234)
    D = torch.randn(n_true, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    offset = torch.randn(d, generator=g)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_true, (n_tokens, active), generator=g)
    vals = torch.rand(n_tokens, active, generator=g) * 3
    return (vals[..., None] * D[idx]).sum(1) + 3 * offset + 0.02 * torch.randn(n_tokens, d, generator=g)


def small_args(tmp_path, **kw) -> SAETrainingArguments:
    base = dict(hook_points=[HP], n_latents=64, k=4, train_tokens=256 * 60, batch_size=256, lr=1e-2,
                output_dir=str(tmp_path / "out"), eval_every_tokens=0, checkpoint_every_tokens=0, eval_tokens=2048,
                log_with=["jsonl"], progress_bar=False, log_every_steps=10, init_tokens=2048,
                dead_tokens_threshold=2560, seed=0, plot_report=False)
    base.update(kw)
    return SAETrainingArguments(**base)


# ----------------------------------------------------------------------------------- schedules


def test_default_lr_scales_with_inverse_sqrt_of_n():
    assert default_lr(2 ** 14) == pytest.approx(2e-4)
    assert default_lr(4 * 2 ** 14) == pytest.approx(1e-4)
    assert default_lr(2 ** 12) == pytest.approx(4e-4)


def test_lr_schedule_values():
    # warmup: linear (tokens + 1) / warmup
    assert lr_at(0, 1.0, 1000, warmup_tokens=100) == pytest.approx(0.01)
    assert lr_at(49, 1.0, 1000, warmup_tokens=100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 1000, warmup_tokens=100) == 1.0
    assert lr_at(999, 1.0, 1000, warmup_tokens=100, schedule="constant") == 1.0
    # cosine: half way through the decay -> (1 + min) / 2; end -> min
    assert lr_at(550, 1.0, 1000, warmup_tokens=100, schedule="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(1000, 1.0, 1000, warmup_tokens=100, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, schedule="linear")


# ----------------------------------------------------------------------------------- initialisation


def test_geometric_median_minimises_sum_of_distances():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    x[:20] += 50  # outliers pull the mean, barely the median
    med = geometric_median(x, tol=1e-10)

    def cost(y):
        return (x - torch.from_numpy(y)).norm(dim=-1).sum().item()

    ref = minimize(cost, x.mean(0).numpy(), method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 40000}).x
    assert cost(med.numpy()) <= cost(ref) + 1e-6
    assert (med - torch.from_numpy(ref)).norm() < 1e-3
    assert (med - x[20:].mean(0)).norm() < (x.mean(0) - x[20:].mean(0)).norm() / 5


def test_geometric_median_of_symmetric_points_is_the_centre():
    c = torch.tensor([1.0, -2.0])
    pts = c + torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    assert torch.allclose(geometric_median(pts), c, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        geometric_median(torch.tensor([[float("nan"), 0.0]]))


def test_initialize_sae_scale_bias_and_untied_encoder():
    from hf_sae import SAEConfig

    x = synthetic(4096)
    sae = SparseAutoencoder(SAEConfig(d_in=16, n_latents=64, k=4))
    info = initialize_sae(sae, x, tied_init=False, b_dec_init="mean")
    s = sae.config.input_scale
    assert (x * s).square().sum(-1).mean().item() == pytest.approx(16.0, rel=1e-5)  # E||s x||^2 = d
    assert torch.allclose(sae.b_dec, (x * s).mean(0), atol=1e-5)
    assert info["input_scale"] == s
    assert not torch.allclose(sae.W_enc, sae.W_dec)
    assert torch.allclose(sae.W_enc.norm(dim=-1), torch.ones(64), atol=1e-5)
    tied = SparseAutoencoder(SAEConfig(d_in=16, n_latents=64, k=4))
    initialize_sae(tied, x, tied_init=True, normalize_input=False)
    assert tied.config.input_scale == 1.0 and torch.equal(tied.W_enc, tied.W_dec)
    assert torch.allclose(tied.b_dec, geometric_median(x), atol=1e-5)


# ----------------------------------------------------------------------------------- arguments


def test_arguments_from_cli_json_and_yaml(tmp_path):
    a = parse_args(["--hook_points", "layers.1.resid_post", "layers.2.mlp_out", "--no_tied_init", "--k", "16",
                    "--lr", "1e-3", "--log_with", "jsonl"])
    assert a.hook_points == ["layers.1.resid_post", "layers.2.mlp_out"] and a.tied_init is False
    assert a.k == 16 and a.lr == 1e-3 and a.log_with == ["jsonl"] and a.use_auxk is True
    (tmp_path / "c.json").write_text(json.dumps({"k": 8, "n_latents": 128, "lr_schedule": "cosine"}))
    (tmp_path / "c.yaml").write_text("k: 8\nn_latents: 128\nhook_points: [embed]\nauxk: false\n")
    j = parse_args([str(tmp_path / "c.json")])
    assert (j.k, j.n_latents, j.lr_schedule) == (8, 128, "cosine")
    y = parse_args(["--config", str(tmp_path / "c.yaml"), "--k", "12"])  # flags override the file
    assert (y.k, y.n_latents, y.hook_points, y.use_auxk) == (12, 128, ["embed"], False)
    # the `hf-sae train` wiring: a sub-parser gets the same flags; its --help renders
    import argparse

    from hf_sae.training import add_train_args
    from hf_sae.training.arguments import arguments_from_namespace

    top = argparse.ArgumentParser(prog="hf-sae")
    sub = add_train_args(top.add_subparsers(dest="command").add_parser("train"))
    assert "--dead_tokens_threshold" in sub.format_help()
    ns = top.parse_args(["train", str(tmp_path / "c.yaml"), "--no_normalize_decoder", "--k", "2"])
    z = arguments_from_namespace(ns)
    assert (z.k, z.n_latents, z.normalize_decoder, z.tied_init) == (2, 128, False, True)
    (tmp_path / "bad.yaml").write_text("kk: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_args([str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("kw, match", [
    (dict(k=100, n_latents=64), r"--k=100.*n_latents=64"),
    (dict(batch_size=0), r"--batch_size=0"),
    (dict(batch_size=100, gradient_accumulation_steps=3), r"divisible"),
    (dict(train_tokens=10), r"--train_tokens"),
    (dict(lr_schedule="linear"), r"--lr_schedule"),
    (dict(log_with=["mlflow"]), r"--log_with"),
])
def test_bad_arguments_fail_with_the_argument_name(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        small_args(tmp_path, **kw).validate()


def test_k_larger_than_expansion_is_caught_once_d_is_known(tmp_path):
    args = small_args(tmp_path, n_latents=None, expansion_factor=2, k=40)
    with pytest.raises(ValueError, match=r"--k=40.*d=16"):
        SAETrainer(args, train_data=synthetic(1024))
    assert not (tmp_path / "out").exists()  # failed before any work


def test_hook_point_absent_from_the_data_fails_early(tmp_path):
    f = tmp_path / "acts.safetensors"
    save_file({"layers.3.resid_post": synthetic(1024), "layers.4.resid_post": synthetic(1024)}, str(f))
    args = small_args(tmp_path, activations=str(f), hook_points=["layers.9.resid_post"])
    with pytest.raises(ValueError, match=r"layers\.9\.resid_post.*not in.*layers\.3\.resid_post"):
        SAETrainer(args)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- sources


def test_tensor_source_shards_disjointly_and_resumes_at_any_position():
    x = torch.arange(100, dtype=torch.float32)[:, None]
    one = TensorSource({"h": x}, micro=10, seed=1)
    parts = [TensorSource({"h": x}, micro=5, process_index=r, num_processes=2, seed=1) for r in range(2)]
    it1 = one.iterate()
    its = [p.iterate() for p in parts]
    for _ in range(25):  # 2.5 epochs
        ref = next(it1)["h"].flatten()
        a, b = (next(i)["h"].flatten() for i in its)
        assert torch.equal(torch.cat([a, b]), ref)  # 2 processes = the same global batch, split in two
        assert not set(a.tolist()) & set(b.tolist())
    it = one.iterate(start=13)
    it_ref = one.iterate()
    for _ in range(13):
        next(it_ref)
    assert torch.equal(next(it)["h"], next(it_ref)["h"])


def test_iterable_source_rechunks_shards_and_skips():
    batches = [torch.full((7, 2), float(i)) for i in range(10)]  # 70 rows
    src = IterableSource(batches, ["h"], micro=4, process_index=1, num_processes=2)
    it = src.iterate()
    first = next(it)["h"]
    # chunk 1 (rows 4..7) goes to process 1: rows 4..6 come from batch 0, row 7 from batch 1
    assert first[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    again = src.iterate(start=3)
    for _ in range(2):
        next(it)
    assert torch.equal(next(again)["h"], next(it)["h"])


# ----------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    x, xe = synthetic(8192), synthetic(2048, seed=1)
    args = small_args(tmp, train_tokens=256 * 120, eval_every_tokens=256 * 40, checkpoint_every_tokens=256 * 40,
                      save_total_limit=2, plot_report=True)
    trainer = SAETrainer(args, train_data=x, eval_data=xe)
    saes = trainer.train()
    return trainer, saes, tmp / "out", xe


def test_training_learns_and_keeps_the_recipe_invariants(trained):
    trainer, saes, out, xe = trained
    sae = saes[HP]
    hist = [r for r in trainer.state.history if f"{HP}/fvu" in r]
    assert hist[0][f"{HP}/fvu"] > 0.5 and hist[-1][f"{HP}/fvu"] < 0.25  # it learns
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)  # renormalised every step
    assert trainer.state.tokens == 256 * 120 and trainer.state.step == 120
    # the per-latent fire counters add up to the logged L0 times the tokens (10 steps of 256 per record),
    # at most k per token (TopK slots whose value is <= 0 do not fire)
    fired = int(trainer.total_fires[HP].sum())
    assert fired == pytest.approx(sum(r[f"{HP}/l0"] for r in hist) * 2560, abs=0.5)
    assert 0.99 * 4 * 256 * 120 <= fired <= 4 * 256 * 120
    # held-out metrics come from the shared evaluation code and match a direct computation
    from hf_sae.evaluation.reconstruction import fvu

    with torch.no_grad():
        direct = fvu(xe, sae(xe).reconstruction)
    assert sae.config.training_info["final_metrics"]["eval_fvu"] == pytest.approx(direct, rel=1e-5)


def test_outputs_config_report_and_logs(trained):
    trainer, saes, out, _ = trained
    folder = out / HP
    loaded = SparseAutoencoder.from_pretrained(str(folder))
    assert torch.equal(loaded.W_dec, saes[HP].W_dec)
    cfg = loaded.config
    info = cfg.training_info
    assert cfg.hook_point == HP and info["tokens_trained"] == 256 * 120 and info["dataset"] == "in-memory tensors"
    assert info["recipe"]["tied_init"] and info["recipe"]["auxk"]
    assert cfg.input_scale == pytest.approx(info["init"]["input_scale"]) and cfg.input_scale != 1.0
    for key in ("eval_fvu", "eval_l0", "eval_dead_fraction", "train_fvu", "train_dormant_fraction"):
        assert key in info["final_metrics"]
    report = json.loads((folder / "training_report.json").read_text())
    assert report["hook_point"] == HP and len(report["curves"]["fvu"]["value"]) == 12
    assert len(report["curves"]["eval/fvu"]["value"]) == 3  # at 40 and 80 steps, and at the end
    assert (folder / "training_curves.png").stat().st_size > 10_000
    lines = [json.loads(s) for s in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if f"{HP}/fvu" in r] == list(range(10, 121, 10))
    # checkpoints: retention kept the newest 2 (tokens 20480 and the final 30720), all valid
    kept = ckpt.list_checkpoints(str(out / "checkpoints"))
    assert [t for t, _ in kept] == [256 * 80, 256 * 120] and all(ckpt.is_valid(p) for _, p in kept)


def test_a_hook_point_trained_with_others_equals_training_it_alone(tmp_path):
    x = {HP: synthetic(4096), "layers.1.mlp_out": synthetic(4096, d=8, seed=5)}
    both = train(small_args(tmp_path / "a", hook_points=[HP, "layers.1.mlp_out"], train_tokens=256 * 20,
                            n_latents=32), train_data=x)
    alone = train(small_args(tmp_path / "b", train_tokens=256 * 20, n_latents=32), train_data={HP: x[HP]})
    for name, p in alone[HP].state_dict().items():
        assert torch.equal(p, both[HP].state_dict()[name]), name
    assert both["layers.1.mlp_out"].config.d_in == 8


def test_auxk_and_dead_mask_follow_the_token_counters(tmp_path):
    # a huge b_enc offset on half the latents makes the other half never win the TopK: they die after
    # dead_tokens_threshold tokens; AuxK then gets a non-zero loss
    x = synthetic(4096)
    args = small_args(tmp_path, train_tokens=256 * 12, dead_tokens_threshold=256 * 5, lr=1e-12, log_every_steps=1,
                      max_grad_norm=0.0)
    trainer = SAETrainer(args, train_data=x)
    orig = trainer._initialize

    def rigged(saes):
        orig(saes)
        with torch.no_grad():
            saes[HP].b_enc[:32] = 100.0
    trainer._initialize = rigged
    trainer.train()
    since = trainer.since_fired[HP]
    assert torch.all(since[32:] == 256 * 12) and torch.all(since[:32] < 256 * 12)
    hist = [r for r in trainer.state.history if f"{HP}/auxk_loss" in r]
    # steps 1..5 see no dead latent (threshold reached after step 5), then AuxK is on
    assert all(r[f"{HP}/auxk_loss"] == 0 for r in hist[:5])
    assert all(r[f"{HP}/auxk_loss"] > 0 for r in hist[5:])
    assert hist[-1][f"{HP}/dormant_fraction"] == 0.5  # no fire in the last dead_tokens_threshold tokens
    assert hist[-1][f"{HP}/dead_fraction"] == 0.5  # its deprecated old name


def test_bf16_autocast_and_multi_topk_run(tmp_path):
    trainer = SAETrainer(small_args(tmp_path, mixed_precision="bf16", multi_topk=True, train_tokens=256 * 5,
                                    log_every_steps=1), train_data=synthetic(2048))
    saes = trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert saes[HP].W_dec.dtype == torch.float32  # master weights stay fp32
    assert math.isfinite(saes[HP].config.training_info["final_metrics"]["train_fvu"])
    assert all(r[f"{HP}/multi_topk_fvu"] > 0 for r in trainer.state.history if f"{HP}/fvu" in r)


def test_auto_trackers():
    from hf_sae.training.trainer import resolve_trackers

    env = {k: os.environ.pop(k) for k in ("WANDB_API_KEY", "WANDB_MODE") if k in os.environ}
    try:
        assert resolve_trackers(["auto"]) == ["jsonl", "tensorboard"]  # tensorboard is a dev dependency
        assert resolve_trackers(["none"]) == [] and resolve_trackers(["jsonl", "auto"]) == ["jsonl", "tensorboard"]
    finally:
        os.environ.update(env)


# ----------------------------------------------------------------------------------- checkpoints & resume


def test_invalid_checkpoints_are_skipped(tmp_path):
    root = tmp_path / "ckpts"
    for tokens in (100, 200, 300):
        tmp = root / (".tmp-" + ckpt.checkpoint_name(tokens))
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(os.urandom(1000))
        ckpt.seal(str(tmp))
        ckpt.publish(str(tmp), str(root / ckpt.checkpoint_name(tokens)))
    (root / ".tmp-checkpoint-000000000400").mkdir()  # a save killed half way
    assert ckpt.newest_valid(str(root)).endswith(ckpt.checkpoint_name(300))
    with open(root / ckpt.checkpoint_name(300) / "model.safetensors", "r+b") as f:
        f.seek(10)
        f.write(b"\x00" * 8 if f.read(8) != b"\x00" * 8 else b"\x01" * 8)  # silent corruption
    assert ckpt.newest_valid(str(root)).endswith(ckpt.checkpoint_name(200))
    os.truncate(root / ckpt.checkpoint_name(200) / "model.safetensors", 500)  # truncated file
    assert ckpt.newest_valid(str(root)).endswith(ckpt.checkpoint_name(100))
    ckpt.apply_retention(str(root), keep=1)
    assert [t for t, _ in ckpt.list_checkpoints(str(root))] == [300]


def test_resume_refuses_a_directory_made_by_another_configuration(trained):
    trainer, _, out, _ = trained
    x = synthetic(2048)
    kw = dict(train_tokens=256 * 120, eval_every_tokens=256 * 40, checkpoint_every_tokens=256 * 40,
              save_total_limit=2)
    with pytest.raises(ValueError, match="--resume"):  # an existing run, no --resume
        SAETrainer(small_args(out.parent, **kw), train_data=x)
    with pytest.raises(ValueError, match=r"different configuration.*--k: was 4, now 8"):
        SAETrainer(small_args(out.parent, k=8, resume=True, **kw), train_data=x)
    # the same configuration resumes the finished run: nothing left to train
    again = SAETrainer(small_args(out.parent, resume=True, **kw), train_data=x)
    assert again.resume_from.endswith(ckpt.checkpoint_name(256 * 120))


def _script_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--activations", str(data), "--hook_points", HP,
            "--n_latents", "128", "--k", "8", "--batch_size", "256", "--train_tokens", str(256 * 150),
            "--checkpoint_every_tokens", str(256 * 15), "--save_total_limit", "2", "--eval_every_tokens", "0",
            "--log_with", "jsonl", "--progress_bar", "false", "--dead_tokens_threshold", "3000", "--seed", "3",
            "--lr", "2e-3", "--plot_report", "false", "--output_dir", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}


# ----------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_live_smollm2_two_hook_points_from_one_pass(tmp_path, smollm2):
    model, tok = smollm2
    args = SAETrainingArguments(hook_points=["layers.1.resid_post", "layers.2.mlp_out"], expansion_factor=1, k=8,
                                train_tokens=1024 * 2, batch_size=1024, init_tokens=512, eval_tokens=512,
                                eval_every_tokens=0, checkpoint_every_tokens=0, context_length=64, lm_batch_size=8,
                                shuffle_buffer_tokens=0, log_with=["jsonl"], progress_bar=False,
                                output_dir=str(tmp_path / "out"))
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        saes = train(args, model=model, tokenizer=tok)
    finally:
        handle.remove()
    for h, sae in saes.items():
        assert sae.config.d_in == 576 and sae.config.hook_point == h
        assert sae.config.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert sae.config.training_info["final_metrics"]["eval_fvu"] < 1.0
    # one LM pass feeds both hook points: (init + train + eval) tokens / (8 windows x 63 kept tokens)
    assert len(calls) <= math.ceil(512 / (8 * 63)) + math.ceil(2048 / (8 * 63)) + math.ceil(512 / (8 * 63)) + 3


@pytest.mark.slow
def test_live_unknown_hook_point_fails_before_work(tmp_path, smollm2):
    model, tok = smollm2
    args = SAETrainingArguments(hook_points=["layers.99.resid_post"], output_dir=str(tmp_path / "out"),
                                log_with=["jsonl"])
    with pytest.raises(ValueError, match=r"layers\.99.*0\.\.29"):
        SAETrainer(args, model=model, tokenizer=tok)
    assert not (tmp_path / "out").exists()


def test_sae_hyperparameters_of_the_training_arguments_come_from_sae_config():
    """SAEConfig is the single source of truth: every SAE field of the arguments has its name and default."""
    import dataclasses
    import inspect

    from hf_sae import SAEConfig

    sae_params = inspect.signature(SAEConfig.__init__).parameters
    arg_fields = {f.name: f for f in dataclasses.fields(SAETrainingArguments)}
    shared = set(small_args(Path("/tmp")).sae_config_kwargs(d_in=16)) - {"d_in"}
    assert shared <= set(sae_params) and shared <= set(arg_fields) | {"n_latents", "expansion_factor"}
    for name in shared - {"n_latents", "expansion_factor"}:
        assert arg_fields[name].default == sae_params[name].default, name
    assert SAEConfig(d_in=16).n_latents == 16 * SAETrainingArguments().expansion_factor  # both default to 8x
