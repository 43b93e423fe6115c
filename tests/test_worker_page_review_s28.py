"""Session 28's review of the server's model worker and its web page.

The worker (imagine/server/worker.py): progress is published whole, never changed after, and never goes back (0..1);
a job is answered as soon as its own images are made; a chunk whose jobs were all cancelled is not sampled; an
interrupt between chunks starts no new chunk (no grey placeholders); a batch that fails reruns the jobs not answered
one by one, never a cancelled one; a worker thread that dies refuses new jobs instead of leaving them waiting; a job's
live preview never shows another job's image; the queue limit; submit / cancel / interrupt / skip from many threads
against a running worker. Batched jobs get the images they get alone (the tiny model, many features).

The page (imagine/server/static/): a picture dropped on the page is read for its parameters (the browser would
otherwise leave the page); the Parameters box shows the newest image's infotext (the PNG's own), a click shows
another's, and the recycle button takes its seed; Batch count is sent as A1111's n_iter; a server's refusal opens and
focuses the field it names; the page works again after a failed generation. Driven with Playwright in Debian's
Chromium, as tests/test_server_browser.py drives it (skipped where Chromium is absent).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.server.worker import (Hires, Interrupted, Job, JobCancelled, JobResult, ModelWorker, Progress, QueueFull,
                                   Settings, ShuttingDown)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- a fake pipeline: fast, with gates a test opens --------------------------------------------------------------
class Gate:
    """Holds a generate call at a point until opened: `reached` is set while it waits."""

    def __init__(self):
        self.reached, self.go = threading.Event(), threading.Event()

    def wait_here(self):
        self.reached.set()
        assert self.go.wait(30), "the gate was never opened"

    def open(self):
        self.go.set()


class FakePipe:
    """generate(prompts, ...): one callback per step with a per-image x0 estimate, then an image per seed whose red
    value is the seed. `holds` maps (prompt or seed, step) to a Gate that holds the call before that step's callback
    (step "end": after the last callback, before the images are returned); `fail_on` a prompt that fails the call at
    its end; `totals` the "total" each step reports (a sampler whose step count is an estimate)."""

    def __init__(self, steps_delay: float = 0.0):
        self.calls: list[dict] = []
        self.holds: dict = {}
        self.fail_on: str | None = None
        self.totals: list[int] | None = None
        self.delay = steps_delay
        self.lock = threading.Lock()

    def _hold(self, prompts, seeds, step):
        for key in {*prompts, *seeds}:
            gate = self.holds.get((key, step))
            if gate is not None:
                gate.wait_here()

    def generate(self, prompts, negatives=None, *, seeds, steps, callback=None, hires_pass_steps=None, **kw):
        call = {"prompts": list(prompts), "seeds": list(seeds), "steps_run": 0}
        with self.lock:
            self.calls.append(call)
        passes = [(False, steps)] + ([(True, hires_pass_steps)] if hires_pass_steps else [])
        for hires, n in passes:
            for i in range(n):
                self._hold(prompts, seeds, i)
                if self.delay:
                    time.sleep(self.delay)
                x0 = torch.full((len(prompts), 3, 4, 4), -1.0 + i / max(1, n))
                total = self.totals[i] if self.totals and not hires else n
                info = {"step": i, "total": total, "denoised": x0, **({"hires_pass": True} if hires else {})}
                callback(info)
                call["steps_run"] += 1
        self._hold(prompts, seeds, "end")
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise RuntimeError(f"test failure for a prompt with {self.fail_on!r}")
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), (s % 256, 0, 0)) for s in seeds],
                               parameters={"steps": steps})

    def generate_hires(self, prompts, negatives=None, *, hires_steps=None, steps, **kw):
        kw.pop("hires_scale", None)
        return self.generate(prompts, negatives, steps=steps, hires_pass_steps=hires_steps or steps,
                             **{k: v for k, v in kw.items() if not k.startswith("hires")})

    def decode(self, x):
        return x[:, :3]

    def ran(self, prompt: str) -> bool:
        return any(prompt in c["prompts"] for c in self.calls)


SETTINGS = Settings(height=4, width=4, steps=4, sampler="euler", guidance_scale=3.0)


def job(prompt: str, n: int = 1, seed: int = 1, settings: Settings = SETTINGS, **kw) -> Job:
    return Job(prompts=[prompt] * n, negative_prompts=[""] * n, seeds=list(range(seed, seed + n)), settings=settings,
               **kw)


def queued_then_started(worker: ModelWorker, jobs: list[Job]) -> list[Future]:
    """The jobs all waiting before the worker starts: it takes them in one batch (same settings)."""
    futures = [worker.submit(j) for j in jobs]
    worker.start()
    return futures


def _fraction(p: Progress) -> float:
    """/sdapi/v1/progress's number (imagine/server/app.py): the chunk's passes, each a share of the batch."""
    passes = max(1, p.passes)
    return (p.chunk * passes + int(p.hires_pass) + p.step / p.steps) / max(1, p.chunks * passes)


# -- the worker ------------------------------------------------------------------------------------------------
def test_progress_is_published_whole_and_never_goes_back():
    """Every step publishes a new Progress and no published one changes afterwards (a reader that took one sees one
    step's numbers: the old worker changed chunk, then step, ... in place, so a poll between two of them read 1.0 at a
    chunk's start, or a hires pass's first step as the first pass's); its fraction stays in 0..1 and never goes back,
    over chunks, a hires pass, and a step count that is an estimate which grows (DPM adaptive's)."""
    pipe = FakePipe()
    pipe.totals = [10, 10, 30, 30, 12, 8, 6, 6]
    worker = ModelWorker(pipe, max_batch=2)
    seen, stop = [], threading.Event()

    def record(*a, **kw):  # (the worker's view at each callback and at each chunk's start)
        p = worker.progress
        seen.append((p, (p.chunk, p.step, p.steps, p.hires_pass, p.version)))

    real = pipe.generate

    def generate(prompts, negatives=None, *, callback, **kw):
        record()

        def cb(d):
            callback(d)
            record()

        return real(prompts, negatives, callback=cb, **kw)

    pipe.generate = generate
    polled = []

    def poll():  # (a reader on another thread, as /sdapi/v1/progress is)
        while not stop.is_set():
            p = worker.progress
            if p.steps:
                polled.append((p.started, _fraction(p)))

    settings = Settings(height=4, width=4, steps=8, sampler="euler", guidance_scale=3.0,
                        hires=Hires(2.0, 0.5, 3, "latent", None, None))
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        result = queued_then_started(worker, [job("a", n=3, settings=settings)])[0].result(30)
    finally:
        stop.set()
        reader.join()
        worker.stop()
    assert len(result.images) == 3
    objects = [p for p, _ in seen]
    assert all(p.steps > 0 for p in objects)
    assert all((p.chunk, p.step, p.steps, p.hires_pass, p.version) == fields for p, fields in seen), \
        "a published Progress was changed afterwards"
    steps = [p for p, f in seen if f[1] > 0]
    assert len({id(p) for p in steps}) == len(steps)  # (one object per step)
    fractions = [_fraction(p) for p in objects]
    assert all(0 <= f <= 1 for f in fractions) and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions
    assert all(p.step <= p.steps for p in objects)
    # (the poller's numbers, batch by batch: never back, never past 1)
    by_batch = {}
    for started, f in polled:
        by_batch.setdefault(started, []).append(f)
    for values in by_batch.values():
        assert all(0 <= f <= 1 for f in values) and all(b >= a for a, b in zip(values, values[1:])), values


def test_a_cancelled_running_job_stops_and_its_batch_goes_on():
    """A job whose client left while it runs: alone, its round stops at the next step and its later rounds (n_iter
    chunks) never start, and no unwanted image is decoded; in a batch with another request's job, the batch runs on
    and the other gets its images."""
    pipe = FakePipe()
    held = Gate()
    pipe.holds[(1, 1)] = held
    decoded = []
    pipe.decode = lambda x: decoded.append(len(x)) or x[:, :3]
    worker = ModelWorker(pipe, max_batch=1)
    rounds = job("rounds", n=3, seed=1)  # (3 images, max_batch 1: three chunks, A1111's n_iter rounds)
    try:
        (f,) = queued_then_started(worker, [rounds])
        assert held.reached.wait(30)
        assert worker.cancel(rounds) == "running"
        held.open()
        with pytest.raises(JobCancelled, match="while the job ran"):
            f.result(30)
    finally:
        held.open()
        worker.stop()
    assert [c["seeds"] for c in pipe.calls] == [[1]] and pipe.calls[0]["steps_run"] == 1 and not decoded
    assert worker.stats["cancelled"] == 1 and worker.stats["interrupted"] == 0  # (a cancel is not an interrupt)

    pipe = FakePipe()
    held = Gate()
    pipe.holds[("leaving", 1)] = held
    worker = ModelWorker(pipe, max_batch=8)
    leaving, staying = job("leaving", seed=5), job("staying", seed=6)
    try:
        fl, fs = queued_then_started(worker, [leaving, staying])
        assert held.reached.wait(30)
        assert worker.cancel(leaving) == "running"
        held.open()
        assert fs.result(30).seeds == [6] and not fs.result().interrupted
        with pytest.raises(JobCancelled):
            fl.result(30)
    finally:
        held.open()
        worker.stop()
    assert pipe.calls[0]["prompts"] == ["leaving", "staying"] and pipe.calls[0]["steps_run"] == SETTINGS.steps


def test_a_job_cancelled_while_it_waits_never_runs_and_frees_its_slot():
    pipe = FakePipe()
    worker = ModelWorker(pipe, queue_size=2, max_batch=8)
    waiting = [job("w1"), job("w2", settings=Settings(height=8, width=8, steps=2, sampler="euler",
                                                        guidance_scale=3.0))]
    futures = [worker.submit(j) for j in waiting]
    with pytest.raises(QueueFull) as e:
        worker.submit(job("w3"))
    assert e.value.retry_after >= 1 and worker.stats["rejected"] == 1
    assert worker.cancel(waiting[0]) == "queued" and worker.cancel(waiting[0]) == "cancelled"
    third = worker.submit(job("w3", seed=30))  # (the cancelled job's slot)
    worker.start()
    try:
        with pytest.raises(JobCancelled, match="before the job ran"):
            futures[0].result(30)
        assert futures[1].result(30).seeds == [1] and third.result(30).seeds == [30]
    finally:
        worker.stop()
    assert not pipe.ran("w1")


def test_an_interrupt_between_rounds_starts_no_new_round():
    """An interrupt after one round's last step (a job of n_iter rounds, one chunk each): the finished round keeps
    its images, the next round never starts and adds nothing (A1111 runs no round the interrupt came before; the
    worker ran it to its first step and answered a grey placeholder for it)."""
    pipe = FakePipe()
    gate = Gate()
    pipe.holds[(1, "end")] = gate
    worker = ModelWorker(pipe, max_batch=1)
    try:
        (f,) = queued_then_started(worker, [job("rounds", n=2, seed=1)])
        assert gate.reached.wait(30)
        assert worker.interrupt() is True
        gate.open()
        r = f.result(30)
    finally:
        gate.open()
        worker.stop()
    assert r.interrupted and r.seeds == [1] and r.images[0].getpixel((0, 0)) == (1, 0, 0)
    assert [c["seeds"] for c in pipe.calls] == [[1]]


def test_an_interrupted_chunk_returns_the_steps_estimates():
    """An interrupt during a step: the images are that step's x0 estimates (kept before the callback stops the
    sampler), as A1111 returns the unfinished images."""
    pipe = FakePipe()
    gate = Gate()
    pipe.holds[("x", 2)] = gate
    worker = ModelWorker(pipe, max_batch=8)
    try:
        (f,) = queued_then_started(worker, [job("x", n=2)])
        assert gate.reached.wait(30)
        worker.interrupt()
        gate.open()
        r = f.result(30)
    finally:
        gate.open()
        worker.stop()
    assert r.interrupted and len(r.images) == 2
    # (step 2 of 4: x0 = -1 + 2/4 = -0.5, decoded: 127.5 * 0.5 = 63.75, 64)
    assert r.images[0].getpixel((0, 0)) == (64, 64, 64)


def test_a_failed_batch_reruns_the_jobs_not_answered_one_by_one():
    """A batch that fails: its jobs run alone, the failing one gets its error and the others their images; a job
    cancelled meanwhile is answered JobCancelled, not run again (the worker ran it again, alone)."""
    pipe = FakePipe()
    pipe.fail_on = "boom"
    gate = Gate()
    pipe.holds[("boom", 1)] = gate
    worker = ModelWorker(pipe, max_batch=8)
    jobs = [job("boom", seed=5), job("leaving", seed=6), job("staying", seed=7)]
    try:
        fboom, fleaving, fstaying = queued_then_started(worker, jobs)
        assert gate.reached.wait(30)
        worker.cancel(jobs[1])
        gate.open()
        with pytest.raises(JobCancelled):
            fleaving.result(30)
        with pytest.raises(RuntimeError, match="boom"):
            fboom.result(30)
        assert fstaying.result(30).seeds == [7]
    finally:
        gate.open()
        worker.stop()
    assert [c["prompts"] for c in pipe.calls] == [["boom", "leaving", "staying"], ["boom"], ["staying"]]


class _Fatal(BaseException):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_thread_that_dies_refuses_jobs_instead_of_stranding_them():
    """A BaseException (not an Exception) ends the worker thread: the batch's jobs and the waiting ones are answered,
    and a new job is refused (503) rather than queued for a thread that will never take it."""
    pipe = FakePipe()

    def fatal(*a, **kw):
        raise _Fatal("the end")

    pipe.generate = fatal
    worker = ModelWorker(pipe, max_batch=8)
    other = Settings(height=8, width=8, steps=2, sampler="euler", guidance_scale=3.0)
    running, waiting = queued_then_started(worker, [job("a"), job("b", settings=other)])
    with pytest.raises(RuntimeError, match="_Fatal"):
        running.result(30)
    with pytest.raises(ShuttingDown):
        waiting.result(30)
    with pytest.raises(ShuttingDown):
        worker.submit(job("c"))
    worker.stop()


def test_a_jobs_preview_is_its_own_image_never_anothers():
    """preview_row(job): the job's first image in the running chunk; None where its images are in another chunk or it
    is not in the batch (the old worker gave the chunk's first row: another request's picture, for a batch that
    _run_batch is handed with jobs across chunks; _take_batch makes none today); without a job id, the chunk's
    first."""
    x0 = torch.zeros(2, 4, 2, 2)
    # a batch of: "a" (images 0-1), "b" (2-4), "c" (5); chunks of 2: this is the second chunk, images 2-3
    p = Progress(job_ids=["a", "b", "c"], spans={"a": (0, 2), "b": (2, 5), "c": (5, 6)}, chunk=1, chunks=3,
                 chunk_start=2, steps=4, step=1, denoised=x0)
    worker = ModelWorker(FakePipe())
    worker.progress = p
    assert worker.preview_row("b") == 0 and worker.preview_row(None) == 0
    assert worker.preview_row("a") is None and worker.preview_row("c") is None and worker.preview_row("x") is None
    worker.progress = Progress(**{**p.__dict__, "chunk": 2, "chunk_start": 4})
    assert worker.preview_row("b") == 0 and worker.preview_row("c") == 1 and worker.preview("a") is None
    assert worker.preview("c").size == (2, 2)


def test_submit_cancel_interrupt_and_skip_from_many_threads():
    """Clients submit, cancel, interrupt and skip at random against a running worker: every accepted job is answered
    (images, JobCancelled or Interrupted), a job cancelled while it waited never ran, a finished job has its images
    for its seeds, the counters add up, and nothing is left running or waiting."""
    pipe = FakePipe(steps_delay=0.002)
    worker = ModelWorker(pipe, queue_size=6, max_batch=3).start()
    lock = threading.Lock()
    submitted, never_ran, refused = [], [], [0]
    sizes = [Settings(height=4, width=4, steps=3, sampler="euler", guidance_scale=3.0),
             Settings(height=8, width=8, steps=2, sampler="euler", guidance_scale=3.0)]

    def client(k: int):
        r = random.Random(k)
        for i in range(25):
            j = job(f"job-{k}-{i}", n=r.choice([1, 1, 2, 4]), seed=1000 * k + 10 * i, settings=r.choice(sizes))
            try:
                f = worker.submit(j)
            except QueueFull:
                refused[0] += 1
                time.sleep(0.005)
                continue
            with lock:
                submitted.append((j, f))
            action = r.random()
            time.sleep(r.random() * 0.01)
            if action < 0.25:
                if worker.cancel(j) == "queued":
                    with lock:
                        never_ran.append(j)
            elif action < 0.3:
                worker.interrupt()
            elif action < 0.35:
                worker.skip()
            elif action < 0.4:
                worker.interrupt(j.id)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    outcomes = {"images": 0, "cancelled": 0, "interrupted": 0}
    for j, f in submitted:
        try:
            r = f.result(60)
        except JobCancelled:
            outcomes["cancelled"] += 1
            continue
        except Interrupted:
            outcomes["interrupted"] += 1
            continue
        outcomes["images"] += 1
        assert isinstance(r, JobResult) and 0 < len(r.images) <= len(j) and r.seeds == j.seeds[:len(r.images)]
        if not r.interrupted and not r.skipped:
            assert len(r.images) == len(j) and [im.getpixel((0, 0))[0] for im in r.images] == [s % 256 for s in j.seeds]
    assert _wait(lambda: not worker.running() and not worker.queued())
    worker.stop()
    assert not any(pipe.ran(j.prompts[0]) for j in never_ran)
    st = worker.stats
    assert st["accepted"] == len(submitted) and st["rejected"] == refused[0]
    assert st["completed"] == outcomes["images"] and st["cancelled"] == outcomes["cancelled"]
    assert st["failed"] == outcomes["interrupted"]
    assert sum(outcomes.values()) == len(submitted) and outcomes["images"] > 0 and outcomes["cancelled"] > 0


def test_nothing_is_kept_for_a_finished_job():
    """Once answered and dropped by its request, a job (its pictures) and its result (its images) are freed, the last
    batch's too: the idle worker thread held its last batch until the next job came."""
    import gc
    import weakref

    worker = ModelWorker(FakePipe(), max_batch=3).start()
    refs = []
    try:
        for i in range(30):
            j = job(f"p{i}", n=1 + i % 3, seed=i, settings=SETTINGS if i % 2 else Settings(
                height=8, width=8, steps=2, sampler="euler", guidance_scale=3.0))
            f = worker.submit(j)
            if i % 5 == 0:
                worker.cancel(j)
            with contextlib.suppress(JobCancelled):
                refs.append(weakref.ref(f.result(30)))
            refs.append(weakref.ref(j))
            del j, f
        assert _wait(lambda: not worker.running())
        gc.collect()
        assert [r() for r in refs if r() is not None] == []
    finally:
        worker.stop()


def _wait(cond, timeout: float = 30.0) -> bool:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


# -- batching never changes a job's images (the tiny model) -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    testing = pytest.importorskip("imagine.testing")
    from imagine.pipelines.text_to_image import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(testing.make_tiny_model(tmp_path_factory.mktemp("tiny")))


def _a1111(sampler: str, **kw) -> dict:
    from imagine.samplers import a1111_settings

    a = a1111_settings(sampler)
    return dict(sampler=a["sampler"], schedule=a.get("sigma_schedule"), sigma_range=a.get("sigma_range", "spaced"),
                start=a.get("start", "noise"), discard_penultimate_sigma=a.get("discard_penultimate_sigma", False),
                strength_rule="a1111", **kw)


def _picture(k: int) -> Image.Image:
    return Image.fromarray((np.indices((32, 32)).sum(0) * (k + 3) % 256).astype(np.uint8)).convert("RGB")


def _mask(box) -> Image.Image:
    m = Image.new("L", (32, 32))
    m.paste(255, box)
    return m


def _jobs(prompts_seeds, **per_image) -> list[dict]:
    out = []
    for k, (prompt, seeds) in enumerate(prompts_seeds):
        spec = {"prompts": [prompt] * len(seeds), "negative_prompts": ["blurry" if k else ""] * len(seeds),
                "seeds": seeds}
        for key, make in per_image.items():
            spec[key] = [make(k, i) for i in range(len(seeds))]
        out.append(spec)
    return out


BATCH_CASES = {
    "Euler a": (_jobs([("a red circle", [1, 2]), ("two blue squares", [3])]), _a1111("Euler a")),
    "DPM++ SDE (Brownian trees)": (_jobs([("a red circle", [1]), ("blue", [2, 3])]), _a1111("DPM++ SDE")),
    "DDIM eta, NV noise, ENSD": (_jobs([("red", [4]), ("blue", [5])]),
                                 _a1111("DDIM", eta=0.6, rng="nv", noise_seed_delta=31337)),
    "variation seeds, seed resize": (_jobs([("red", [1, 1]), ("blue", [2])], subseeds=lambda k, i: 40 + 3 * k + i),
                                     _a1111("Euler a", subseed_strength=0.3, seed_resize=(24, 40))),
    "A1111 prompt syntax": (_jobs([("a [red:blue:0.5] (circle:1.3) AND square :0.5", [1]), ("plain", [2])]),
                            _a1111("Euler a", emphasis=True, long_prompts=True, prompt_editing=True,
                                   composable=True)),
    "image to image": (_jobs([("red", [1]), ("blue", [2, 3])], init_images=lambda k, i: _picture(k + i)),
                       _a1111("Euler", strength=0.6)),
    "inpainting": (_jobs([("red", [1]), ("blue", [2])], init_images=lambda k, i: _picture(k),
                         masks=lambda k, i: _mask((4 + 8 * k, 4, 20 + 8 * k, 28))),
                   _a1111("Euler a", strength=0.8, inpainting=True)),
    "hires. fix with its own prompt": (_jobs([("red", [1]), ("blue", [2])]),
                                       _a1111("DPM++ 2M", hires=Hires(1.5, 0.5, 2, "latent", "a blue square", None))),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batched_jobs_get_the_images_they_get_alone(tiny_pipe, case):
    """Each job run alone, an image at a time (max_batch 1: a chunk per image), then all of them waiting together
    (one batch: one forward pass over their images): every image within one 8-bit level of its image alone
    (docs/serving.md: the batch's matrix products may sum in another order; here they are equal)."""
    specs, fields = BATCH_CASES[case]
    settings = Settings(height=32, width=32, steps=3, guidance_scale=5.0, **fields)
    alone = []
    worker = ModelWorker(tiny_pipe, max_batch=1).start()
    try:
        for spec in specs:
            alone.append(worker.submit(Job(settings=settings, **spec)).result(120))
    finally:
        worker.stop()
    worker = ModelWorker(tiny_pipe, max_batch=8)
    try:
        together = [f.result(120) for f in queued_then_started(worker, [Job(settings=settings, **s) for s in specs])]
    finally:
        worker.stop()
    assert worker.stats["batches"] == 1 and all(r.batch_images == sum(len(s["seeds"]) for s in specs)
                                                for r in together)
    for spec, a, b in zip(specs, alone, together):
        assert a.seeds == b.seeds == spec["seeds"] and len(b.images) == len(spec["seeds"])
        for x, y in zip(a.images, b.images):
            diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()
            assert diff <= 1, f"{case}: a batched image differs from its image alone by {diff} levels"


# -- through the server: the A1111 progress of one task never goes back ------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_pipe):
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    pipe = FailingPipe(tiny_pipe)
    app = create_app(pipe, ServerConfig(max_width=256, max_height=256, max_batch=1))  # (n_iter rounds: chunks)
    with BackgroundServer(app) as srv:
        srv.pipe, srv.worker = pipe, app.state.worker
        yield srv


class FailingPipe:
    """The real pipeline; a prompt containing `fail_on` makes generate raise; `delay` seconds a step."""

    def __init__(self, pipe):
        self.pipe, self.fail_on, self.delay = pipe, None, 0.0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _slowed(self, kw):
        inner, delay = kw.get("callback"), self.delay
        if inner is not None and delay:
            kw["callback"] = lambda d: (time.sleep(delay), inner(d))

    def generate(self, prompts, negative_prompt=None, **kw):
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise RuntimeError(f"the model failed on {self.fail_on!r}")
        self._slowed(kw)
        return self.pipe.generate(prompts, negative_prompt, **kw)

    def generate_hires(self, prompts, negative_prompt=None, **kw):
        self._slowed(kw)
        return self.pipe.generate_hires(prompts, negative_prompt, **kw)


def test_a_tasks_progress_stays_in_0_1_and_never_goes_back(server):
    """/sdapi/v1/progress?id_task= polled as fast as it answers through a request of three chunks (n_iter 3) with a
    hires. fix: every number in 0..1, never lower than the one before, while the task runs."""
    import httpx

    server.pipe.delay = 0.02
    body = {"prompt": "a red circle", "steps": 6, "width": 16, "height": 16, "seed": 3, "sampler_name": "Euler",
            "batch_size": 1, "n_iter": 3, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5,
            "force_task_id": "watched"}
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(
        r=httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)))
    seen = []
    try:
        thread.start()
        with httpx.Client(timeout=30) as client:
            while thread.is_alive():
                p = client.get(f"{server.url}/sdapi/v1/progress", params={"id_task": "watched",
                                                                          "skip_current_image": True}).json()
                if "watched" in p["state"]["job"].split(","):
                    seen.append(p["progress"])
        thread.join()
    finally:
        server.pipe.delay = 0.0
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 3
    assert len(seen) > 10 and all(0 <= v <= 1 for v in seen)
    drops = [(i, a, b) for i, (a, b) in enumerate(zip(seen, seen[1:])) if b < a]
    assert not drops, (drops, seen)


# -- the page ------------------------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 800})
        finally:
            browser.close()


def _open(page, server, **fields) -> None:
    page.goto(server.url + "/")
    page.wait_for_function("document.body.dataset.ready === '1'")
    for k, v in {"steps": 2, "width": 16, "height": 16, **fields}.items():
        page.fill(f"#{k}", str(v))


def _api_png(server, **body) -> bytes:
    import httpx

    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"steps": 3, "width": 16, "height": 16, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["images"][0])


def _drop(page, selector: str, data: bytes, name: str, kind: str) -> list[bool]:
    """A file dropped on `selector` as a person drops one (dragover, then drop): whether each was default-prevented
    (not prevented, the browser leaves the page to show the file)."""
    transfer = page.evaluate_handle("""([b64, name, kind]) => {
        const bin = atob(b64), a = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
        const t = new DataTransfer();
        t.items.add(new File([a], name, { type: kind }));
        return t;
    }""", [base64.b64encode(data).decode(), name, kind])
    return page.evaluate("""([selector, t]) => ['dragover', 'drop'].map((type) => {
        const e = new DragEvent(type, { dataTransfer: t, bubbles: true, cancelable: true });
        document.querySelector(selector).dispatchEvent(e);
        return e.defaultPrevented;
    })""", [selector, transfer])


def _card_png(card) -> bytes:
    return base64.b64decode(card.query_selector("a.download").get_attribute("href").split(",", 1)[1])


def test_a_picture_dropped_on_the_page_fills_the_form(server, page):
    """A1111's PNG Info and ComfyUI's canvas read a dropped picture; the page did nothing with one, so the browser
    left it to show the file. Dropped on the prompt box: its parameters fill the form and Generate makes it again;
    dropped on "Start from a picture" it is that picture; a file that is not a picture says so."""
    made = _api_png(server, prompt="a dropped circle", seed=91, sampler_name="Euler a", cfg_scale=4)
    _open(page, server)
    page.fill("#prompt", "something else")
    assert _drop(page, "#prompt", made, "made.png", "image/png") == [True, True]
    page.wait_for_function("document.querySelector('#prompt').value === 'a dropped circle'")
    assert page.input_value("#seed") == "91" and page.input_value("#sampler") == "Euler a"
    assert "Seed: 91" in page.inner_text("#pnginfo_text")
    page.click("#generate")
    card = page.wait_for_selector(".gallery .card", timeout=60_000)
    got = Image.open(io.BytesIO(_card_png(card))).convert("RGB").tobytes()
    assert got == Image.open(io.BytesIO(made)).convert("RGB").tobytes()

    page.click("#img2img summary")
    assert _drop(page, "#init_image", made, "start.png", "image/png") == [True, True]
    assert page.eval_on_selector("#init_image", "e => e.files.length") == 1 and page.is_visible("#init_image_clear")
    page.click("#init_image_clear")
    _drop(page, "#negative_prompt", b"not a picture", "notes.txt", "text/plain")
    assert "Drop a picture" in page.inner_text("#error") and page.url.rstrip("/") == server.url


def test_the_newest_images_infotext_is_shown_and_its_seed_reused(server, page):
    """The Parameters box shows the first image of the newest batch's infotext, the text its PNG carries (A1111's
    generation info); clicking another image shows that one's, and the recycle button puts its seed in the form. A
    batch's images are in their order, seed first."""
    _open(page, server, prompt="two squares", seed=500, batch_size=2)
    assert page.is_hidden("#info") and page.is_disabled("#reuse-seed")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.gallery .card').length === 2", timeout=60_000)
    cards = page.query_selector_all(".gallery .card")
    assert [c.get_attribute("data-seed") for c in cards] == ["500", "501"]
    texts = [Image.open(io.BytesIO(_card_png(c))).info["parameters"] for c in cards]
    assert page.inner_text("#infotext") == texts[0] and "Seed: 500" in texts[0]
    cards[1].query_selector("img.image").click()
    assert page.inner_text("#infotext") == texts[1] and "Seed: 501" in texts[1]
    page.fill("#seed", "-1")
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "501"
    page.click("#clear")
    assert page.is_hidden("#info") and page.is_disabled("#reuse-seed")


def test_batch_count_is_sent_as_n_iter(server, page):
    """A1111's Batch count (n_iter) beside Batch size: 3 rounds of 1 image give seeds s, s+1, s+2; more images than
    the server makes a request is refused on the page, naming the field."""
    _open(page, server, prompt="a red circle", seed=40, n_iter=3)
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.gallery .card').length === 3", timeout=60_000)
    assert page.eval_on_selector_all(".gallery .card", "cs => cs.map(c => c.dataset.seed)") == ["40", "41", "42"]
    limit = json.loads(page.evaluate("fetch('/imagine/v1/config').then(r => r.text())"))["limits"]["max_images"]
    page.fill("#n_iter", str(limit))
    page.fill("#batch_size", "2")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "Batch count × batch size" in page.inner_text("#error")
    assert page.evaluate("document.activeElement.id") == "n_iter"


def test_a_server_refusal_opens_and_focuses_its_field(server, page):
    """A 422 names its field: the page opens its folded section and focuses it (as its own checks do), and the next
    Generate, the field fixed, works."""
    _open(page, server, prompt="a red circle", seed=1)
    page.click("#hires summary")
    page.fill("#hr_resize_x", "2048")  # (past the server's size limit: only the server knows it)
    page.click("#hires summary")  # (folded again)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "hr_resize_x" in page.inner_text("#error") or "256" in page.inner_text("#error")
    assert page.eval_on_selector("#hires", "d => d.open") and page.evaluate("document.activeElement.id") == "hr_resize_x"
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt") and page.is_hidden("#progress")
    page.fill("#hr_resize_x", "0")
    page.click("#generate")
    page.wait_for_selector(".gallery .card", timeout=60_000)
    assert page.is_hidden("#error")


def test_the_page_works_again_after_a_failed_generation(server, page):
    """The model failing on a request: the server's message in the error box, the form free again (Generate on,
    Interrupt off, no progress), and the next request makes its image."""
    _open(page, server, prompt="this one breaks", seed=2)
    server.pipe.fail_on = "breaks"
    try:
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    finally:
        server.pipe.fail_on = None
    assert "the model failed on 'breaks'" in page.inner_text("#error")
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt") and page.is_hidden("#progress")
    assert page.inner_text("#generate") == "Generate"
    page.fill("#prompt", "this one works")
    page.click("#generate")
    page.wait_for_selector(".gallery .card", timeout=60_000)
    assert page.is_hidden("#error")


def test_the_hires_notice_follows_the_resize_fields(server, page, tmp_path):
    """With a picture to start from, the notice that hires. fix is not applied shows for "Resize width to" too (it
    followed the scale only)."""
    _picture(0).save(tmp_path / "start.png")
    _open(page, server, prompt="x")
    page.click("#img2img summary")
    page.set_input_files("#init_image", str(tmp_path / "start.png"))
    assert page.is_hidden("#hires_ignored")
    page.click("#hires summary")
    page.fill("#hr_resize_x", "64")
    assert page.is_visible("#hires_ignored")
    page.fill("#hr_resize_x", "0")
    assert page.is_hidden("#hires_ignored")
