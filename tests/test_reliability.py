"""Reliability: runs killed at chosen program points resume bit-equal; damaged or edited inputs fail before
any step with an error naming the file (and row); invalid arguments fail at construction naming the field.

Kills are deterministic: ``HF_SAE_FAULT=POINT:N`` (hf_sae._faults) makes the process SIGKILL itself at the
N-th arrival at a named point, so no test depends on timing.
"""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_sae import SAEConfig, _io
from hf_sae.data.cache import (
    CachedActivations,
    CorruptMetadataError,
    CorruptShardError,
    _with_checksum,
    write_activations,
)
from hf_sae.training import SAETrainer, SAETrainingArguments, parse_args, train
from hf_sae.training import checkpoint as ckpt
from hf_sae.training.guards import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
HP = "layers.0.resid_post"
STEPS = 60


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n_tokens: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    D = torch.randn(64, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (n_tokens, 3), generator=g)
    vals = torch.rand(n_tokens, 3, generator=g) * 3
    return (vals[..., None] * D[idx]).sum(1) + 0.02 * torch.randn(n_tokens, d, generator=g)


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--activations", str(data), "--hook_points", HP,
            "--n_latents", "128", "--k", "8", "--batch_size", "256", "--train_tokens", str(256 * STEPS),
            "--checkpoint_every_tokens", str(256 * 10), "--save_total_limit", "1", "--eval_every_tokens", "0",
            "--eval_tokens", "0", "--log_with", "jsonl", "--progress_bar", "false", "--dead_tokens_threshold",
            "3000", "--seed", "3", "--lr", "2e-3", "--plot_report", "false", "--output_dir", str(out), *extra]


def _env(fault: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    env.pop("HF_SAE_FAULT", None)
    if fault:
        env["HF_SAE_FAULT"] = fault
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process) and its activation file."""
    root = tmp_path_factory.mktemp("ref")
    data = root / "acts.safetensors"
    save_file({HP: synthetic(8192)}, str(data))
    train(parse_args(_cmd(data, root / "ref")[2:]))
    return data, load_file(str(root / "ref" / HP / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------- kills at program points


@pytest.mark.parametrize("fault", [
    "train.step:37",               # between two checkpoints
    "checkpoint.state_saved:3",    # inside the 3rd checkpoint write (weights written, nothing sealed)
    "checkpoint.sealed:2",         # 2nd checkpoint complete under its temporary name, not yet published
    "export.written:1",            # the final SAE folder written under its temporary name
])
def test_kill_at_a_program_point_then_resume_is_bit_equal(tmp_path, reference, fault):
    data, want = reference
    out = tmp_path / "run"
    killed = subprocess.run(_cmd(data, out), env=_env(fault), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not (out / HP / "model.safetensors").exists()
    resumed = subprocess.run(_cmd(data, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _same_weights(want, load_file(str(out / HP / "model.safetensors")))
    steps = [json.loads(s)["step"] for s in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps))  # the resumed log has each step once
    assert not [p for p in os.listdir(out / "checkpoints") if not ckpt.CHECKPOINT_RE.match(p)]  # no leftovers


def test_a_sealed_checkpoint_left_under_its_temporary_name_is_resumed_from(tmp_path, reference):
    """checkpoint.sealed: the newest complete copy is the .tmp- folder; resume must use it, not an older one."""
    data, _ = reference
    out = tmp_path / "run"
    subprocess.run(_cmd(data, out), env=_env("checkpoint.sealed:4"), capture_output=True, timeout=300)
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == [".tmp-" + ckpt.checkpoint_name(256 * 40), ckpt.checkpoint_name(256 * 30)]
    ckpt.recover(str(out / "checkpoints"))
    assert ckpt.newest_valid(str(out / "checkpoints")).endswith(ckpt.checkpoint_name(256 * 40))


def test_resuming_a_finished_run_keeps_its_checkpoint_and_a_kill_between_renames_loses_nothing(tmp_path, reference):
    """D1: resuming a finished run used to re-save its final checkpoint under the same name; a kill between the
    two renames left both copies under names resume ignored, and with save_total_limit 1 the next resume
    retrained from zero. Now the existing checkpoint is kept, and a swap killed half way is recovered."""
    data, want = reference
    out = tmp_path / "run"
    done = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = out / "checkpoints" / ckpt.checkpoint_name(256 * STEPS)
    before = (final / "manifest.json").read_bytes()
    again = subprocess.run(_cmd(data, out, "--resume"), env=_env("publish.between_renames:1"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]  # no swap of the final checkpoint happens at all
    assert (final / "manifest.json").read_bytes() == before
    # the swap itself, killed between its renames in a child process: both copies complete, none visible
    child = ("import sys, shutil; from hf_sae import _io; "
             "shutil.copytree(sys.argv[1], _io.tmp_name(sys.argv[1])); _io.publish_dir(_io.tmp_name(sys.argv[1]), "
             "sys.argv[1])")
    res = subprocess.run([sys.executable, "-c", child, str(final)], env=_env("publish.between_renames:1"),
                         timeout=120)
    assert res.returncode == -9
    assert not final.exists() and Path(str(final) + ".old").is_dir()
    resumed = subprocess.run(_cmd(data, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {STEPS} " in resumed.stdout  # resumed from the recovered final checkpoint, not from zero
    _same_weights(want, load_file(str(out / HP / "model.safetensors")))


def test_publish_dir_recovers_either_complete_copy(tmp_path):
    final = tmp_path / "checkpoint-000000000100"
    for name, payload in ((str(final) + ".old", b"old"), (_io.tmp_name(final), b"new")):
        os.makedirs(name)
        Path(name, "w.bin").write_bytes(payload)
        _io.seal(name)
    assert ckpt.newest_valid(str(tmp_path)) is None  # neither copy is visible under its name
    assert ckpt.recover(str(tmp_path)) == [str(final)]
    assert (final / "w.bin").read_bytes() == b"new"  # the sealed new copy wins over the old one
    ckpt.clean_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [final.name]
    # an unsealed .tmp- (killed mid-write) is never restored; the .old copy is
    shutil_tmp = Path(_io.tmp_name(final))
    os.replace(final, str(final) + ".old")
    shutil_tmp.mkdir()
    (shutil_tmp / "w.bin").write_bytes(b"half")
    ckpt.recover(str(tmp_path))
    assert (final / "w.bin").read_bytes() == b"new"


# ----------------------------------------------------------------------------------- garbage never exits 0


def _small(tmp_path, **kw) -> SAETrainingArguments:
    base = dict(hook_points=[HP], n_latents=64, k=4, train_tokens=256 * 20, batch_size=256, lr=1e-2,
                output_dir=str(tmp_path / "out"), eval_every_tokens=0, checkpoint_every_tokens=256 * 5,
                eval_tokens=512, log_with=["jsonl"], progress_bar=False, init_tokens=1024, seed=0,
                plot_report=False)
    base.update(kw)
    return SAETrainingArguments(**base)


def test_divergence_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    x = synthetic(4096)
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step \d+.*--lr"):
        train(_small(tmp_path, lr=1e9, max_grad_norm=0.0, log_every_steps=1), train_data=x)
    out = tmp_path / "out"
    assert not (out / HP).exists()  # no SAE exported
    for _, path in ckpt.list_checkpoints(str(out / "checkpoints")):  # whatever was saved is finite
        assert all(torch.isfinite(t).all() for t in load_file(os.path.join(path, "model.safetensors")).values())


def test_cli_exits_nonzero_on_divergence(tmp_path):
    data = tmp_path / "acts.safetensors"
    save_file({HP: synthetic(4096)}, str(data))
    res = subprocess.run(_cmd(data, tmp_path / "out", "--lr", "1e9", "--max_grad_norm", "0", "--log_every_steps",
                              "1", "--train_tokens", str(256 * 8)), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "diverged" in res.stderr
    assert not (tmp_path / "out" / HP / "model.safetensors").exists()


@pytest.mark.parametrize("bad", ["nan_row", "width"])
def test_bad_eval_activations_fail_before_any_step(tmp_path, bad):
    ev = synthetic(1024)
    if bad == "nan_row":
        ev[700, 3] = float("nan")
    else:
        ev = synthetic(1024, d=12)
    path = tmp_path / "eval.safetensors"
    save_file({HP: ev}, str(path))
    match = "row 700" if bad == "nan_row" else r"\[rows, 16\]"
    trainer = SAETrainer(_small(tmp_path, eval_activations=str(path)), train_data=synthetic(4096))
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.step == 0
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_single_tensor_file_keyed_by_another_hook_point_is_refused(tmp_path):
    path = tmp_path / "acts.safetensors"
    save_file({"layers.0.resid_post": synthetic(2048)}, str(path))
    with pytest.raises(ValueError, match=r"keyed 'layers\.0\.resid_post', not 'layers\.5\.resid_post'"):
        SAETrainer(_small(tmp_path, hook_points=["layers.5.resid_post"], activations=str(path)))
    save_file({"activations": synthetic(2048)}, str(path))  # a generic key still serves any one hook point
    SAETrainer(_small(tmp_path, hook_points=["layers.5.resid_post"], activations=str(path)))


def test_nan_rows_in_an_activation_file_are_named_before_any_step(tmp_path):
    x = synthetic(2048)
    x[1234] = float("inf")
    path = tmp_path / "acts.safetensors"
    save_file({HP: x}, str(path))
    with pytest.raises(ValueError, match=r"acts\.safetensors.*row 1234"):
        SAETrainer(_small(tmp_path, activations=str(path)))


def test_an_sae_too_large_for_memory_is_refused_naming_the_flags(tmp_path, monkeypatch):
    from hf_sae.training import guards

    monkeypatch.setattr(guards, "available_bytes", lambda device: 10 * 2**20)  # a 10 MiB machine
    with pytest.raises(ValueError, match=r"n_latents=4096.*--n_latents.*--batch_size"):
        SAETrainer(_small(tmp_path, n_latents=4096), train_data=synthetic(2048))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- the activation cache


@pytest.fixture
def cache(tmp_path):
    out = tmp_path / "cache"
    write_activations(out, {HP: synthetic(3000)}, shard_tokens=1000)
    return out


def _edit_meta(cache: Path, fn, keep_checksum: bool = False) -> Path:
    p = cache / HP / "metadata.json"
    meta = json.loads(p.read_text())
    fn(meta)
    if keep_checksum:  # an edit made by a tool that also refreshed the checksum (or an old cache without one)
        meta = _with_checksum({k: v for k, v in meta.items() if k != "metadata_sha256"})
    p.write_text(json.dumps(meta))
    return p


EDITS = {
    "d": lambda m: m.update(d=32),
    "dtype": lambda m: m.update(dtype="bfloat16"),
    "num_tokens": lambda m: m.update(num_tokens=2999),
    "num_rows": lambda m: m["shards"][0].update(num_rows=999),
    "input_scale_negative": lambda m: m.update(input_scale=-1.0),
    "input_scale_huge": lambda m: m.update(input_scale=1e30),
    "mean_sq_norm": lambda m: m.update(mean_sq_norm=float("nan")),
    "hook_point": lambda m: m.update(hook_point="layers.9.resid_post"),
    "shard_file": lambda m: m["shards"][1].update(file="../escape.arrow"),
    "missing_shards": lambda m: m.pop("shards"),
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_every_edited_metadata_field_is_refused_on_open(cache, field):
    _edit_meta(cache, EDITS[field])
    with pytest.raises(CorruptMetadataError, match=r"metadata\.json was modified"):
        CachedActivations(cache, HP)


@pytest.mark.parametrize("field", ["d", "dtype", "num_rows", "num_tokens", "input_scale_negative",
                                   "input_scale_huge", "mean_sq_norm", "shard_file", "missing_shards"])
def test_edits_behind_a_refreshed_checksum_are_blamed_on_metadata_not_the_shard(cache, field):
    _edit_meta(cache, EDITS[field], keep_checksum=True)
    with pytest.raises(CorruptMetadataError, match=r"metadata\.json") as e:
        ds = CachedActivations(cache, HP, shuffle=False)
        ds.to_tensor()
    assert "delete it" not in str(e.value)  # the intact shard is not blamed


def test_truncated_metadata_is_a_clear_error(cache):
    p = cache / HP / "metadata.json"
    p.write_text(p.read_text()[:200])
    with pytest.raises(CorruptMetadataError, match=r"not valid JSON.*truncated"):
        CachedActivations(cache, HP)
    (cache / "metadata.json").write_text("{")
    with pytest.raises(CorruptMetadataError, match="not valid JSON"):
        CachedActivations(cache)


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_damaged_shards_are_named(cache, damage):
    shard = cache / HP / "shard-00001.arrow"
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "flip":
        with open(shard, "r+b") as f:
            f.seek(4000)
            b = f.read(1)
            f.seek(4000)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        shard.unlink()
    with pytest.raises(CorruptShardError, match="shard-00001.arrow"):
        CachedActivations(cache, HP, shuffle=False).to_tensor()


def test_write_activations_refuses_nan_and_inf_before_writing(tmp_path):
    for bad in (float("nan"), float("inf")):
        x = synthetic(3000)
        x[2500, 1] = bad
        out = tmp_path / f"c{bad}"
        with pytest.raises(ValueError, match="row 2500"):
            write_activations(out, {HP: x}, shard_tokens=1000)
        assert not list(out.rglob("*.arrow"))
    x = synthetic(100)
    x[5] = 1e5  # finite in float32, infinite in float16
    with pytest.raises(ValueError, match="float16 overflows"):
        write_activations(tmp_path / "f16", {HP: x}, dtype="float16")


def test_nan_rows_in_a_cache_shard_stop_training_naming_the_file_and_row(tmp_path):
    """A cache whose shard holds NaN (written by another tool, checksums consistent): the trainer names it."""
    import pyarrow as pa

    from hf_sae.data.cache import _serialize

    cache = tmp_path / "cache"
    write_activations(cache, {HP: synthetic(3000)}, shard_tokens=1000, dtype="float32")
    shard = cache / HP / "shard-00002.arrow"
    table = pa.ipc.open_stream(pa.memory_map(str(shard), "r")).read_all()
    flat = table.column("activation").combine_chunks().flatten().to_numpy().copy()
    flat[17 * 16 + 3] = float("nan")
    arrays = {n: table.column(n).combine_chunks() for n in table.column_names}
    arrays["activation"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), 16)
    buf, sha = _serialize(arrays, table.schema)
    shard.write_bytes(buf.to_pybytes())
    _edit_meta(cache, lambda m: m["shards"][2].update(sha256=sha, bytes=len(buf.to_pybytes())), keep_checksum=True)
    with pytest.raises(ValueError, match=r"shard-00002\.arrow.*row 17"):
        train(_small(tmp_path, activations=str(cache), eval_tokens=0, train_tokens=256 * 40))
    assert not (tmp_path / "out" / HP).exists()


# ----------------------------------------------------------------------------------- fuzzed configuration

_NUMBER_POOL = [float("nan"), float("inf"), -float("inf"), "abc", "1", [1], {"a": 1}, None, True]


def _invalid_sae_values(name: str) -> list:
    """Invalid values for one SAEConfig field: a seeded random draw from a pool of wrong types and
    non-finite numbers, plus the field's own out-of-range values."""
    if name in ("activation", "kernel", "input_norm", "afa_variant"):
        return ["nope", 3, None]
    if name == "input_norm_unbiased":
        return ["yes", 2]
    if name == "hook_point":
        return [3, "", ["layers.0.resid_post"]]
    if name == "base_model":
        return [3, ["a"]]
    if name == "training_info":
        return ["x", 3]
    if name == "multi_topk":
        return ["yes", 2]
    own = {"batchtopk_threshold_momentum": [1.0, -0.1], "input_scale": [0.0, -2.0, 1e30],
           "aux_coef": [-0.5], "l1_coef": [-0.5], "l0_coef": [-0.5], "afa_coef": [-0.5],
           "jumprelu_init_threshold": [0.0, -1.0], "jumprelu_bandwidth": [0.0],
           "d_in": [0, -3, 2.5], "n_latents": [0, -3, 2.5], "expansion_factor": [0, -1.0],
           "k": [0, -1, 65, 2.5], "input_norm_eps": [0.0, -1.0], "k_aux": [0, 65, 2.5],
           "dead_tokens_threshold": [0, 1.5]}[name]
    pool = [
        v
        for v in _NUMBER_POOL
        if not (v is None and name in ("n_latents", "k", "k_aux", "expansion_factor"))
        and not (v is True and name == "input_norm_eps")
    ]
    return own + random.Random(name).sample(pool, 4)


SAE_FIELDS = [
    "d_in",
    "n_latents",
    "expansion_factor",
    "activation",
    "k",
    "k_aux",
    "aux_coef",
    "dead_tokens_threshold",
    "multi_topk",
    "l1_coef",
    "l0_coef",
    "afa_coef",
    "jumprelu_init_threshold",
    "jumprelu_bandwidth",
    "batchtopk_threshold_momentum",
    "input_scale",
    "hook_point",
    "base_model",
    "kernel",
    "training_info",
    "input_norm",
    "input_norm_eps",
    "input_norm_unbiased",
    "afa_variant",
]


@pytest.mark.parametrize("name", SAE_FIELDS)
def test_fuzzed_sae_config_fields_are_rejected_naming_the_field(name):
    for value in _invalid_sae_values(name):
        kw = {"d_in": 16, "n_latents": 64, name: value}
        if name == "expansion_factor":
            kw.pop("n_latents")
        with pytest.raises(ValueError, match=rf"SAEConfig\.{name}="):
            SAEConfig(**kw)


def _invalid_arg_values(f) -> list:
    from hf_sae.training.arguments import _field_types

    t = str(_field_types()[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
    choices = {"activation", "lr_schedule", "b_dec_init", "mixed_precision", "kernel"}
    if f.name in choices:
        return ["nope", 3]
    if t in ("bool", "Optional[bool]"):
        return ["maybe", 2, [True]]
    if "list[str]" in t:
        return [[], [""], ["a b"], 3] if f.name == "hook_points" else [["nope"], 3]
    if t in ("str", "Optional[str]"):
        return [3, ""] if t == "str" else [3, ["x"]]
    if "int" in t:
        return ["abc", float("inf"), 2.5, -7, True]
    if "float" in t:
        return ["abc", float("nan"), float("inf") if f.name != "lr" else -1.0, True]
    raise AssertionError(f"no invalid values for {f.name}: {t}")


NO_WRONG_VALUE = {"seed", "activations", "eval_activations"}  # any int seeds; paths are checked by validate()


@pytest.mark.parametrize(
    "f", [f for f in fields(SAETrainingArguments) if f.name not in NO_WRONG_VALUE], ids=lambda f: f.name
)
def test_fuzzed_training_arguments_are_rejected_at_construction_naming_the_flag(f):
    for value in _invalid_arg_values(f):
        if f.name == "seed":
            continue
        with pytest.raises(ValueError, match=rf"--{f.name}="):
            SAETrainingArguments(**{f.name: value})


def test_strings_from_yaml_are_coerced_to_the_field_type(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-3\nadam_epsilon: 1e-8\ntrain_tokens: 2e5\nprogress_bar: 'false'\nk: 16\n")
    args = parse_args([str(cfg)])
    assert args.lr == 1e-3 and args.adam_epsilon == 1e-8 and args.train_tokens == 200_000
    assert args.progress_bar is False and args.k == 16
    assert math.isclose(SAETrainingArguments(lr="3e-4").lr, 3e-4)


def test_batch_size_one_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"--batch_size=1 .*at least 8 tokens per micro-batch"):
        SAETrainingArguments(batch_size=1, train_tokens=100)
    with pytest.raises(ValueError, match=r"--batch_size=16 .*gives 4 tokens per micro-batch"):
        SAETrainingArguments(batch_size=16, train_tokens=100).validate(num_processes=4)


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path, monkeypatch):
    """A crash in the final evaluation (or export) loses no training: --resume redoes only those."""
    calls = []

    def broken_evaluate(self):
        calls.append(self.state.step)
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(SAETrainer, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(_small(tmp_path, checkpoint_every_tokens=0), train_data=synthetic(4096), eval_data=synthetic(512))
    assert calls == [20]
    assert ckpt.newest_valid(str(tmp_path / "out" / "checkpoints")).endswith(ckpt.checkpoint_name(256 * 20))
    monkeypatch.undo()
    trainer = SAETrainer(
        _small(tmp_path, checkpoint_every_tokens=0, resume=True), train_data=synthetic(4096), eval_data=synthetic(512)
    )
    saes = trainer.train()
    assert trainer.state.step == 20 and saes[HP].config.training_info["final_metrics"]["eval_fvu"] < 1
