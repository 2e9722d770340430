"""Issue 19: hf_sae behaves as a Hugging Face user expects.

CLI (one-line errors, both flag styles, defaults in --help), held-out data that is held out for every
text source, `datasets` objects / folders / generators, model cards built from what the trainer and
`hf-sae eval` write (pushed to the local test Hub and read back), `evaluate` modules that load from
anywhere and take predictions/references, loading errors that list what is there, launch checks, the
self-contained HTML report, the quickstart's evaluation reuse and the cache's file mode.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sae import SAE, SAEConfig
from hf_sae import hub as H
from hf_sae.cli import build_parser, main
from hf_sae.data.corpus import load_texts

REPO = Path(__file__).resolve().parents[1]
HP = "layers.0.resid_post"


def _paragraphs(n: int) -> list[str]:
    return [f"document number {i} says {'word ' * (i % 7)}and ends." for i in range(n)]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "runs" / "l6" / "layers.6.resid_pst")
    assert main(["eval", missing, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("hf-sae eval: error:") and "does not exist" in err and "--debug" in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["eval", missing, "--debug"])


def test_every_command_accepts_both_flag_styles():
    ev = build_parser("eval").parse_args(["eval", "sae", "--n_tokens", "7", "--downstream-tokens", "3",
                                          "--text_column", "body"])
    assert (ev.n_tokens, ev.downstream_tokens, ev.text_column) == (7, 3, "body")
    push = build_parser("push").parse_args(["push", "a", "--repo_id", "o/r", "--base_model", "m", "--dry_run", "d"])
    assert (push.repo_id, push.base_model, push.dry_run) == ("o/r", "m", "d")
    tr = build_parser("train").parse_args(["train", "--hook-points", HP, "--train-tokens", "5", "--k", "4"])
    assert (tr.hook_points, tr.train_tokens) == ([HP], 5)


def test_help_shows_defaults(capsys):
    for command, expected in (("eval", "(default: 256)"), ("train", "(default: 10000000)"),
                              ("push", "(default: auto)")):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert expected in out, (command, expected)


_HELP_IMPORTS = """
import contextlib, io, sys
from hf_sae.cli import COMMANDS, main
for command in [None, *COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            main(([command] if command else []) + ["--help"])
        except SystemExit:
            pass
    assert "usage:" in text.getvalue(), (command, text.getvalue()[-300:])
    print("HEAVY", command, sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules))
"""


def test_no_help_imports_torch():
    """`hf-sae [CMD] --help` builds the parser and prints its help without importing torch, transformers or
    accelerate: every command's arguments live in hf_sae.cli_args, train's are made from its dataclass
    without HfArgumentParser. Checked in one fresh interpreter, command after command, so the first command
    that imported a module is the one named."""
    out = subprocess.run([sys.executable, "-c", _HELP_IMPORTS], capture_output=True, text=True, timeout=300, cwd=REPO)
    from hf_sae.cli import COMMANDS

    lines = [line.split(" ", 2) for line in out.stdout.splitlines() if line.startswith("HEAVY")]
    assert len(lines) == len(COMMANDS) + 1, out.stdout + out.stderr
    assert [(command, heavy) for _, command, heavy in lines if heavy != "[]"] == []


def test_cli_choices_are_the_registries():
    """The choice lists hf_sae.cli_args holds without torch are the keys of the registries beside the code."""
    from hf_sae import cli_args
    from hf_sae.convert import FORMATS
    from hf_sae.data.cache_format import _DTYPES
    from hf_sae.evaluation.sage.tasks import TASKS

    assert cli_args.CACHE_DTYPES == tuple(sorted(_DTYPES))
    assert cli_args.SAGE_TASKS == tuple(sorted(TASKS))
    assert cli_args.CONVERT_FORMATS == tuple(FORMATS)


def test_training_options_without_transformers_are_hf_argument_parsers():
    """train's options (built without transformers) parse as HfArgumentParser's do, and the SAE defaults and
    choices read from configuration_sae.py's source are those of the imported SAEConfig."""
    import argparse
    import inspect

    from transformers import HfArgumentParser

    from hf_sae import configuration_sae as C
    from hf_sae.training import arguments as A

    init = inspect.signature(C.SAEConfig.__init__).parameters.values()
    assert A._sae_source()[1] == {p.name: p.default for p in init if p.default is not inspect.Parameter.empty}
    assert (A._ACTIVATIONS, A._INPUT_NORMS, A._KERNELS) == (C.ACTIVATIONS, C.INPUT_NORMS, C.KERNELS)
    ours = A.add_field_options(argparse.ArgumentParser(), A.SAETrainingArguments, A._field_types())
    theirs = HfArgumentParser(A.SAETrainingArguments)
    for argv in ([], ["--hook_points", "a", "b", "--k", "4", "--auxk", "false", "--no_tied_init", "--multi_topk",
                      "--lr", "1e-3", "--eval_activations", "x", "--resume", "--log_with", "none", "jsonl"],
                 ["--normalize_input", "no", "--progress_bar", "0", "--n_latents", "5", "--expansion_factor", "2"]):
        assert vars(ours.parse_args(argv)) == vars(theirs.parse_args(argv)), argv
    assert {o for o in ours._option_string_actions if "_" in o} == {
        o for o in theirs._option_string_actions if "_" in o}


def test_resume_without_checkpoint_says_so(tmp_path, caplog):
    from hf_sae.training import SAETrainer, SAETrainingArguments

    args = SAETrainingArguments(hook_points=[HP], n_latents=16, k=2, batch_size=64, train_tokens=128,
                                output_dir=str(tmp_path / "run"), resume=True, log_with=["none"],
                                progress_bar=False, plot_report=False, eval_tokens=0)
    with caplog.at_level("WARNING"):
        SAETrainer(args, train_data=torch.randn(512, 8))
    assert any("no checkpoint" in r.getMessage() and "starting a new run" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ held-out data
def _check_split(source, docs, **kw):
    from hf_sae.data.corpus import is_heldout

    train = list(load_texts(source, split="train", **kw))
    val = list(load_texts(source, split="validation", **kw))
    assert val and train, (len(train), len(val))
    assert not set(train) & set(val)  # disjoint
    assert sorted(train + val) == sorted(docs)  # together: everything, once
    assert all(is_heldout(t) for t in val) and not any(is_heldout(t) for t in train)
    assert list(load_texts(source, split="validation", **kw)) == val  # deterministic
    assert sorted(load_texts(source, split="all", **kw)) == sorted(docs)
    return train, val


def test_single_file_and_plain_folder_hold_out_documents(tmp_path):
    docs = _paragraphs(400)
    txt = tmp_path / "my.txt"
    txt.write_text("\n\n".join(docs))
    train, val = _check_split(str(txt), docs)
    assert 0.02 < len(val) / len(docs) < 0.10  # ~HELDOUT_FRACTION
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(4):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::4]))
    _check_split(str(folder), docs)
    only_train = tmp_path / "only_train"
    (only_train / "train").mkdir(parents=True)
    (only_train / "train" / "a.txt").write_text("\n\n".join(docs))
    assert _check_split(str(only_train), docs)[1] == val  # the same documents, whatever the file layout
    with pytest.raises(ValueError, match="no split 'dev'"):
        list(load_texts(str(txt), split="dev"))


def test_real_split_folders_are_used_as_they_are(tmp_path):
    for split, docs in (("train", ["alpha one", "alpha two"]), ("validation", ["beta one"])):
        (tmp_path / split).mkdir()
        (tmp_path / split / "x.txt").write_text("\n\n".join(docs))
    assert list(load_texts(str(tmp_path), split="train")) == ["alpha one", "alpha two"]
    assert list(load_texts(str(tmp_path), split="validation")) == ["beta one"]


def test_datasets_folders_and_objects(tmp_path):
    import datasets

    docs = _paragraphs(300)
    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(300))})
    ds.save_to_disk(str(tmp_path / "saved"))
    _check_split(str(tmp_path / "saved"), docs)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    _check_split(str(tmp_path / "saved_dict"), docs)  # no validation split: held out from train
    two = datasets.DatasetDict({"train": ds.select(range(10)), "validation": ds.select(range(10, 12))})
    assert list(load_texts(two, split="validation")) == docs[10:12]
    _check_split(ds, docs)
    _check_split(ds.to_iterable_dataset(), docs)
    with pytest.raises(ValueError, match="no column 'body'"):
        list(load_texts(ds, text_column="body"))
    gen = (d for d in docs[:5])  # a generator of texts is read as it is
    assert list(load_texts(gen)) == docs[:5]
    assert list(load_texts([{"text": "a row"}, "a string"])) == ["a row", "a string"]


def test_activation_stream_takes_iterable_datasets_and_trainer_takes_a_generator_stream(tmp_path):
    import datasets
    from test_data import WORDS, tiny_model, tiny_tokenizer

    from hf_sae.data.stream import ActivationStream
    from hf_sae.training import SAETrainingArguments, train

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), layers=1)
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(60)]
    ids = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()
    stream = ActivationStream(model, tok, HP, ids, split="all", batch_tokens=64, window=16, shuffle_buffer_tokens=0)
    rows = sum(b[HP].shape[0] for b in stream)
    assert rows > 1000
    gen_stream = ActivationStream(model, tok, HP, (d for d in docs), batch_tokens=64, window=16,
                                  shuffle_buffer_tokens=0)
    args = SAETrainingArguments(hook_points=[HP], n_latents=16, k=2, batch_size=64, train_tokens=640,
                                init_tokens=256, output_dir=str(tmp_path / "gen"), log_with=["none"],
                                progress_bar=False, plot_report=False, eval_tokens=0)
    saes = train(args, train_data=gen_stream)  # main: "the training data iterator is exhausted"
    assert saes[HP].config.training_info["tokens_trained"] == 640


# ------------------------------------------------------------------------------------------------ cards and the Hub
from test_hub import hub  # noqa: E402,F401  (the local Hub-API server fixture)


def _trained(tmp_path, name="run"):
    """A tiny SAE trained by SAETrainer with held-out data (what every hf_sae training writes)."""
    from hf_sae.training import SAETrainingArguments, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g) * torch.linspace(0.2, 2, 8)
    args = SAETrainingArguments(hook_points=[HP], n_latents=32, k=4, batch_size=256, train_tokens=2048,
                                output_dir=str(tmp_path / name), log_with=["none"], progress_bar=False,
                                plot_report=False, eval_tokens=512, seed=0)
    sae = train(args, train_data=x[:3584], eval_data=x[3584:])[HP]
    return SAE.from_pretrained(tmp_path / name / HP), sae.config.training_info


def test_pushed_trained_sae_card_carries_the_trainers_held_out_numbers(hub, tmp_path):
    from huggingface_hub import ModelCard, hf_hub_download

    sae, info = _trained(tmp_path)
    fm = info["final_metrics"]
    assert fm["eval_fvu"] is not None and info["eval_split"]
    H.push_to_hub(sae, "test-org/trained-card")
    card = ModelCard.load(hf_hub_download("test-org/trained-card", "README.md"))
    got = H.card_metrics(card)[HP]
    assert got["fvu"] == pytest.approx(fm["eval_fvu"]) and got["l0"] == pytest.approx(fm["eval_l0"])
    assert got["dead_fraction"] == pytest.approx(fm["eval_dead_fraction"])
    assert {r.dataset_split for r in card.data.eval_results} == {info["eval_split"]}
    assert card.data.license == H.DEFAULT_LICENSE and "not confirmed" in card.text
    assert card.data.datasets is None  # "in-memory tensors" is no Hub dataset id
    row = next(line for line in card.text.splitlines() if line.startswith(f"| `{HP}`"))
    assert "–" not in row.split("|")[6:9]
    # the README's subfolder= form loads the single SAE pushed to the root
    loaded = SAE.from_pretrained("test-org/trained-card", subfolder=HP)
    assert torch.equal(loaded.W_dec, sae.W_dec)
    # the usage snippet of the card runs as written
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)
    assert scope["out"].reconstruction.shape == (8, 8) and scope["latents"].shape == (8, 32)


def test_push_takes_hf_sae_eval_metrics_json(hub, tmp_path, capsys):
    from huggingface_hub import ModelCard, hf_hub_download

    sae, _ = _trained(tmp_path)
    metrics = {"meta": {"hook_point": HP, "split": "validation", "dataset": "default"},
               "summary": {"fvu": 0.125, "l0": 4.0, "dead_fraction": 0.25, "delta_loss": 0.5, "kl": 0.1}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main(["push", str(tmp_path / "run" / HP), "--repo_id", "test-org/eval-card", "--metrics",
                 str(tmp_path / "metrics.json"), "--license", "mit"]) == 0
    card = ModelCard.load(hf_hub_download("test-org/eval-card", "README.md"))
    assert H.card_metrics(card) == {HP: {"fvu": 0.125, "l0": 4.0, "dead_fraction": 0.25, "delta_loss": 0.5}}
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}
    assert card.data.license == "mit" and "not confirmed" not in card.text
    assert card.data.datasets is None  # "default" is hf_sae's embedded corpus, not a Hub id
    assert "King James Bible" in card.text


def test_hub_dataset_ids_only():
    assert H.hub_dataset_id("HuggingFaceFW/fineweb") == "HuggingFaceFW/fineweb"
    assert H.hub_dataset_id("wikitext") == "wikitext"
    for bad in ("default", "default:train", "kjv (hf_sae embedded corpus)", "/data/my.txt", "in-memory tensors"):
        assert H.hub_dataset_id(bad) is None, bad


# ------------------------------------------------------------------------------------------------ loading errors
def test_loading_a_training_folder_lists_its_saes(tmp_path):
    for hp in ("layers.3.resid_post", "layers.6.resid_post"):
        SAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point=hp)).save_pretrained(tmp_path / "runs" / "live" / hp)
    (tmp_path / "runs" / "live" / "train_args.json").write_text("{}")
    with pytest.raises(OSError) as e:
        SAE.from_pretrained(tmp_path / "runs" / "live")
    msg = str(e.value)
    assert "subfolder='layers.3.resid_post'" in msg and "subfolder='layers.6.resid_post'" in msg
    with pytest.raises(OSError, match="layers.6.resid_post"):
        SAE.from_pretrained(tmp_path / "runs" / "live", subfolder="layers.9.resid_post")


def test_mistyped_local_path_never_reaches_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "l6").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a))
    with pytest.raises(FileNotFoundError, match=r"runs/l7 does not exist; runs holds: l6"):
        SAE.from_pretrained("runs/l7")
    with pytest.raises(FileNotFoundError, match=r"runs/corpus does not exist \(runs holds: l6\)"):
        list(load_texts("runs/corpus"))  # not a `datasets` name to fetch
    assert not calls


def test_wrong_subfolder_on_a_hub_repo_lists_the_hook_points(hub):
    saes = {hp: SAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point=hp))
            for hp in ("layers.1.resid_post", "layers.2.resid_post")}
    H.push_to_hub(saes, "test-org/two")
    with pytest.raises(OSError) as e:
        SAE.from_pretrained("test-org/two", subfolder="layers.5.resid_post")
    assert "subfolder='layers.1.resid_post'" in str(e.value) and "sae_index.json" in str(e.value)
    with pytest.raises(OSError, match="subfolder='layers.2.resid_post'"):
        SAE.from_pretrained("test-org/two")


# ------------------------------------------------------------------------------------------------ evaluate modules
def test_evaluate_modules_load_from_anywhere_and_take_predictions(tmp_path, monkeypatch):
    from hf_sae.evaluation import fvu
    from hf_sae.evaluation.modules import load_metric

    monkeypatch.chdir(tmp_path)  # not the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(300, 6, generator=g)
    ref = fvu(x, x_hat)
    assert load_metric("fvu").compute(predictions=x_hat, references=x)["fvu"] == pytest.approx(ref, rel=1e-12)
    m = load_metric("fvu")
    for s in range(0, 300, 70):
        m.add_batch(predictions=x_hat[s:s + 70].numpy(), references=x[s:s + 70].tolist())
    assert m.compute()["fvu"] == pytest.approx(ref, rel=1e-6)
    z = torch.relu(torch.randn(50, 10, generator=g))
    z[:, 3] = 0
    l0 = load_metric("l0").compute(predictions=z)
    assert l0["l0"] == pytest.approx((z != 0).sum(-1).double().mean().item())
    dead = load_metric("dead_latents").compute(predictions=z)
    assert dead["n_dead"] == 1 and dead["dead_fraction"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no evaluate module 'fvvu'"):
        load_metric("fvvu")


# ------------------------------------------------------------------------------------------------ launchers
def test_launch_check_unit():
    from hf_sae.training.launch import LaunchError, check_launch, launched_without_gpus

    assert not launched_without_gpus({}) and not launched_without_gpus({"WORLD_SIZE": "1"})
    assert launched_without_gpus({"WORLD_SIZE": "2"}) == (not torch.cuda.is_available())
    check_launch(1, env={})
    check_launch(2, env={"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=true torchrun --nproc_per_node 3"):
        check_launch(1, env={"WORLD_SIZE": "3"}, argv=["scripts/train.py", "--k", "4"])
    with pytest.raises(LaunchError, match="started ONE process"):
        check_launch(1, env={"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500", "MASTER_ADDR": "x"})


def test_a_live_run_holding_the_folder_stops_a_second_one(tmp_path):
    from hf_sae.training import SAETrainer, SAETrainingArguments
    from hf_sae.training.launch import LOCK_NAME, LaunchError

    out = tmp_path / "run"
    out.mkdir()
    import socket

    (out / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}\n")  # the pytest parent: alive
    args = SAETrainingArguments(hook_points=[HP], n_latents=16, k=2, batch_size=64, train_tokens=128,
                                output_dir=str(out), log_with=["none"], progress_bar=False, plot_report=False,
                                eval_tokens=0)
    with pytest.raises(LaunchError, match=f"pid {os.getppid()}"):
        SAETrainer(args, train_data=torch.randn(512, 8)).train()
    (out / LOCK_NAME).write_text(f"{socket.gethostname()} 999999999\n")  # a killed run's lock: taken over
    SAETrainer(args, train_data=torch.randn(512, 8)).train()
    assert not (out / LOCK_NAME).exists()


def _tiny_activations(tmp_path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "acts.safetensors"
    save_file({HP: torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def _train_argv(tmp_path) -> list[str]:
    return [str(REPO / "scripts" / "train.py"), "--activations", str(_tiny_activations(tmp_path)), "--hook_points",
            HP, "--n_latents", "16", "--k", "2", "--batch_size", "128", "--train_tokens", "512", "--log_with",
            "none", "--progress_bar", "false", "--plot_report", "false", "--output_dir", str(tmp_path / "out")]


def _launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK",
                                                                    "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.mark.timeout(300)
def test_torchrun_without_accelerate_use_cpu_really_runs_two_processes(tmp_path):
    """main: two independent single-process trainings racing on one folder (or a crash)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), *_train_argv(tmp_path)],
                       capture_output=True, text=True, timeout=240, env=_launch_env())
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "out" / HP / "config.json").read_text())["training_info"]
    assert info["num_processes"] == 2 and info["tokens_trained"] == 512
    assert r.stdout.count('"tokens_trained"') == 1  # one summary: one run, not two


@pytest.mark.timeout(300)
def test_accelerate_launch_num_processes_on_cpu_stops_instead_of_training_one_process(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", *_train_argv(tmp_path)],
                       capture_output=True, text=True, timeout=240, env=_launch_env())
    assert r.returncode != 0, r.stdout[-2000:]
    assert "started ONE process" in r.stderr and "ACCELERATE_USE_CPU=true torchrun" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "out" / HP).exists()


# ----------------------------------------------------------------------------------- reports, quickstart, cache
def test_report_is_self_contained_and_explains_metrics(tmp_path):
    from hf_sae.evaluation.report import write_report

    results = {
        "meta": {"hook_point": HP},
        "summary": {"fvu": 0.2, "l0": 30.0},
        "reconstruction": {"fvu": 0.2, "l0": 30.0, "histograms": {"l0": {"values": [29, 30, 31], "counts": [1, 5, 2]}}},
    }
    write_report(results, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "src='l0_histogram.png'" not in page
    assert "fraction of variance unexplained" in page and "lower is better" in page
    (tmp_path / "l0_histogram.png").unlink()  # the page alone still shows its plot
    assert page.count("<img src='data:image/png;base64,") == 1


def test_training_curves_of_a_run_shorter_than_one_log_interval(tmp_path):
    import matplotlib.pyplot as plt

    from hf_sae.training.report import curves_figure, write_report

    history = [
        {"step": 3, "tokens": 1_500_000, f"{HP}/eval/fvu": 0.3},
        {"step": 6, "tokens": 3_000_000, f"{HP}/eval/fvu": 0.2},
    ]
    write_report(str(tmp_path), HP, history, {}, plot=True)
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    curves = json.loads((tmp_path / "training_report.json").read_text())["curves"]
    fig = curves_figure(HP, curves)
    fig.canvas.draw()
    loss, fvu_ax = fig.axes[0], fig.axes[1]
    assert any("shorter than" in t.get_text() for t in loss.texts)  # the empty panel says why
    labels = [t.get_text() for t in fvu_ax.get_xticklabels() if t.get_text()]
    assert labels and all(len(lab) <= 5 for lab in labels) and any(lab.endswith("M") for lab in labels), labels
    plt.close(fig)


def test_quickstart_reuses_an_evaluation_of_the_same_weights(tmp_path):
    from hf_sae.quickstart import STAMP_FILE, _reuse_eval

    stamp = {"sae_sha256": "ab" * 32, "eval_args": ["x", "--n-tokens", "5"]}
    assert _reuse_eval(tmp_path, stamp) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"fvu": 0.5}}))
    (tmp_path / STAMP_FILE).write_text(json.dumps(stamp))
    assert _reuse_eval(tmp_path, stamp) == {"summary": {"fvu": 0.5}}
    assert _reuse_eval(tmp_path, {**stamp, "sae_sha256": "cd" * 32}) is None  # retrained: evaluate again


@pytest.mark.slow
def test_quickstart_first_run_is_quiet_and_a_rerun_resumes(tmp_path, monkeypatch, caplog, capsys):
    """A newcomer's first `make quickstart` prints no resume notice (it resumes only when a checkpoint is
    there); the rerun resumes the finished run from its checkpoint and reuses the evaluation and the feature
    browser of the same weights (tiny sizes, layer 1 of SmolLM2)."""
    import logging

    from hf_sae import quickstart

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # quickstart sets them; monkeypatch restores them
    argv = ["--out", str(tmp_path / "qs"), "--layer", "1", "--n-latents", "256", "--k", "8", "--cache-tokens", "2048",
            "--train-tokens", "2048", "--batch-size", "512", "--dead-tokens", "1024", "--eval-tokens", "512",
            "--downstream-tokens", "128", "--dashboard-tokens", "128", "--threads", "1", "--no-progress"]
    with caplog.at_level(logging.INFO):
        quickstart.main(argv)
    first = capsys.readouterr().out + caplog.text
    assert "resum" not in first.lower() and "no checkpoint" not in first, first
    assert "building the feature browser" in first and (tmp_path / "qs" / "dashboard" / "index.html").is_file()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("hf_sae")]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = quickstart.main(argv)
    second = capsys.readouterr().out + caplog.text
    assert "[hf_sae] resumed from" in second and "checkpoint-000000002048" in second, second
    assert "no checkpoint" not in second and summary["tokens_trained"] == 2048
    assert "4/5 evaluation: reusing" in second and "5/5 feature browser: reusing" in second, second
    assert summary["paths"]["dashboard"] == str(tmp_path / "qs" / "dashboard" / "index.html")


def test_cache_files_are_not_private(tmp_path):
    from hf_sae.data.cache import _atomic_write_json

    old = os.umask(0o022)
    try:
        _atomic_write_json(tmp_path / "metadata.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metadata.json").stat().st_mode) == 0o644
