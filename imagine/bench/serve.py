"""Load test of `imagine serve` on loopback: N concurrent clients for a bounded time; counts every request.

The server runs as its own process (`python -m imagine.cli serve`, a tiny random model unless
--model is given), so the clients' threads do not share its interpreter. Each client posts
AUTOMATIC1111 txt2img requests back to back until the time is up (or --max-requests were sent);
after a 429 it waits --backoff seconds (not the full Retry-After: the point is to keep the
queue full). Every request ends as answered (200 with its images), rejected (429) or failed
(anything else, timeouts included), and the run checks answered + rejected + failed == sent,
and that the server's own counters agree (nothing lost on either side).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["a red circle to the left of a blue square", "a green triangle above a yellow circle",
           "two blue squares", "a small purple circle", "an orange square below a red triangle"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="model to serve (default: a tiny random model made for the run)")
    p.add_argument("--url", default=None, help="load an already running server instead of starting one "
                                               "(loopback only, e.g. http://127.0.0.1:7860)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds during which clients send (default 20)")
    p.add_argument("--max-requests", type=int, default=5000, help="stop sending after this many (default 5000)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per request (default 4)")
    p.add_argument("--size", type=int, default=None, help="width = height of the images (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--sampler", default="Euler a", help="sampler name (default 'Euler a')")
    p.add_argument("--queue-size", type=int, default=8, help="server queue size (default 8)")
    p.add_argument("--max-batch", type=int, default=8, help="server images per forward pass (default 8)")
    p.add_argument("--threads", type=int, default=None, help="server torch threads (default: torch's choice)")
    p.add_argument("--backoff", type=float, default=0.1, help="seconds a client waits after a 429 (default 0.1)")
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds (default 300)")
    p.add_argument("--out", default="bench-serve.json", help="JSON report path (default bench-serve.json)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    s = sorted(xs)

    def q(f):  # nearest-rank percentile: the ceil(f n)-th smallest
        return s[min(len(s) - 1, max(0, math.ceil(f * len(s)) - 1))]

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": s[-1], "mean": sum(s) / len(s)}


def _check_loopback(url: str) -> None:
    from urllib.parse import urlparse

    from imagine.server.cli import is_loopback

    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        raise ValueError(f"--url {url}: the load test only targets this machine's loopback (127.0.0.1, ::1)")


class _Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = self.answered = self.rejected = self.failed = self.images = 0
        self.latencies: list[float] = []
        self.rejected_latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.retry_after: list[int] = []

    def take_slot(self, limit: int) -> bool:
        with self.lock:
            if self.sent >= limit:
                return False
            self.sent += 1
            return True


def _client(url: str, args, deadline: float, tally: _Tally, rng: random.Random) -> None:
    import requests

    session = requests.Session()
    while time.time() < deadline and tally.take_slot(args.max_requests):
        body = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(2**31), "steps": args.steps,
                "sampler_name": args.sampler, "batch_size": args.batch_size, "cfg_scale": 5.0}
        if args.size:
            body["width"] = body["height"] = args.size
        t0 = time.perf_counter()
        try:
            r = session.post(url + "/sdapi/v1/txt2img", json=body, timeout=args.timeout)
            dt = time.perf_counter() - t0
            status = r.status_code
            if status == 200:
                n = len(r.json()["images"])
                ok = n == args.batch_size
        except Exception as e:  # a timeout or a broken connection is a failure, counted
            dt, status, ok, n = time.perf_counter() - t0, None, False, 0
            err = type(e).__name__
        with tally.lock:
            if status == 200 and ok:
                tally.answered += 1
                tally.images += n
                tally.latencies.append(dt)
            elif status == 429:
                tally.rejected += 1
                tally.rejected_latencies.append(dt)
                ra = r.headers.get("Retry-After")
                if ra and ra.isdigit():
                    tally.retry_after.append(int(ra))
            else:
                tally.failed += 1
                key = err if status is None else f"HTTP {status}" + ("" if status != 200 else " (wrong image count)")
                tally.errors[key] = tally.errors.get(key, 0) + 1
        if status == 429:
            time.sleep(args.backoff)


def _start_server(args, model: str, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imagine.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch), "--log-level", "error"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300.0) -> None:
    import requests

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if requests.get(url + "/imagine/v1/stats", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s")


def run(args) -> int:
    import requests

    for k in ("clients", "max_requests", "steps", "batch_size", "queue_size", "max_batch"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1; got {getattr(args, k)}")
    if not 0 < args.duration <= 3600:
        raise ValueError(f"--duration must be in (0, 3600] seconds; got {args.duration}")
    proc, tmp = None, None
    try:
        if args.url:
            _check_loopback(args.url)
            url = args.url.rstrip("/")
            model = "(external server)"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="imagine-bench-serve-")
            model = args.model
            if model is None:
                from imagine.testing import make_tiny_model

                model = str(make_tiny_model(Path(tmp.name) / "tiny"))
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            log_path = Path(tmp.name) / "server.log"
            t_start = time.time()
            proc = _start_server(args, model, port, log_path)
            try:
                _wait_ready(url, proc)
            except RuntimeError:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise
            print(f"server ready in {time.time() - t_start:.1f} s at {url} (model {model})", file=sys.stderr)
        config = requests.get(url + "/imagine/v1/config", timeout=10).json()
        before = requests.get(url + "/imagine/v1/stats", timeout=10).json()
        # one warm-up request (not counted): first-call allocations would skew the first latencies
        warm = {"prompt": "warm up", "seed": 0, "steps": args.steps, "sampler_name": args.sampler}
        if args.size:
            warm["width"] = warm["height"] = args.size
        r = requests.post(url + "/sdapi/v1/txt2img", json=warm, timeout=args.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request failed: HTTP {r.status_code}: {r.text[:500]}")
        before = requests.get(url + "/imagine/v1/stats", timeout=10).json()

        tally = _Tally()
        t0 = time.time()
        deadline = t0 + args.duration
        threads = [threading.Thread(target=_client, args=(url, args, deadline, tally, random.Random(i)), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + args.timeout + 60)
        wall = time.time() - t0
        after = requests.get(url + "/imagine/v1/stats", timeout=10).json()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if tmp is not None:
            tmp.cleanup()

    server = {k: after.get(k, 0) - before.get(k, 0) for k in ("accepted", "rejected", "completed", "failed",
                                                              "cancelled", "interrupted", "batches")}
    accounted = tally.answered + tally.rejected + tally.failed == tally.sent
    agrees = server["rejected"] == tally.rejected and server["completed"] == tally.answered
    report = {
        "model": model, "url": url, "server_config": config, "clients": args.clients, "duration_s": args.duration,
        "wall_s": round(wall, 3), "steps": args.steps, "batch_size": args.batch_size, "sampler": args.sampler,
        "size": args.size or config["defaults"]["width"], "queue_size": args.queue_size, "max_batch": args.max_batch,
        "sent": tally.sent, "answered": tally.answered, "rejected_429": tally.rejected, "failed": tally.failed,
        "errors": tally.errors, "images": tally.images,
        "answered_per_s": round(tally.answered / wall, 3), "images_per_s": round(tally.images / wall, 3),
        "latency_s": {k: None if v is None else round(v, 4) for k, v in _percentiles(tally.latencies).items()},
        "rejected_latency_s": {k: None if v is None else round(v, 4)
                               for k, v in _percentiles(tally.rejected_latencies).items()},
        "retry_after_s": _percentiles([float(x) for x in tally.retry_after])["p50"],
        "server_counters": server,
        "mean_images_per_batch": round((server["completed"] * args.batch_size) / server["batches"], 3)
        if server["batches"] else None,
        "all_accounted": accounted, "server_agrees": agrees,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    lat = report["latency_s"]
    print(f"sent {tally.sent}: answered {tally.answered}, rejected (429) {tally.rejected}, failed {tally.failed} "
          f"in {wall:.1f} s with {args.clients} clients")
    if tally.latencies:
        print(f"latency of answered requests: p50 {lat['p50']:.3f} s, p90 {lat['p90']:.3f} s, p99 {lat['p99']:.3f} s, "
              f"max {lat['max']:.3f} s; {report['answered_per_s']:.2f} answered/s, "
              f"{report['mean_images_per_batch']} images per forward batch")
    if tally.rejected:
        print(f"429 answered in p50 {report['rejected_latency_s']['p50'] * 1000:.1f} ms, "
              f"Retry-After median {report['retry_after_s']} s")
    if tally.errors:
        print(f"failures: {tally.errors}")
    print(f"answered + rejected + failed == sent: {accounted}; server counters agree: {agrees} "
          f"(server: {server})")
    print(f"wrote {args.out}")
    return 0 if accounted and agrees and not tally.failed else 1
