"""Benchmark of `hf-sae eval`: train a small SmolLM2 SAE briefly, then evaluate it on 100k tokens
with every metric, and print the per-stage time table.

    python benchmarks/bench_eval.py --out bench_eval_out            # ~25 min on 2 CPU cores
    python benchmarks/bench_eval.py --sae path/to/sae --out o        # skip training

Training data: the validation split of the shipped KJV corpus (Hebrews-Revelation, ~63k tokens);
evaluation: the first 100k kept tokens of the train split (Genesis...), so the SAE is evaluated
out of sample. The SAE: layers.6.resid_post, n = 8 * 576 = 4608 latents, TopK k = 32, trained with
the library's trainer (Gao et al. recipe) for a few epochs over the captured activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HOOK = "layers.6.resid_post"


def capture_train_activations(model, tok, n_tokens: int, window: int = 256, batch: int = 8) -> torch.Tensor:
    from hf_sae.data import corpus
    from hf_sae.hooks import run_with_capture

    ids = corpus.tokenize_windows(corpus.load_texts("default", split="validation"), tok, window=window)
    keep = corpus.token_mask(ids, tok)
    rows, total = [], 0
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            acts = run_with_capture(model, ids[s:s + batch], [HOOK])[HOOK]
            x = acts[keep[s:s + batch]]
            rows.append(x)
            total += x.shape[0]
            print(f"\rcaptured {total} tokens", end="", file=sys.stderr)
            if total >= n_tokens:
                break
    print(file=sys.stderr)
    return torch.cat(rows)[:n_tokens]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_eval_out")
    p.add_argument("--sae", default=None, help="evaluate this SAE instead of training one")
    p.add_argument("--train-capture-tokens", type=int, default=60_000)
    p.add_argument("--train-tokens", type=int, default=300_000)
    p.add_argument("--eval-tokens", type=int, default=100_000)
    p.add_argument("--eval-extra", default="", help="extra `hf-sae eval` arguments, space separated")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the reference machine has 2 cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from hf_sae.data.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    timings = {}
    sae_dir = Path(args.sae) if args.sae else out / "sae"
    if args.sae is None:
        t = time.perf_counter()
        x = capture_train_activations(model, tok, args.train_capture_tokens)
        timings["train_capture_s"] = time.perf_counter() - t
        from hf_sae.training import SAETrainingArguments, train

        targs = SAETrainingArguments(hook_points=[HOOK], train_tokens=args.train_tokens, batch_size=1024, k=32,
                                     expansion_factor=8, output_dir=str(out / "train"), overwrite_output_dir=True,
                                     log_with=[], eval_every_tokens=0, checkpoint_every_tokens=0,
                                     progress_bar=True, init_tokens=8192)
        t = time.perf_counter()
        saes = train(targs, train_data={HOOK: x}, model=model, tokenizer=tok)
        timings["train_s"] = time.perf_counter() - t
        sae = saes[HOOK]
        sae.config.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
        sae.config.hook_point = HOOK
        sae.save_pretrained(sae_dir)
        del x
    from hf_sae.evaluation.run import add_eval_args, run_eval

    ep = argparse.ArgumentParser()
    add_eval_args(ep)
    eargs = ep.parse_args([str(sae_dir), "--out", str(out / "eval"), "--split", "train",
                           "--n-tokens", str(args.eval_tokens), *args.eval_extra.split()])
    t = time.perf_counter()
    res = run_eval(eargs, model=model, tokenizer=tok)
    timings["eval_total_s"] = time.perf_counter() - t
    load = os.getloadavg()
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "loadavg_at_end": load, **timings}
    (out / "bench_info.json").write_text(json.dumps(info, indent=1))
    print("\n| stage | seconds |\n|---|---:|")
    for k, v in res["timings_s"].items():
        print(f"| {k} | {v:.1f} |")
    print(
        f"\ntokens: {res['meta']['n_tokens']} (reconstruction/AFA/N2G), probes {eargs.probe_tokens}, "
        f"downstream {eargs.downstream_tokens}, ablation {eargs.ablation_latents} latents"
        f" x {eargs.ablation_context} ctx"
    )
    print(json.dumps(info, indent=1))
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
