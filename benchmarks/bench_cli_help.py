"""Wall time of `hf-sae [COMMAND] --help` (a fresh interpreter each time), for this checkout and, optionally,
another checkout of hf_sae measured in the same run as the baseline.

    python benchmarks/bench_cli_help.py                         # this checkout, every command
    python benchmarks/bench_cli_help.py --baseline /path/to/other/checkout --repeats 3

Each row is the best of ``--repeats`` runs of ``python -c "from hf_sae.cli import main; main([... '--help'])"``
with PYTHONPATH set to the checkout, and the heavy modules that run imported. The first row times
``python -c pass`` (the interpreter's own start-up) in the same run, and "x pass" divides each time by it.
Only ratios measured in the same run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

CODE = ("import sys\nfrom hf_sae.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', ','.join(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")


def measure(root: Path, argv: list[str] | None, repeats: int) -> tuple[float, str]:
    """Best wall time of ``repeats`` fresh interpreters running ``hf-sae ARGV`` (``python -c pass`` when
    ``argv`` is None), and the heavy modules it imported."""
    best, imported = float("inf"), ""
    code = "pass" if argv is None else CODE.format(argv=argv)
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, cwd=root)
        best = min(best, time.perf_counter() - t)
        imported = next((line.split(" ", 1)[1] if " " in line else "" for line in out.stdout.splitlines()
                         if line.startswith("IMPORTED")), "?")
    return best, imported or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="another hf_sae checkout to time in the same run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--commands", nargs="+", default=["", "train", "cache", "eval", "sage", "push", "convert",
                                                     "dashboard", "autointerp"])
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1]
    roots = [("this", here)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    print(
        "| command | "
        + " | ".join(f"{n} (s) | {n} x pass | {n} imports" for n, _ in roots)
        + (" | baseline / this |" if args.baseline else " |")
    )
    print("|---|" + "---:|---:|---|" * len(roots) + ("---:|" if args.baseline else ""))
    passes = [measure(root, None, args.repeats)[0] for _, root in roots]
    print("| `python -c pass` | " + " | ".join(f"{t:.2f} | 1.0 | -" for t in passes)
          + (" | |" if args.baseline else " |"), flush=True)
    for cmd in args.commands:
        argv = ([cmd] if cmd else []) + ["--help"]
        cells, times = [], []
        for (_, root), t_pass in zip(roots, passes):
            t, imp = measure(root, argv, args.repeats)
            times.append(t)
            cells.append(f"{t:.2f} | {t / t_pass:.1f} | {imp}")
        ratio = f" | {times[1] / times[0]:.1f}x |" if args.baseline else " |"
        print(f"| `hf-sae {' '.join(argv)}` | " + " | ".join(cells) + ratio, flush=True)


if __name__ == "__main__":
    main()
