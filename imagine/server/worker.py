"""The model worker: one thread owns the pipeline and takes jobs from a bounded queue.

One thread, because a CPU has one set of cores to give and two forward passes side by side
only share them; what raises throughput is a bigger batch. So the worker takes the oldest
job and, with it, every queued job that can share its forward passes (same size, steps,
sampler, scheduler and guidance scale, and the same ControlNet units and weights; each job
keeps its own control pictures): their prompts are concatenated into one `pipe.generate` call. Every image keeps its own seed, and the pipeline draws each sample's
noise from its own generator, so a job's images are those it would get alone.

Nothing accepted is dropped: a job's future always ends with its result or an exception
(`QueueFull` is raised at submission, before anything is accepted). A job is answered as soon as its own images are
made, while the batch's later chunks run on for the others; a job cancelled while it waits never runs, and a chunk
whose jobs are all cancelled is not sampled.

Threads: request handlers call submit, cancel, interrupt, skip and the queries; the worker thread runs the batches.
The queue, the running list and every job's state and answer change under one lock (`_cv`). `progress` is published
whole (a new `Progress` at each step, never changed after), so a reader sees one step's numbers, never half of two.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from imagine.samplers import couples_batch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; try again after `retry_after` seconds."""

    def __init__(self, size: int, retry_after: int):
        super().__init__(f"the queue is full ({size} jobs waiting); retry after {retry_after} s")
        self.size = size
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job was cancelled (its client went away) before it produced images."""


class ShuttingDown(Exception):
    """The server stopped before the job ran."""


class Interrupted(Exception):
    """An interrupt came before the job's first image was started."""


class _Interrupted(Exception):
    # raised from the sampler callback: the sampler loop stops at the current step
    pass


class _Skipped(_Interrupted):
    # raised from the sampler callback on a skip: the chunk stops at the current step, the batch goes on
    pass


class _ChunkCancelled(_Interrupted):
    # raised from the sampler callback when every job with images in the running chunk is cancelled: its images are
    # not wanted, the batch goes on with its next chunk
    pass


class Hires(NamedTuple):
    """A job's A1111 hires. fix (Settings.hires): TextToImagePipeline.generate_hires's options."""

    scale: float  # hr_scale (the infotext's "Hires upscale" when no size is asked)
    strength: float  # the second pass's denoising strength
    steps: int | None  # its steps (None: the first pass's)
    upscaler: str  # a key of text_to_image.HIRES_UPSCALERS
    prompt: str | None  # the second pass's texts (None: the first pass's)
    negative_prompt: str | None
    resize: tuple | None = None  # A1111's (hr_resize_x, hr_resize_y) when asked (its infotext's "Hires resize")
    control_modes: tuple | None = None  # the second pass's ControlNet mode per unit (None: the first pass's)


@dataclass(frozen=True)
class Settings:
    """What jobs must share to run in one forward pass."""

    height: int
    width: int
    steps: int
    sampler: str
    guidance_scale: float
    schedule: str | None = None  # noise-level spacing (imagine.schedules.SIGMA_SCHEDULES); None: the model's
    sigma_range: str = "spaced"  # what the schedule spans (NoiseSchedule.plan): "model" for AUTOMATIC1111's API
    start: str = "noise"  # the start sample (imagine.sampling.sample): "sigma_max" for AUTOMATIC1111's API
    discard_penultimate_sigma: bool = False  # A1111's DPM2, DPM2 a, DPM++ 3M SDE (samplers.a1111_settings)
    strength_rule: str = "diffusers"  # which steps image to image takes (imagine.sampling.sample): A1111's for its API
    eta: float | None = None  # the sampler's noise scale (None: its default)
    options: tuple = ()  # the sampler's own options as sorted (name, value) pairs, e.g. (("s_tmin", 1.5),)
    # AUTOMATIC1111's (word:1.3) syntax read as weights (its API's default, True; or its "No norm" / "Ignore" mode)
    emphasis: bool | str = False
    long_prompts: bool = False  # prompts past the text encoder's window read in 75-token chunks (imagine.long_prompts)
    prompt_editing: bool = False  # A1111's [from:to:when] and [a|b] read (imagine.prompt_editing)
    composable: bool = False  # A1111's AND read (imagine.composable)
    strength: float | None = None  # image to image: how far from the jobs' init images (None: text to image)
    inpainting: bool = False  # the jobs carry masks (white: paint anew), one per image
    masked_content: str = "original"  # inpainting's start where painted anew (TextToImagePipeline.generate)
    loras: tuple = ()  # the --lora-dir LoRAs the prompts ask for (the pipeline merges them): one set per batch
    hires: Hires | None = None  # A1111's hires. fix
    # its second pass's own sampling (A1111's hires sampler / schedule type): generate's sampling keywords as sorted
    # (name, value) pairs, the sampler's options among them as pairs (None: the first pass's)
    hires_sampling: tuple | None = None

    @property
    def couples_batch(self) -> bool:
        """Whether a pass's sampler makes an image depend on its batch (samplers.couples_batch: DPM adaptive)."""
        return couples_batch(self.sampler) or bool(self.hires_sampling and
                                                   couples_batch(dict(self.hires_sampling)["sampler"]))
    # ControlNet units (A1111's ControlNet extension): ((name of a loaded ControlNet, weight, guidance start, end),
    # ...) in order. Jobs batch only with the same units; each brings its own pictures (Job.control_images)
    controlnets: tuple = ()
    subseed_strength: float = 0.0  # A1111's variation seeds (Job.subseeds), their strength
    image_guidance_scale: float | None = None  # an instruct-pix2pix model's guidance on the picture
    refiner_switch: float | None = None  # SDXL's refiner (the pipeline's, `serve --refiner`) after this fraction of steps
    refiner_switch_by_steps: bool = False  # ... of the sampler's model calls (A1111's refiner_switch_by_sample_steps)
    resize_mode: str = "just_resize"  # image to image: how the pictures are brought to the size (imagine.images)
    encoded_at: tuple | None = None  # its latent upscale: the size the pictures are encoded at (jobs share it to batch)
    noise_level: int | None = None  # an unCLIP decoder's variations of the jobs' pictures (TextToImagePipeline.variations)
    seed_resize: tuple | None = None  # A1111's seed_resize_from_h / _w, (h, w) in pixels, both > 0 (None: off)
    rng: str = "cpu"  # where the seeds' noise comes from (TextToImagePipeline.generate): "nv" for A1111's "NV"
    noise_seed_delta: int = 0  # A1111's eta noise seed delta (ENSD)
    zero_terminal_snr: bool = False  # A1111's "Zero Terminal SNR" noise schedule (its sd_noise_schedule)
    downcast_alphas_cumprod: bool = False  # A1111's "Downcast alphas_cumprod" (its use_downcasted_alpha_bar)
    old_prompt_editing: bool = False  # A1111's "Old prompt editing timelines" (its use_old_scheduling)
    pad_conds: str | None = None  # A1111's "Pad prompt/negative prompt" options (generate's pad_conds)
    # the text encoder's clip_skip for the job (A1111's CLIP_stop_at_last_layers - 1; ModelWorker._using_clip_skip):
    # jobs batch only with the same; None: the encoder's as loaded
    clip_skip: int | None = None


@dataclass(eq=False)
class Job:
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    settings: Settings
    init_images: list | None = None  # image to image: a PIL image per prompt
    masks: list | None = None  # inpainting (with init_images and settings.inpainting): a PIL mask per prompt
    control_images: list | None = None  # per unit of settings.controlnets: a list of one PIL picture per prompt
    hires_control_images: list | None = None  # the same for a hires. fix's second pass (None: control_images)
    subseeds: list[int] | None = None  # A1111's variation seeds, one per image (with settings.subseed_strength)
    # the seeds of masked content "latent noise"'s fill, one per image (A1111's: the first n_iter round's)
    latent_noise_seeds: list[int] | None = None
    # images per sampling batch where the sampler couples a batch's images (DPM adaptive): A1111's batch_size, each
    # n_iter round its own batch (None: the worker's max_batch)
    batch_size: int | None = None
    # a job that runs its own work on the pipeline, alone (a ComfyUI graph): call(pipe, run) -> its answer, `run` a
    # GraphRun (its steps' callback, its passes, the clip skip); the prompts and seeds are then for listings only
    call: Callable[[Any, "GraphRun"], Any] | None = None
    # where it queues (ComfyUI's prompt number: the queue runs the lowest first, `front` ones negative, so next); None
    # (the other jobs): in order of arrival, as number 0
    priority: float | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    state: str = "queued"  # queued -> running -> done | cancelled
    cancelled: bool = False
    submitted: float = field(default_factory=time.time)
    started: float | None = None

    def __post_init__(self):
        if not (len(self.prompts) == len(self.negative_prompts) == len(self.seeds) > 0):
            raise ValueError(f"a job needs as many prompts, negative prompts and seeds, at least one; got "
                             f"{len(self.prompts)}, {len(self.negative_prompts)}, {len(self.seeds)}")
        if self.settings.inpainting != (self.masks is not None) or (self.masks is not None and (
                self.init_images is None or not len(self.masks) == len(self.init_images) == len(self.seeds))):
            raise ValueError("an inpainting job needs settings.inpainting, and one init image and one mask per "
                             "image; any other job neither")
        units = len(self.settings.controlnets)
        for pictures in (self.control_images or [], self.hires_control_images or self.control_images or []):
            if len(pictures) != units or any(len(p) != len(self.seeds) for p in pictures):
                raise ValueError(f"a job with {units} ControlNet units needs one list of control pictures per unit, "
                                 f"one picture per image ({len(self.seeds)}); got {[len(p) for p in pictures]}")

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass
class JobResult:
    images: list  # PIL images, one per seed
    seeds: list[int]
    parameters: dict[str, Any]
    interrupted: bool = False  # True: the images are the x0 estimates at the step the interrupt came
    skipped: bool = False  # True: some of the images are the x0 estimates at the step a skip came (the others ran on)
    seconds: float = 0.0
    batch_images: int = 0  # how many images shared the forward passes (this job's and others')


@dataclass
class Progress:
    """What the worker is doing now, for /sdapi/v1/progress. The worker publishes a new one at each step and never
    changes one it published (`ModelWorker._publish`): read `worker.progress` once and use that object's fields.
    step / steps stays within 0..1 and never goes back within a pass (a sampler whose step count is an estimate,
    DPM adaptive's, has its estimate held where it would make the fraction go back)."""

    job_ids: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # job id -> index of its first image in the batch
    spans: dict[str, tuple] = field(default_factory=dict)  # job id -> (first, end) indices of its images in the batch
    step: int = 0
    steps: int = 0
    chunk: int = 0
    chunks: int = 0
    chunk_start: int = 0  # index (in the batch) of the chunk's first image
    passes: int = 1  # sampling passes per chunk: 2 with hires. fix (its second pass reports "hires_pass")
    hires_pass: bool = False  # the chunk's hires. fix pass runs
    started: float = 0.0
    denoised: torch.Tensor | None = None  # the chunk's latest x0 estimate, for previews
    version: int = 0  # bumps at every step, so previews can be cached per step
    interrupted: bool = False
    skipped: bool = False  # a skip stops the running chunk (A1111's state.skipped, until its next round starts)


class ModelWorker:
    """Owns `pipe`; `submit(job)` queues, the thread runs batches, `future` gets the result."""

    def __init__(self, pipe, *, queue_size: int = 16, max_batch: int = 8):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1; got {queue_size}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self.pipe = pipe
        self.queue_size = int(queue_size)
        self.max_batch = int(max_batch)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        # ids of recently answered jobs (the newest 512), recorded as each future is set, before the job leaves
        # the running list: a poll of progress?id_task= never falls between "running" and "finished"
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.progress = Progress()
        self.stats = collections.Counter()  # accepted, rejected, completed, failed, cancelled, interrupted, batches
        self._seconds_per_image = None  # running mean, for Retry-After and ETA
        self._all_controlnets: list | None = None  # pipe.controlnets while a batch runs a selection of them
        self._controlnets_lock = threading.Lock()  # (the swap and controlnets() read both: never half of it)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ModelWorker":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="imagine-model-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the waiting jobs, interrupt the running batch, and join the thread."""
        with self._cv:
            self._stopping = True
            while self._pending:
                job = self._pending.popleft()
                job.state = "cancelled"
                self.stats["failed"] += 1
                job.future.set_exception(ShuttingDown("the server is shutting down; the job did not run"))
            self._cv.notify_all()
        self._interrupt.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- the client side ---------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                self.stats["rejected"] += 1
                raise QueueFull(len(self._pending), self.retry_after())
            if job.priority is None:
                self._pending.append(job)
            else:  # (before the first job waiting with a higher number)
                k = next((i for i, j in enumerate(self._pending) if (j.priority or 0) > job.priority),
                         len(self._pending))
                self._pending.insert(k, job)
            self.stats["accepted"] += 1
            job.future.add_done_callback(lambda _, job_id=job.id: self._record_end(job_id))
            self._cv.notify()
        return job.future

    def _record_end(self, job_id: str) -> None:
        with self._cv:  # (reentrant: futures are set with _cv held)
            self._ended[job_id] = None
            self._ended.move_to_end(job_id)
            while len(self._ended) > 512:
                self._ended.popitem(last=False)

    def cancel(self, job: Job) -> str:
        """The client is gone: drop the job if it waits (it never runs); if it runs, its images are not wanted: a chunk
        whose jobs are all cancelled stops at its next step (or is not started), and the job is answered JobCancelled
        when its chunks are done. Returns the state the job was in: "queued", "running", or (nothing to do) "done"
        or "cancelled"."""
        with self._cv:
            if job.state == "queued" and job in self._pending:
                self._pending.remove(job)
                job.state = "cancelled"
                job.cancelled = True
                self.stats["cancelled"] += 1
                job.future.set_exception(JobCancelled("the client disconnected before the job ran"))
                return "queued"
            if job.state == "running":
                # the callback stops the batch once every job in it is cancelled
                job.cancelled = True
                return "running"
            return job.state

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the running batch at its next step (AUTOMATIC1111's Interrupt). Its jobs get the
        x0 estimates of that step. Returns whether anything was running. With `job_id`: only a batch
        whose jobs all carry that id (checked and stopped under one lock: no other batch is hit)."""
        with self._cv:
            if not self._running or (job_id is not None and any(j.id != job_id for j in self._running)):
                return False
            self._interrupt.set()
            return True

    def skip(self) -> bool:
        """Stop the running chunk (one forward pass of images: an n_iter round of an A1111 request) at its next step,
        AUTOMATIC1111's Skip: its images are the x0 estimates of that step, as A1111 keeps the skipped round's, and the
        batch goes on with its next chunk. Returns whether anything was running."""
        with self._cv:
            if not self._running:
                return False
            self._skip.set()
            self._publish(skipped=True)
            return True

    # -- queries -----------------------------------------------------------------------------
    def queued(self) -> int:
        with self._cv:
            return len(self._pending)

    def running(self) -> list[Job]:
        with self._cv:
            return list(self._running)

    def position(self, job_id: str) -> int | None:
        """0 if running, k >= 1 if k-th in the queue, None if unknown or finished."""
        with self._cv:
            if any(j.id == job_id for j in self._running):
                return 0
            for k, j in enumerate(self._pending, 1):
                if j.id == job_id:
                    return k
        return None

    def ended(self, job_id: str) -> bool:
        """Whether a job with this id was answered (done, failed or cancelled) among the last 512 answered."""
        with self._cv:
            return job_id in self._ended

    def controlnets(self) -> list[tuple[str, Any]]:
        """The ControlNets loaded into the pipeline, (name, model) in order, whatever the running batch uses."""
        with self._controlnets_lock:
            saved = self._all_controlnets
            return list(saved if saved is not None else getattr(self.pipe, "controlnets", None) or [])

    @contextlib.contextmanager
    def _using_controlnets(self, names: list[str]):
        """The pipeline runs every ControlNet it holds (one control picture each): for a batch's units, it holds
        those, in the units' order (a name twice: that ControlNet twice), and all of them again afterwards."""
        if not names:
            yield
            return
        pipe = self.pipe
        full = list(pipe.controlnets)
        nets = dict(full)
        missing = [n for n in names if n not in nets]
        if missing:
            raise ValueError(f"no ControlNet named {', '.join(map(repr, missing))} is loaded")
        with self._controlnets_lock:
            self._all_controlnets = full
            pipe.controlnets = [(n, nets[n]) for n in names]
        try:
            yield
        finally:
            with self._controlnets_lock:
                pipe.controlnets = full
                self._all_controlnets = None

    @contextlib.contextmanager
    def _using_clip_skip(self, value: int | None):
        """The text encoder at `value` layers skipped for a batch (A1111's CLIP_stop_at_last_layers, per request), and
        as loaded again afterwards."""
        encoder = getattr(self.pipe, "text_encoder", None)
        if value is None or encoder is None or encoder.clip_skip == value:
            yield
            return
        saved = encoder.clip_skip
        encoder.clip_skip = value
        try:
            yield
        finally:
            encoder.clip_skip = saved

    def retry_after(self) -> int:
        """Seconds until a slot is likely to free: the mean time per image times the images
        ahead in the queue, capped to a batch's worth, at least 1."""
        per_image = self._seconds_per_image or 1.0
        waiting = sum(len(j) for j in list(self._pending)[: max(1, self.max_batch)])
        return max(1, min(600, math.ceil(per_image * max(1, waiting))))

    # -- the worker thread -------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        first = self._pending.popleft()
        batch, n = [first], len(first)
        # (a sampler that couples a batch: its result would depend on the requests it ran with; a job with its own work
        # runs alone)
        if first.settings.couples_batch or first.call is not None:
            return batch
        for job in list(self._pending):
            if n >= self.max_batch:
                break
            if job.call is None and job.settings == first.settings and n + len(job) <= self.max_batch:
                self._pending.remove(job)
                batch.append(job)
                n += len(job)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                now = time.time()
                for job in batch:
                    job.state, job.started = "running", now
                self._running = batch
                self._interrupt.clear()
                self._skip.clear()
            try:
                self._run_isolated(batch)
            except BaseException as e:  # never let the thread die with jobs unanswered
                log.exception("the model worker stops")
                with self._cv:
                    for job in batch:
                        if not job.future.done():
                            self.stats["failed"] += 1
                            job.future.set_exception(RuntimeError(f"generation failed: {e!r}"))
                    # (nothing runs the queue any more: refuse new jobs and fail the waiting ones, not strand them)
                    self._stopping = True
                    while self._pending:
                        job = self._pending.popleft()
                        job.state = "cancelled"
                        self.stats["failed"] += 1
                        job.future.set_exception(ShuttingDown(f"the model worker stopped ({e!r}); the job did not run"))
                raise
            finally:
                with self._cv:
                    for job in batch:
                        if job.state == "running":
                            job.state = "done"
                    self._running = []
                    self.progress = Progress()
                # (the thread waits for the next job holding nothing of this batch: its pictures and answers go with
                # their requests)
                batch = job = None

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run a batch; if it fails, run its jobs not yet answered one by one, so one job whose input breaks the
        pipeline fails alone and the others still get their images (a cancelled one is answered, not run again)."""
        try:
            self._run_batch(batch)
        except Exception as e:
            left = [j for j in batch if not j.future.done()]
            if len(batch) > 1 and left:
                log.warning("a batch of %d jobs failed (%r); running %d of them one by one", len(batch), e, len(left))
                for job in left:
                    with self._cv:
                        if job.cancelled:
                            self._answer(job, None)
                            continue
                    self._run_isolated([job])
                return
            log.exception("generation failed")
            with self._cv:
                for job in left:
                    if job.cancelled:
                        self._answer(job, None)
                    else:
                        self.stats["failed"] += 1
                        job.state = "done"
                        job.future.set_exception(e)

    def _publish(self, **changes) -> None:
        """`progress` with these fields changed, as a new object (readers hold the old one whole)."""
        self.progress = dataclasses.replace(self.progress, **changes)

    def _answer(self, job: Job, result: "JobResult | None") -> None:
        """Set the job's future (under _cv): JobCancelled if it was cancelled, Interrupted if it has no image, else
        its result; the job leaves the running list (the batch may run on for others)."""
        if job.future.done():
            return
        if job.cancelled:
            job.state = "cancelled"
            self.stats["cancelled"] += 1
            job.future.set_exception(JobCancelled("the client disconnected while the job ran" if job.started else
                                                  "the client disconnected before the job ran"))
        elif result is None or not result.images:
            job.state = "done"
            self.stats["failed"] += 1
            job.future.set_exception(Interrupted("interrupted before this job's images were started"))
        else:
            job.state = "done"
            self.stats["completed"] += 1
            job.future.set_result(result)
        if any(j is job for j in self._running):
            self._running = [j for j in self._running if j is not job]

    def _run_call(self, job: Job) -> None:
        """A job with its own work (job.call): run alone, its progress published at each step (a new pass, a graph's
        next sampler, starts the count again), stopped at the next step by an interrupt (answered Interrupted: a graph
        keeps nothing of an interrupted run, as ComfyUI's) or by its client's cancel."""
        t0 = time.time()
        with self._cv:
            self.progress = Progress(job_ids=[job.id], offsets={job.id: 0}, spans={job.id: (0, len(job))},
                                     steps=job.settings.steps, chunks=1, started=t0)
        run = GraphRun(self, job)
        try:
            answer = job.call(self.pipe, run)
        except _ChunkCancelled:
            answer = None
        except _Interrupted:
            with self._cv:
                self._publish(interrupted=True)
                self.stats["interrupted"] += 1
                job.state = "done"
                job.future.set_exception(Interrupted("interrupted while the job ran"))
            return
        with self._cv:
            if job.cancelled:
                self._answer(job, None)
                return
            job.state = "done"
            self.stats["completed"] += 1
            job.future.set_result(answer)

    def _stepper(self, mine: list[Job], skippable: bool = True) -> Callable[[dict], None]:
        """The sampler callback of a run for the jobs `mine`: publishes the step (and its x0 for previews), and stops
        the run at an interrupt, a skip (where `skippable`: A1111's rounds), or when every job of it is cancelled."""

        def callback(d: dict) -> None:
            if d.get("stage") != "prior":  # (unCLIP's prior, before the steps counted: interruptible, no preview)
                x0 = d.get("denoised")
                x0 = x0.detach().clone() if isinstance(x0, torch.Tensor) else None
                with self._cv:
                    p = self.progress
                    step, hires = _step_of(d) + 1, bool(d.get("hires_pass"))
                    # (the steps this run takes: image to image's fewer, a schedule type's more)
                    total = int(d["total"]) if d.get("total") else p.steps
                    if hires == p.hires_pass and p.step > 0 and p.steps > 0 and step * p.steps < p.step * total:
                        total = (step * p.steps) // p.step  # (an estimate that grew: held, the bar never goes back)
                    self._publish(step=step, steps=max(total, step, 1), hires_pass=hires, denoised=x0,
                                  version=p.version + 1)
            # (after the step's x0 is kept: an interrupted chunk's images are this step's estimates)
            if self._interrupt.is_set():
                raise _Interrupted
            if all(j.cancelled for j in mine):
                raise _ChunkCancelled
            if skippable and self._skip.is_set():
                raise _Skipped

        return callback

    def _run_batch(self, batch: list[Job]) -> None:
        if batch[0].call is not None:
            return self._run_call(batch[0])
        s = batch[0].settings
        prompts = [p for j in batch for p in j.prompts]
        negatives = [p for j in batch for p in j.negative_prompts]
        seeds = [x for j in batch for x in j.seeds]
        subseeds = [x for j in batch for x in (j.subseeds or j.seeds)] if s.subseed_strength else None
        # (only where a job's fill seeds are not its own: the pipeline's default is the images' own start noise)
        fill_seeds = [x for j in batch for x in (j.latent_noise_seeds or j.seeds)] \
            if s.masked_content == "latent_noise" and any(j.latent_noise_seeds and j.latent_noise_seeds != j.seeds
                                                          for j in batch) else None
        inits = [im for j in batch for im in (j.init_images or [])] \
            if s.strength is not None or s.noise_level is not None else None
        masks = [m for j in batch for m in j.masks] if s.inpainting else None  # (one settings: all have them)
        controls = [[im for j in batch for im in j.control_images[u]] for u in range(len(s.controlnets))]
        hires_controls = [[im for j in batch for im in (j.hires_control_images or j.control_images)[u]]
                          for u in range(len(s.controlnets))] \
            if s.hires is not None and any(j.hires_control_images for j in batch) else None
        firsts = list(itertools.accumulate([0] + [len(j) for j in batch]))  # (by place: two jobs may share an id,
        # A1111's force_task_id; progress follows the first of them)
        offsets: dict[str, int] = {}
        spans: dict[str, tuple] = {}
        for j, k in zip(batch, firsts):
            offsets.setdefault(j.id, k)
            spans.setdefault(j.id, (k, k + len(j)))
        size = self.max_batch
        if s.couples_batch and batch[0].batch_size:  # (alone in its batch: _take_batch)
            size = min(size, batch[0].batch_size)
        chunks = [(i, min(i + size, len(seeds))) for i in range(0, len(seeds), size)]
        self.stats["batches"] += 1
        t0 = time.time()
        with self._cv:
            self.progress = Progress(job_ids=[j.id for j in batch], offsets=offsets, spans=spans, steps=s.steps,
                                     chunks=len(chunks), started=t0, passes=2 if s.hires is not None else 1)
        # the batch's images by place (None: not made: its chunk was not started, or dropped as all its jobs were
        # cancelled); the chunks that were cut by a skip; the images whose texts were padded; each chunk's parameters
        images: list = [None] * len(seeds)
        cut, padded, chunk_parameters = set(), set(), {}
        interrupted, dropped = False, False
        jobs_at = [(j, k, k + len(j)) for j, k in zip(batch, firsts)]

        def answer_finished(upto: int) -> None:  # (under _cv) the jobs whose images all lie before `upto`
            for job, k, end in jobs_at:
                if end <= upto and not job.future.done():
                    self._answer(job, self._result(job, k, end, images, cut, padded, chunk_parameters, chunks, s,
                                                   interrupted, t0, len(seeds)))

        for c, (a, b) in enumerate(chunks):
            mine = [j for j, k, end in jobs_at if k < b and end > a]  # the jobs with images in this chunk
            with self._cv:
                if self._interrupt.is_set():  # (A1111: a round not started when the interrupt came does not run)
                    interrupted = True
                    break
                if all(j.cancelled for j in mine):  # (nobody waits for these images)
                    dropped = True
                    answer_finished(b)
                    continue
                # (a skip ends the round it came in: A1111 resets state.skipped as a round starts)
                self._skip.clear()
                self._publish(chunk=c, chunk_start=a, step=0, steps=s.steps, denoised=None, hires_pass=False,
                              skipped=False)

            callback = self._stepper(mine)
            try:
                run = self.pipe.generate
                if s.hires is not None:
                    h = s.hires
                    texts = {"hires_prompt": h.prompt, "hires_negative_prompt": h.negative_prompt}
                    run = functools.partial(self.pipe.generate_hires, hires_scale=h.scale, hires_resize=h.resize,
                                            hires_upscaler=h.upscaler, **{k: v for k, v in texts.items() if v},
                                            hires_strength=h.strength, hires_steps=h.steps,
                                            hires_sampling=s.hires_sampling and {
                                                **dict(s.hires_sampling), "sampler_options":
                                                dict(dict(s.hires_sampling)["sampler_options"]) or None})
                control = {}
                if controls:  # one picture per image for each unit (as a list per ControlNet when several)
                    pictures = [c[a:b] for c in controls]
                    one = len(pictures) == 1
                    # (name, weight, start, end[, control mode])
                    units = [tuple(u) + (0.0, 1.0)[len(u) - 2:] for u in s.controlnets]
                    weights, starts, ends = ([u[k] for u in units] for k in (1, 2, 3))
                    modes = [u[4] if len(u) > 4 else "balanced" for u in units]
                    control = {"control_image": pictures[0] if one else pictures,
                               "controlnet_scale": weights[0] if one else weights}
                    # (the pipeline runs them by the ControlNet extension's rule: A1111's rules)
                    if any(v != 0 for v in starts) or any(v != 1 for v in ends):
                        control.update(control_guidance_start=starts[0] if one else starts,
                                       control_guidance_end=ends[0] if one else ends)
                    if any(m != "balanced" for m in modes):
                        control["control_mode"] = modes
                    if hires_controls:  # (the second pass's own maps: the ControlNet extension's hr_hint_cond)
                        control["hires_control_image"] = [c[a:b] for c in hires_controls]
                        if one:
                            control["hires_control_image"] = control["hires_control_image"][0]
                    if s.hires is not None and s.hires.control_modes is not None:
                        control["hires_control_mode"] = list(s.hires.control_modes)
                if s.noise_level is not None:  # unCLIP's variations of the jobs' pictures
                    run = functools.partial(self.pipe.variations, inits[a:b], noise_level=s.noise_level)
                with self._using_controlnets([u[0] for u in s.controlnets]), self._using_clip_skip(s.clip_skip):
                    res = run(prompts[a:b], negatives[a:b], seeds=seeds[a:b], steps=s.steps,
                              guidance_scale=s.guidance_scale, sampler=s.sampler, height=s.height,
                              width=s.width, sigma_schedule=s.schedule, eta=s.eta,
                              sampler_options=dict(s.options) or None, callback=callback, progress=False,
                              **({"emphasis": s.emphasis} if s.emphasis else {}),
                              **({"sigma_range": s.sigma_range} if s.sigma_range != "spaced" else {}),
                              **({"start": s.start} if s.start != "noise" else {}),
                              **({"discard_penultimate_sigma": True} if s.discard_penultimate_sigma else {}),
                              **({"strength_rule": s.strength_rule} if s.strength_rule != "diffusers" else {}),
                              **({"long_prompts": True} if s.long_prompts else {}),
                              **({"prompt_editing": True} if s.prompt_editing else {}),
                              **({"composable": True} if s.composable else {}),
                              **({"refiner_switch": s.refiner_switch} if s.refiner_switch else {}),
                              **({"refiner_switch_by_steps": True} if s.refiner_switch_by_steps else {}),
                              **({"subseeds": subseeds[a:b], "subseed_strength": s.subseed_strength}
                                 if subseeds else {}),
                              **({"latent_noise_seeds": fill_seeds[a:b]} if fill_seeds else {}),
                              **({"image_guidance_scale": s.image_guidance_scale, "image_guidance_gate": False}
                                 if s.image_guidance_scale is not None else {}),
                              **({"init_image": inits[a:b], "strength": s.strength}
                                 if inits and s.noise_level is None else {}),
                              **({"resize_mode": s.resize_mode} if inits and s.resize_mode != "just_resize" else {}),
                              **({"seed_resize_from_h": s.seed_resize[0], "seed_resize_from_w": s.seed_resize[1]}
                                 if s.seed_resize else {}),
                              **({"rng": s.rng} if s.rng != "cpu" else {}),
                              **({"noise_seed_delta": s.noise_seed_delta} if s.noise_seed_delta else {}),
                              **({"zero_terminal_snr": True} if s.zero_terminal_snr else {}),
                              **({"downcast_alphas_cumprod": True} if s.downcast_alphas_cumprod else {}),
                              **({"old_prompt_editing": True} if s.old_prompt_editing else {}),
                              **({"pad_conds": s.pad_conds} if s.pad_conds else {}),
                              **({"mask_image": masks[a:b], "masked_content": s.masked_content} if masks else {}),
                              **control)
                images[a:b] = res.images
                # (the images whose prompt and negative were padded: A1111's infotext then names the option)
                rows = res.parameters.get("padded_conds")
                rows = rows if isinstance(rows, list) else [bool(rows)] * (b - a)
                padded |= {a + i for i, f in enumerate(rows) if f}
                chunk_parameters[c] = res.parameters
            except _ChunkCancelled:  # (its jobs are all cancelled: no images to decode)
                dropped = True
            except _Skipped:  # A1111's skip: this round's images as they were, the next rounds run
                images[a:b] = self._partial_images(self.progress.denoised, b - a, s)
                cut |= set(range(a, b))
                self.stats["skipped"] += 1
            except _Interrupted:
                interrupted = True
                images[a:b] = self._partial_images(self.progress.denoised, b - a, s)
                break
            with self._cv:
                answer_finished(b)
        seconds = time.time() - t0
        if not interrupted and not cut and not dropped:
            n = len(seeds)
            mean = seconds / n
            self._seconds_per_image = mean if self._seconds_per_image is None else 0.7 * self._seconds_per_image + 0.3 * mean
        with self._cv:
            if interrupted:
                self._publish(interrupted=True)
                self.stats["interrupted"] += 1
            for job, k, end in jobs_at:  # (the rest: those with images past an interrupt, or none)
                if not job.future.done():
                    self._answer(job, self._result(job, k, end, images, cut, padded, chunk_parameters, chunks, s,
                                                   interrupted, t0, len(seeds)))

    @staticmethod
    def _result(job: Job, k: int, end: int, images: list, cut: set, padded: set, chunk_parameters: dict,
                chunks: list, s: Settings, interrupted: bool, t0: float, batch_images: int) -> "JobResult | None":
        """Job's result from the batch's images k..end (those made: a prefix, as chunks run in order), None if it has
        none. Its parameters are those of the last chunk with its images. `interrupted`: the batch was interrupted
        before this job was answered (a job whose chunks were all done before it was answered then)."""
        mine = []
        for im in images[k:end]:
            if im is None:
                break
            mine.append(im)
        if not mine:
            return None
        made_to = k + len(mine)
        parameters = {}
        for c, (a, b) in enumerate(chunks):
            if a < made_to and b > k and c in chunk_parameters:
                parameters = chunk_parameters[c]
        common = {key: v for key, v in parameters.items() if key not in ("prompt", "negative_prompt")}
        if not common:
            common = {"steps": s.steps, "sampler": s.sampler, "guidance_scale": s.guidance_scale,
                      "height": s.height, "width": s.width}
        if s.pad_conds:  # (whether one of this job's images was padded)
            common["padded_conds"] = any(i in padded for i in range(k, made_to))
        return JobResult(images=mine, seeds=list(job.seeds[:len(mine)]), parameters=common,
                         interrupted=interrupted,
                         seconds=time.time() - t0, batch_images=batch_images,
                         skipped=any(i in cut for i in range(k, made_to)))

    def _partial_images(self, denoised, n: int, s: Settings) -> list:
        """Interrupted: decode the last x0 estimate, as AUTOMATIC1111 returns the unfinished
        images; pure noise-free grey if the sampler had not finished a step."""
        from imagine.images import to_pil

        if denoised is None or denoised.shape[0] != n:
            from PIL import Image

            return [Image.new("RGB", (s.width, s.height), (128, 128, 128)) for _ in range(n)]
        with torch.no_grad():
            x = self.pipe.decode(denoised)
        return [to_pil(t) for t in x]

    def preview_row(self, job_id: str | None = None) -> int | None:
        """The row of the running chunk's latest x0 estimate that `preview(job_id)` decodes: the job's first image in
        this chunk; None where there is none, or where the job has no image in this chunk (another request's image is
        not shown to it). Without a job id (A1111's progress, which follows whatever runs) the chunk's first."""
        return _preview_row(self.progress, job_id)

    def preview(self, job_id: str | None = None):
        """The running chunk's latest x0 estimate decoded to an image (`preview_row`), or None."""
        p = self.progress  # (one snapshot: the row and the estimate of the same step)
        i = _preview_row(p, job_id)
        if i is None:
            return None
        from imagine.images import to_pil

        with torch.no_grad():
            x = self.pipe.decode(p.denoised[i:i + 1])
        return to_pil(x[0])


class GraphRun:
    """What a job with its own work (Job.call) gets from the worker: `step(d)`, the sampler callback of its runs
    (progress, previews, interrupt, cancel); `new_pass(steps, **info)` before each sampler run (the count starts
    again; `info` is handed to the job's `on_step`); `using_clip_skip(v)`, the text encoder's clip skip for a block."""

    def __init__(self, worker: "ModelWorker", job: Job):
        self._worker, self.job = worker, job
        self._callback = worker._stepper([job], skippable=False)
        self.on_step: Callable[[int, int], None] | None = None  # (value, max) after each step: a ComfyUI "progress"

    def new_pass(self, steps: int) -> None:
        with self._worker._cv:
            self._worker._publish(step=0, steps=max(1, int(steps)), denoised=None, hires_pass=False)

    def step(self, d: dict) -> None:
        self._callback(d)
        if self.on_step is not None:
            p = self._worker.progress
            self.on_step(p.step, p.steps)

    def check(self) -> None:
        """Between a graph's nodes: stop here on an interrupt or a cancel (as at a step)."""
        if self._worker._interrupt.is_set():
            raise _Interrupted
        if self.job.cancelled:
            raise _ChunkCancelled

    def using_clip_skip(self, value: int | None):
        return self._worker._using_clip_skip(value)


def _preview_row(p: Progress, job_id: str | None) -> int | None:
    x0 = p.denoised
    if x0 is None:
        return None
    if job_id is None:
        return 0
    if job_id not in p.spans:
        return None
    first, end = p.spans[job_id]
    row = max(first, p.chunk_start) - p.chunk_start
    return row if row < min(x0.shape[0], end - p.chunk_start) else None


def _step_of(d: dict) -> int:
    for key in ("step", "i"):  # imagine.samplers reports "step" (0-based)
        if key in d:
            return int(d[key])
    return 0
