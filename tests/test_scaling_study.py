"""benchmarks/scaling_study.py without training: the manifest, the 'flattened' criterion, and the report
stage (fits, plots, tables, REPRODUCTION.md) on synthetic runs with known exponents."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("scaling_study", BENCH / "scaling_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_manifest_merges_shared_runs_and_orders_by_priority(study):
    ns = study.parser().parse_args([])
    runs = study.build_manifest(ns)
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names))
    shared = next(r for r in runs if r["name"] == f"topk_n{ns.lk_n}_k{ns.k}")
    assert {"LN", "Lk", "frontier", "multitopk"} <= set(shared["groups"])  # trained once, used by four groups
    assert all(r["k"] <= r["n"] for r in runs)
    assert names[0] == f"topk_n{min(ns.sizes)}_k{ns.k}" and names[-1] == f"topk_n{max(ns.sizes)}_k{ns.k}"
    kw = study.training_kwargs(ns, shared, Path("/c"), Path("/w"))
    assert kw["lr"] == pytest.approx(ns.lr * math.sqrt(ns.lr_ref_n / shared["n"]))
    assert kw["train_tokens"] == ns.train_tokens and kw["output_dir"] == f"/w/runs/{shared['name']}"
    assert study.command_line(kw).startswith("hf-sae train --hook_points layers.6.resid_post ")


def test_flattened_criterion(study):
    key = f"{study.HOOK}/eval/fvu"
    still_falling = [{"tokens": t, key: 1.0 / t} for t in (1, 2, 3, 4, 5, 6, 7, 8)]
    flat = [{"tokens": t, key: 0.5 + 0.001 * (t == 1)} for t in (1, 2, 3, 4, 5, 6, 7, 8)]
    f1 = study.flattened(still_falling, tol=0.02)
    assert f1["flattened"] is False and f1["last_quarter_rel_drop"] == pytest.approx(0.25)  # 1/6 -> 1/8
    assert study.flattened(flat, tol=0.02)["flattened"] is True
    assert study.flattened(flat[:2], tol=0.02)["flattened"] is None  # too few evaluations to tell


def _row(name, groups, activation, n, k, fvu, l0, extra=None, **more):
    return {"name": name, "groups": groups, "activation": activation, "n": n, "k": k, "extra": extra or {},
            "tokens_trained": 1000, "fvu": fvu, "l0": l0, "dead_heldout": 0.0, "dead_train": 0.001,
            "train_seconds": 1.0, "flattened": True, "last_quarter_rel_drop": 0.01, "eval_fvu_curve": [],
            "ce_clean": 3.0, "ce_spliced": 3.0 + fvu, "delta_loss": fvu, "kl": fvu / 2, **more}


def test_report_recovers_planted_exponents_and_writes_every_artifact(study, tmp_path):
    ns = study.parser().parse_args(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"),
                                    "--reproduction", str(tmp_path / "REPRODUCTION.md"), "--bootstrap", "20"])
    beta_n, beta_k = -0.3, -0.5
    law = lambda n, k: 2.0 * n ** beta_n * (k / 32) ** beta_k + 0.02  # noqa: E731
    manifest = study.build_manifest(ns)
    for r in manifest:
        fvu = law(r["n"], r["k"])
        extra = {}
        if r["activation"] == "relu":  # ReLU: worse MSE at a sweep of L0 that brackets k=32
            fvu, l0 = 2 * law(r["n"], 32), 8 if r["extra"]["l1_coef"] > 0.01 else 128
        else:
            l0 = r["k"]
        if "LN" in r["groups"]:
            extra.update(probe_loss=1 / math.log(r["n"]), n2g_precision=0.5 + r["n"] / 1e5, n2g_recall=0.3,
                         ablation_sparsity=0.1, n2g_ngram_precision=0.5, n2g_ngram_recall=0.1)
        if "multitopk" in r["groups"]:
            multi = bool(r["extra"].get("multi_topk"))
            extra["fvu_at_k"] = {str(k): (law(r["n"], k) if multi else law(r["n"], min(k, 32)) * (1 + (k > 32)))
                                 for k in (16, 32, 64, 128)}
        row = _row(r["name"], r["groups"], r["activation"], r["n"], r["k"], fvu, l0, r["extra"], **extra)
        d = tmp_path / "w" / "runs" / r["name"]
        d.mkdir(parents=True)
        (d / "study_eval.json").write_text(json.dumps(row))
    rep = study.stage_report(ns, manifest, tmp_path / "w", tmp_path / "r", {"hook_point": study.HOOK, "model": "m",
                                                                            "corpus": "c", "command": "cmd"},
                             log=lambda m: None)
    assert rep["missing"] == []
    assert rep["fits"]["L(N)"]["params"]["beta"] == pytest.approx(beta_n, abs=0.02)
    assert rep["fits"]["L(k)"]["params"]["beta"] == pytest.approx(beta_k, abs=0.03)
    assert rep["fits"]["L(N,k)"]["rms_log_residual"] < 0.05
    for png in ("L_of_N", "L_of_k", "L_of_N_k", "frontier", "metrics_vs_size", "progressive_code"):
        assert (tmp_path / "r" / f"{png}.png").read_bytes()[:4] == b"\x89PNG", png
    md = (tmp_path / "REPRODUCTION.md").read_text()
    assert "r/L_of_N.png" in md and "r/tables.md" in md
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines() if ln.startswith("| §")}
    assert lines["§3.1 (number of latents), the L(N) law at fixed k"].rstrip(" |").split(" | ")[-1].startswith("agree")
    assert (
        "| agree (" in lines["§5.2 (comparison with other activation functions), the sparsity-reconstruction frontier"]
    )
    assert lines["§5.3 (progressive recovery), Multi-TopK"].endswith("| agree |")
    tables = (tmp_path / "r" / "tables.md").read_text()
    assert f"beta = {rep['fits']['L(N)']['params']['beta']:.4g} [95 % CI" in tables
    assert "probe loss (nats): rho = -1.00 -> improves with n" in tables


def test_report_with_missing_runs_says_how_to_finish(study, tmp_path):
    ns = study.parser().parse_args(
        ["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--reproduction", str(tmp_path / "R.md")]
    )
    manifest = study.build_manifest(ns)
    rep = study.stage_report(
        ns,
        manifest,
        tmp_path / "w",
        tmp_path / "r",
        {"hook_point": study.HOOK, "model": "m", "corpus": "c"},
        log=lambda m: None,
    )
    assert len(rep["missing"]) == len(manifest) and rep["fits"] == {}
    assert "benchmarks/scaling_study.py" in (tmp_path / "R.md").read_text().split("Not finished")[1]


def test_cost_is_summed_from_the_runs_own_timings(study, tmp_path):
    with study.timed(tmp_path / "t.json") as tm:
        sum(range(10**5))
    assert json.loads((tmp_path / "t.json").read_text()) == tm
    assert tm["wall_seconds"] > 0 and tm["cpu_seconds"] >= 0 and len(tm["loadavg"]) == 2
    w = tmp_path / "w"

    def write(path, wall, cpu, load, ended):  # a timing file as `timed` writes it, ending at `ended`
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"wall_seconds": wall, "cpu_seconds": cpu, "loadavg": load}))
        os.utime(path, (ended, ended))

    write(w / "cache" / "cache_timing.json", 5.0, 5.0, [0.5, 1.0], 1000.0)
    for name, t0 in (("a", 1005.0), ("b", 1003.0)):  # b ran beside a, in another process
        write(w / "runs" / name / "train_timing.json", 10.0, 4.0, [1.0, 3.0], t0 + 10)
        write(w / "runs" / name / "eval_timing.json", 2.0, 1.0, [2.0, 2.0], t0 + 12)
    c = study.study_cost(w, [{"name": "a"}, {"name": "b"}, {"name": "never_timed"}])
    assert (c["train_wall_seconds"], c["train_cpu_seconds"], c["eval_wall_seconds"], c["eval_cpu_seconds"]) == (
        20.0, 8.0, 4.0, 2.0)
    assert (c["wall_seconds"], c["cpu_seconds"], c["loadavg_min"], c["loadavg_max"]) == (29.0, 15.0, 0.5, 3.0)
    assert c["elapsed_seconds"] == pytest.approx(1017.0 - 995.0)  # cache start to a's eval end
    ns = study.parser().parse_args(["--threads", "1", "--train-tokens", "65536", "--stages", "report",
                                    "--sizes", "512,1024"])
    assert study.study_command(ns) == ("nice -n 19 .venv/bin/python benchmarks/scaling_study.py "
                                       "--train-tokens 65536 --sizes 512,1024 --threads 1")


def test_n2g_within_two_standard_errors_and_a_rising_L_of_N_are_reported_as_such(study, tmp_path):
    ns = study.parser().parse_args(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"),
                                    "--reproduction", str(tmp_path / "R.md"), "--bootstrap", "0"])
    manifest = [r for r in study.build_manifest(ns) if "LN" in r["groups"]]
    for i, r in enumerate(manifest):  # precision rises with n by 0.01 per size; each latent scatters by +-0.3
        prec = 0.3 + 0.01 * i
        d = tmp_path / "w" / "runs" / r["name"]
        (d / "eval").mkdir(parents=True)
        row = _row(r["name"], r["groups"], "topk", r["n"], r["k"], 0.19 + 2e-6 * r["n"], 32, probe_loss=0.1,
                   n2g_precision=prec, n2g_recall=0.5, ablation_sparsity=0.1)
        (d / "study_eval.json").write_text(json.dumps(row))
        lat = [{"precision": prec - 0.3, "recall": 0.5, "n_fires_test": 3},
               {"precision": prec + 0.3, "recall": 0.5, "n_fires_test": 3},
               {"precision": 0.0, "recall": 0.0, "n_fires_test": 0}]  # never fires on the test text: not scored
        (d / "eval" / "n2g_faithful.json").write_text(json.dumps({"latents": lat}))
    spread = study.n2g_spread(tmp_path / "w" / "runs" / manifest[0]["name"] / "eval" / "n2g_faithful.json")
    assert spread["n2g_precision_se"] == pytest.approx(0.3) and spread["n2g_recall_se"] == 0.0
    study.stage_report(ns, manifest, tmp_path / "w", tmp_path / "r", {"hook_point": study.HOOK, "model": "m",
                                                                      "corpus": "c"}, log=lambda m: None)
    md = (tmp_path / "R.md").read_text()
    prec_line = next(ln for ln in md.splitlines() if ln.startswith("| §4.3") and "N2G precision improves" in ln)
    assert "+0.060 +- 0.424" in prec_line and prec_line.endswith("| not resolved at this scale (the change is "
                                                                  "within 2 standard errors) |")
    assert "| 0.3000 +- 0.300 |" in (tmp_path / "r" / "tables.md").read_text()
    ln_line = next(ln for ln in md.splitlines() if ln.startswith("| §3.1 (number of latents)"))
    assert "| disagree at this token budget: the FVU is lowest at n = 512 and rises beyond it" in ln_line


def test_report_refuses_runs_trained_with_other_flags(study, tmp_path):
    ns = study.parser().parse_args(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"),
                                    "--reproduction", str(tmp_path / "R.md")])
    run = study.build_manifest(ns)[0]
    d = tmp_path / "w" / "runs" / run["name"]
    d.mkdir(parents=True)
    kw = study.training_kwargs(ns, run, tmp_path / "w" / "cache", tmp_path / "w")
    (d / "train_args.json").write_text(json.dumps(kw))
    assert study.settings_mismatch(ns, run, tmp_path / "w") == []
    other = study.parser().parse_args(["--work", str(tmp_path / "w"), "--train-tokens", "65536",
                                       "--results", str(tmp_path / "r"), "--reproduction", str(tmp_path / "R.md")])
    with pytest.raises(SystemExit, match=r"run topk_n512_k32 was trained with train_tokens=32768 \(this command: "
                                         r"65536\), eval_every_tokens=8192 \(this command: 16384\); rerun with"):
        study.stage_report(other, study.build_manifest(other), tmp_path / "w", tmp_path / "r", {}, log=lambda m: None)
    assert not (tmp_path / "R.md").exists()


def test_only_and_runs_choose_what_to_train_but_the_manifest_keeps_the_whole_study(study, tmp_path):
    full = study.build_manifest(study.parser().parse_args([]))
    got = study.main(["--plan", "--only", "multitopk", "--work", str(tmp_path)])["manifest"]
    assert [r["name"] for r in got] == ["topk_n1024_k32", "topk_n1024_k32_multi_topkTrue"]  # the manifest's order
    assert json.loads((tmp_path / "manifest.json").read_text()) == full
    got = study.main(["--plan", "--runs", "topk_n2048_k32,topk_n512_k32", "--work", str(tmp_path)])["manifest"]
    assert [r["name"] for r in got] == ["topk_n2048_k32", "topk_n512_k32"]
    with pytest.raises(SystemExit, match=r"--runs: unknown run\(s\) \['topk_n3_k1'\]; see --plan"):
        study.main(["--plan", "--runs", "topk_n3_k1", "--work", str(tmp_path)])


def test_zero_width_intervals_are_reported_as_not_identified(study):
    import scaling_plots

    fit = {"params": {"b_n": -7.0, "beta": -0.2}, "ci95": {"b_n": [-7.0, -7.0], "beta": [-0.28, -0.17]},
           "rms_log_residual": 0.1}
    assert scaling_plots._ci(fit, "b_n") == "[interval not identified]"
    assert scaling_plots._ci(fit, "beta", label="95 % CI ") == "[95 % CI -0.280, -0.170]"
    exact = {**fit, "rms_log_residual": 0.0}  # no residual: a zero-width interval is the truth, not a degeneracy
    assert scaling_plots._ci(exact, "b_n") == "[-7.000, -7.000]"
def test_report_only_without_runs_keeps_the_committed_report(study, tmp_path):
    """`--stages report` in a fresh clone (no runs) stops with one line and rewrites nothing."""
    (tmp_path / "R.md").write_text("committed")
    argv = ["--stages", "report", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"),
            "--reproduction", str(tmp_path / "R.md")]
    with pytest.raises(SystemExit, match="no evaluated runs .* left as they are"):
        study.main(argv)
    assert (tmp_path / "R.md").read_text() == "committed" and not (tmp_path / "r").exists()
