"""CPU speed of this tree against another commit, in one run: `bench_unet.py --skip-cfg` (one
full-size 512 UNet forward, fp32) alternately from this checkout and from `--base` (a git
revision, extracted with `git archive`), `--rounds` times each; prints the median forward
seconds of both and their ratio (new / base; below 1 = faster). Alternating keeps a shared
machine's changing load out of the ratio.

    .venv/bin/python benchmarks/bench_unet_ab.py --base HEAD~1 --frames 4 --latent 16 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def extract(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def forward_seconds(tree: Path, args, out: Path) -> float:
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_unet.py"), "--skip-cfg", "--json", str(out),
           "--frames", str(args.frames), "--latent", *map(str, args.latent), "--threads", str(args.threads)]
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True)
    return json.loads(out.read_text())["forward_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--latent", type=int, nargs=2, default=(40, 64))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        (Path(tmp) / "base").mkdir()
        base = extract(args.base, Path(tmp) / "base")
        times = {"base": [], "new": []}
        for r in range(args.rounds):
            for name, tree in (("base", base), ("new", REPO)):
                times[name].append(forward_seconds(tree, args, Path(tmp) / f"{name}{r}.json"))
                print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    b, n = statistics.median(times["base"]), statistics.median(times["new"])
    print(json.dumps({"base": args.base, "base_s": round(b, 3), "new_s": round(n, 3),
                      "ratio_new_over_base": round(n / b, 3), "frames": args.frames, "latent": list(args.latent)}))


if __name__ == "__main__":
    main()
