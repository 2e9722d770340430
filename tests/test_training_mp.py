"""Multi-process training on CPU: 2 processes (torchrun + gloo, Accelerate MULTI_CPU) running scripts/train.py.

The test launches this file as the torchrun script. Each process records the rows it trains on
(through a thin wrapper around the tensor source) and dumps its final weights, so the test can
check that the processes read disjoint data, that together they read exactly the batches of the
1-process run, that they end with identical weights, and that they count the same total tokens.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HP = "layers.0.resid_post"
STEPS, BATCH, N = 40, 256, 16384  # one epoch: every row is read at most once


def _cli(data: Path, out: Path) -> list[str]:
    return ["--activations", str(data), "--hook_points", HP, "--n_latents", "64", "--k", "4",
            "--batch_size", str(BATCH), "--train_tokens", str(BATCH * STEPS), "--checkpoint_every_tokens",
            str(BATCH * 10), "--eval_every_tokens", "0", "--log_with", "jsonl", "--progress_bar", "false",
            "--dead_tokens_threshold", "1024", "--lr", "1e-2", "--seed", "1", "--plot_report", "false",
            "--output_dir", str(out)]


def _worker(dump: str, argv: list[str]) -> None:
    """Run scripts/train.py in this process, recording the row ids it reads and its final weights."""
    from safetensors.torch import save_file

    from hf_sae.training import sources, trainer

    seen: list[torch.Tensor] = []
    orig_iterate = sources.TensorSource.iterate

    def recording_iterate(self, start=0):
        for mb in orig_iterate(self, start):
            seen.append(mb[HP][:, -1].round().long())  # the last feature holds the row id (see test)
            yield mb

    sources.TensorSource.iterate = recording_iterate
    orig_finish = trainer.SAETrainer._finish

    def finish_and_dump(self):
        saes = orig_finish(self)
        rank = self.accelerator.process_index
        save_file({k: v.contiguous() for k, v in saes[HP].state_dict().items()}, f"{dump}/rank{rank}.safetensors")
        with open(f"{dump}/rank{rank}.json", "w") as f:
            json.dump({"rows": torch.cat(seen).tolist(), "tokens": self.state.tokens, "steps": self.state.step,
                       "num_processes": self.accelerator.num_processes,
                       "distributed_type": str(self.accelerator.distributed_type),
                       "since_fired": self.since_fired[HP].tolist()}, f)
        return saes

    trainer.SAETrainer._finish = finish_and_dump
    sys.argv = [str(REPO / "scripts" / "train.py"), *argv]
    runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="__main__")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_read_disjoint_data_and_agree(tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_sae.training import parse_args
    from hf_sae.training.sources import TensorSource

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 16, generator=g) + 2.0
    x[:, -1] = torch.arange(N, dtype=torch.float32)  # row id, exact in float32
    data = tmp_path / "acts.safetensors"
    save_file({HP: x}, str(data))
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(Path(__file__)), "--worker", str(dump), *_cli(data, tmp_path / "mp")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r0, r1 = (json.loads((dump / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["num_processes"] == r1["num_processes"] == 2 and "MULTI_CPU" in r0["distributed_type"]
    # disjoint data, same token count as one process, same dead-latent counters on both ranks
    assert not set(r0["rows"]) & set(r1["rows"])
    assert len(r0["rows"]) == len(r1["rows"]) == BATCH * STEPS // 2
    assert r0["tokens"] == r1["tokens"] == BATCH * STEPS and r0["steps"] == r1["steps"] == STEPS
    assert r0["since_fired"] == r1["since_fired"]
    # identical weights on both ranks
    w0, w1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # together they read exactly the tokens of a 1-process run, step by step
    args = parse_args(_cli(data, tmp_path / "one"))
    one = TensorSource({HP: x}, micro=BATCH, seed=args.seed).iterate()
    half = BATCH // 2
    for s in range(STEPS):
        ref = next(one)[HP][:, -1].round().long().tolist()
        assert r0["rows"][s * half:(s + 1) * half] + r1["rows"][s * half:(s + 1) * half] == ref
    # the saved SAE records the run
    cfg = json.loads((tmp_path / "mp" / HP / "config.json").read_text())
    assert cfg["training_info"]["num_processes"] == 2 and cfg["training_info"]["tokens_trained"] == BATCH * STEPS


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3:])
