"""Cold start to saved image with the embedded default model: `imagine bench default`.

Each run is a fresh `imagine generate` process (imports, model load, text encoding, sampling, VAE
decode, PNG write), timed from process start to exit, so it measures what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="cold starts to time")
    p.add_argument("--prompt", default="a red circle to the left of a blue square")
    p.add_argument("--model", default=None, help="model to time (default: the embedded one)")
    p.add_argument("--json", default=None, help="write the figures here")


def run(args) -> int:
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"{i}.png"
            cmd = [sys.executable, "-m", "imagine.cli", "generate", args.prompt, "--seed", str(i), "-o", str(out), "-q"]
            if args.model:
                cmd += ["--model", args.model]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            dt = time.perf_counter() - t0
            if proc.returncode != 0 or not out.is_file():
                print(proc.stderr[-2000:], file=sys.stderr)
                raise RuntimeError(f"imagine generate failed (exit {proc.returncode})")
            times.append(dt)
            print(f"run {i + 1}: {dt:.2f} s to {out.name}")
    result = {"runs": len(times), "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
              "goal_s": 10.0, "prompt": args.prompt, "model": args.model or "default", "cpus": os.cpu_count()}
    print(f"cold start to saved image: median {result['median_s']:.2f} s (min {result['min_s']:.2f}, "
          f"max {result['max_s']:.2f}) over {len(times)} runs; goal 10 s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="imagine bench default")
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
