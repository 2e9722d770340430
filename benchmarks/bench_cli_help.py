"""Wall time of `hf-sae [COMMAND] --help` (a fresh interpreter each time), for this checkout and, optionally,
another checkout of hf_sae measured in the same run as the baseline.

    python benchmarks/bench_cli_help.py                         # this checkout
    python benchmarks/bench_cli_help.py --baseline /path/to/other/checkout --repeats 3

Each row is the best of ``--repeats`` runs of ``python -c "from hf_sae.cli import main; main([... '--help'])"``
with PYTHONPATH set to the checkout, and the heavy modules that run imported. Only ratios between
checkouts measured in the same run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

CODE = ("import sys\nfrom hf_sae.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', ','.join(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")


def measure(root: Path, argv: list[str], repeats: int) -> tuple[float, str]:
    best, imported = float("inf"), ""
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CODE.format(argv=argv)], capture_output=True, text=True,
                             env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, cwd=root)
        best = min(best, time.perf_counter() - t)
        imported = next((line.split(" ", 1)[1] if " " in line else "" for line in out.stdout.splitlines()
                         if line.startswith("IMPORTED")), "?")
    return best, imported or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="another hf_sae checkout to time in the same run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--commands", nargs="+", default=["", "eval", "train", "push", "cache"])
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1]
    roots = [("this", here)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    print(
        "| command | "
        + " | ".join(f"{n} (s) | {n} imports" for n, _ in roots)
        + (" | ratio |" if args.baseline else " |")
    )
    print("|---|" + "---:|---|" * len(roots) + ("---:|" if args.baseline else ""))
    for cmd in args.commands:
        argv = ([cmd] if cmd else []) + ["--help"]
        cells, times = [], []
        for _, root in roots:
            t, imp = measure(root, argv, args.repeats)
            times.append(t)
            cells.append(f"{t:.2f} | {imp}")
        ratio = f" | {times[1] / times[0]:.1f}x |" if args.baseline else " |"
        print(f"| `hf-sae {' '.join(argv)}` | " + " | ".join(cells) + ratio, flush=True)


if __name__ == "__main__":
    main()
