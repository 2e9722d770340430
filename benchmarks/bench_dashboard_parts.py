"""CPU seconds of two parts of `hf-sae dashboard` at n = 32768 latents, without the real LM's cost:

- ``update``: ``collect_features`` on a tiny random Llama (hidden 64, one layer) with a fresh TopK SAE
  (n latents, k = 32): the LM forward and the encode are cheap, so the CPU time is mostly the per-batch
  top-k / reservoir / histogram update (printed apart: ``seconds`` = [wall, CPU] per part);
- ``site``: ``write_site`` on synthetic statistics (every top / sample slot filled, context tokens drawn
  from 8000 token ids of the SmolLM2 tokenizer, random logit effects and neighbours).

    nice -n 19 python benchmarks/bench_dashboard_parts.py update --n-latents 32768 --n-tokens 40960
    nice -n 19 python benchmarks/bench_dashboard_parts.py site --n-latents 32768 --out /tmp/site_parts

To compare with an earlier commit, run the same command with ``PYTHONPATH`` set to an export of it
(``git archive COMMIT hf_sae | tar -x -C /tmp/base``; ``PYTHONPATH=/tmp/base``). Prints one JSON line;
results in ``benchmarks/RESULTS_dashboard.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def bench_update(n: int, n_tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sae import SAEConfig, SparseAutoencoder
    from hf_sae.dashboard.collect import collect_features

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    lm = LlamaForCausalLM(cfg).eval()
    sae = SparseAutoencoder(SAEConfig(d_in=64, n_latents=n, k=32, hook_point="layers.0.resid_post")).eval()
    ids = torch.randint(0, 1000, (n_tokens // 128, 128))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    c = time.process_time()
    st = collect_features(sae, lm, ids, keep, "layers.0.resid_post", batch_size=16, n_pool=0)
    return {
        "collect_cpu_s": round(time.process_time() - c, 2),
        "alive": int((st.count > 0).sum()),
        "parts_wall_cpu_s": {k: [round(x, 2) for x in v] for k, v in getattr(st, "seconds", {}).items()},
    }


def bench_site(n: int, out: str) -> dict:
    from hf_sae.dashboard.collect import HIST_EDGES, FeatureStats
    from hf_sae.dashboard.site import write_site
    from hf_sae.data.models import DEFAULT_MODEL, load_model

    _, tok = load_model(DEFAULT_MODEL)
    torch.manual_seed(0)
    N, T, K, S, W = 1600, 128, 10, 10, 12
    ids = torch.randint(0, 8000, (N, T), dtype=torch.int32)
    st = FeatureStats(
        input_ids=ids,
        n_tokens=N * T,
        before=8,
        after=3,
        top_act=torch.rand(n, K).sort(1, descending=True).values,
        top_pos=torch.randint(0, N * T, (n, K)),
        top_ctx=torch.rand(n, K, W).half(),
        sample_act=torch.rand(n, S),
        sample_pos=torch.randint(0, N * T, (n, S)),
        sample_ctx=torch.rand(n, S, W).half(),
        count=torch.randint(1, 1000, (n,)),
        act_sum=torch.rand(n).double() * 100,
        act_max=torch.rand(n) + 1,
        hist=torch.randint(0, 50, (n, HIST_EDGES.numel() + 1)),
    )
    st.pool_pos, st.pool_active = torch.randint(0, N * T, (256,)), [[1, 2]] * 256
    logits = (torch.rand(n, 10), torch.randint(0, 49152, (n, 10)), torch.rand(n, 10), torch.randint(0, 49152, (n, 10)))
    near = (torch.rand(n, 6), torch.randint(0, n, (n, 6)))
    c = time.process_time()
    write_site(st, out, tok, meta={}, logits=logits, near=near, n2g={})
    return {"write_site_cpu_s": round(time.process_time() - c, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("update", "site"))
    p.add_argument("--n-latents", type=int, default=32768)
    p.add_argument("--n-tokens", type=int, default=40960, help="update: tokens read (default 40960)")
    p.add_argument("--out", default="/tmp/hf_sae_bench_site_parts", help="site: output folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    import hf_sae

    res = bench_update(args.n_latents, args.n_tokens) if args.part == "update" else bench_site(args.n_latents, args.out)
    res.update(
        part=args.part,
        n_latents=args.n_latents,
        hf_sae=os.path.dirname(hf_sae.__file__),
        load_average_1min=round(os.getloadavg()[0], 2),
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
