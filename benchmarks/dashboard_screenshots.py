"""Screenshots of a built feature browser in headless chromium (the same harness as tests/test_dashboard.py):
the index, one latent page and the texts view, plus the console errors (there must be none).

    python benchmarks/dashboard_screenshots.py quickstart_out/dashboard --latent 123 --out docs/screenshots

Needs Debian's chromium + chromium-driver and selenium (see tests/browser.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import browser  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("site")
    p.add_argument(
        "--latent", type=int, default=None, help="latent page to capture (default: the densest listed first)"
    )
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--prefix", default="quickstart")
    args = p.parse_args()
    why = browser.missing()
    if why:
        raise SystemExit(f"cannot take screenshots: {why}")
    url = (Path(args.site) / "index.html").resolve().as_uri()
    out = Path(args.out)
    with browser.chromium() as d:
        d.get(url)
        browser.wait_for(d, "body[data-ready='1']")
        rows = browser.wait_for(d, "tr.latent-row")
        latent = args.latent if args.latent is not None else int(rows[0].get_attribute("data-id"))
        print(browser.screenshot(d, out / f"{args.prefix}_index.png"))
        d.get(url + f"#latent/{latent}")
        browser.wait_for(d, "#top-contexts .ctx")
        print(browser.screenshot(d, out / f"{args.prefix}_latent_{latent}.png"))
        d.get(url + "#texts")
        browser.wait_for(d, ".textview .tok", min_count=3)
        print(browser.screenshot(d, out / f"{args.prefix}_texts.png"))
        errors = browser.console_errors(d)
    if errors:
        raise SystemExit(f"console errors: {errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
