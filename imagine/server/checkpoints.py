"""A folder of checkpoints behind one server, as AUTOMATIC1111 serves its models/Stable-diffusion folder:
`imagine serve --ckpt-dir DIR`.

`/sdapi/v1/sd-models` lists the folder's checkpoints (.safetensors and .ckpt files, and model folders: diffusers' or
ours, a model_index.json in them) by A1111's titles; `POST /sdapi/v1/options {"sd_model_checkpoint": title}` loads one
and serves it from then on, and a request's `override_settings.sd_model_checkpoint` runs that request on another one
(and, unless `override_settings_restore_afterwards` is false, goes back after it), as A1111 does. One model is in
memory at a time unless told (`--checkpoints-in-memory`, A1111's sd_checkpoints_limit).

Each checkpoint is served by its own app (imagine.server.app.create_app around its pipeline, made when it first
loads); `CheckpointServer` is the ASGI app in front of them. It changes models only between pictures: a switch shuts
the gate to new generating requests, waits for those under way to be answered, loads, and opens it again, so a
picture is never made half on one model. Everything else (progress, options, listings) goes to the model being
served at that moment. The settings set through /sdapi/v1/options are carried to each model that loads.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from imagine.server.app import ApiError, _BodyLimit, _error_response, a1111_model_name, model_fingerprint

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# the requests that make pictures: they wait while the model changes, and a change waits for them
GENERATING = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/v1/images/edits",
              "/v1/images/variations")
_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")  # A1111's re_strip_checksum: a title's " [hash]"
_FINGERPRINTS: dict = {}  # a model folder -> (its files' names, sizes and times, its fingerprint)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint the server can load: `path` (None: the embedded default model) and `name`, A1111's (its path
    within the folder, e.g. "sdxl/base.safetensors")."""

    path: Path | None
    name: str

    @property
    def model_name(self) -> str:
        return a1111_model_name(self.name, self.path is not None and self.path.is_file())

    def sha256(self) -> str | None:
        """A file's sha256 when it is known (hashed when the file loaded; hashing gigabytes to list them would take
        minutes): A1111's listing too shows a hash once it has one. A folder's fingerprint (imagine.server.app's)."""
        if self.path is None:
            return None
        if self.path.is_dir():  # (remembered while its files' sizes and times stay: listings and matches ask often)
            files = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.path.rglob("*")
                                 if p.is_file()))
            if _FINGERPRINTS.get(self.path, (None,))[0] != files:
                _FINGERPRINTS[self.path] = (files, model_fingerprint(str(self.path)))
            return _FINGERPRINTS[self.path][1]
        from imagine.loading.hashes import cached_sha256

        return cached_sha256(self.path)

    def title(self, sha256: str | None = None) -> str:
        return f"{self.name} [{sha256[:10]}]" if sha256 else self.name

    def aliases(self) -> set[str]:
        """The names that pick it out exactly (A1111's CheckpointInfo.ids)."""
        sha = self.sha256()
        names = {self.name, self.model_name, self.title(sha)}
        if self.path is not None:
            names.add(self.path.stem if self.path.is_file() else self.path.name)
        if sha:
            names |= {sha, sha[:10]}
        return names

    def listing(self) -> dict:
        """Its entry in /sdapi/v1/sd-models, A1111's shape."""
        sha = self.sha256()
        return {"title": self.title(sha), "model_name": self.model_name, "hash": sha[:10] if sha else None,
                "sha256": sha, "filename": str(self.path) if self.path is not None else self.name, "config": None}


def scan(folder: Path) -> list[Checkpoint]:
    """The checkpoints in `folder` and its subfolders, by name: .safetensors and .ckpt files, and model folders (a
    model_index.json in them; nothing inside one is listed apart)."""
    folder = Path(folder)
    models = {p.parent for p in folder.rglob("model_index.json")}
    found = [Checkpoint(p, p.relative_to(folder).as_posix()) for p in sorted(models)]
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file() and not any(m in p.parents for m in models):
            found.append(Checkpoint(p, p.relative_to(folder).as_posix()))
    return sorted(found, key=lambda c: c.name.lower())


def find(checkpoints: list[Checkpoint], wanted: str, closest: bool = False) -> Checkpoint | None:
    """The checkpoint `wanted` names: one of its exact names (what A1111's /options takes); with `closest`, else the
    shortest title holding it, else holding it without its " [hash]" (A1111's get_closet_checkpoint_match, which its
    override_settings and infotexts go through)."""
    for c in checkpoints:
        if wanted in c.aliases():
            return c
    if closest:
        for text in (wanted, _CHECKSUM.sub("", wanted)):
            found = sorted((c for c in checkpoints if text and text in c.title(c.sha256())),
                           key=lambda c: len(c.title(c.sha256())))
            if found:
                return found[0]
    return None


class CheckpointServer:
    """The ASGI app of `imagine serve --ckpt-dir`: `first` (a Checkpoint) is served by `first_app`; `load(checkpoint)`
    makes another's app (imagine.server.app.create_app around its pipeline; its worker is started here). `listed()`
    gives the checkpoints the server offers (called again by /sdapi/v1/refresh-checkpoints). `keep`: how many models
    stay in memory (the least recently served goes first)."""

    def __init__(self, first: Checkpoint, first_app, load: Callable[[Checkpoint], Any],
                 listed: Callable[[], list[Checkpoint]], keep: int = 1, comfyui=None):
        if keep < 1:
            raise ValueError(f"checkpoints in memory must be at least 1; got {keep}")
        self._load, self._listed, self.keep = load, listed, keep
        self.checkpoints = self._offered(first)
        self.current = first
        self._apps: OrderedDict[Checkpoint, Any] = OrderedDict({first: first_app})
        self._carried: dict = {}  # the settings set through /sdapi/v1/options, for each model that loads
        self._switching = asyncio.Lock()  # (one change of model at a time)
        self._open = asyncio.Event()  # set: generating requests go through
        self._open.set()
        self._idle = asyncio.Event()  # set: no generating request under way
        self._idle.set()
        self._under_way = 0
        self._ready = asyncio.Event()  # clear while a model loads in place of the one served (nothing to answer with)
        self._ready.set()
        self._comfyui_socket = None
        if comfyui is not None:  # ComfyUI's API, one state for the models' apps (imagine.server.comfyui)
            from imagine.server.comfyui import socket_app

            comfyui.checkpoint_names = lambda: [c.name for c in self.checkpoints]
            comfyui.on_queued = self._hold_for
            comfyui.other_pipe = self._loaded_pipe
            self._comfyui_socket = socket_app(comfyui)  # (served here: it outlives the models' apps)

    @property
    def app(self):
        """The app of the model served now."""
        return self._apps[self.current]

    def _offered(self, first: Checkpoint) -> list[Checkpoint]:
        listed = self._listed()
        return listed if first in listed else [first, *listed]

    # -- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] == "websocket" and self._comfyui_socket is not None and scope["path"] in ("/ws", "/api/ws"):
            return await self._comfyui_socket(scope, receive, send)
        if scope["type"] != "http":
            return await self._serve_request(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/sdapi/v1/sd-models":
            return await JSONResponse([c.listing() for c in self.checkpoints])(scope, receive, send)
        if method == "POST" and path == "/sdapi/v1/refresh-checkpoints":
            self.checkpoints = self._offered(self.current)
            return await JSONResponse(None)(scope, receive, send)
        if method == "POST" and path in ("/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"):
            async with self._switching:  # (A1111's: the model leaves memory, or comes back; a request reloads it too)
                if path.endswith("unload-checkpoint"):
                    await self._unload()
                else:
                    try:
                        await self._change_to(self.current)
                    except ApiError as e:
                        return await self._refuse(scope, receive, send, e.message, e.field)
            return await JSONResponse(None)(scope, receive, send)
        if method == "GET" and path == "/v1/models":
            data = [{"id": c.name, "object": "model", "created": 0, "owned_by": "imagine"} for c in self.checkpoints]
            return await JSONResponse({"object": "list", "data": data})(scope, receive, send)
        await self._ready.wait()
        if self.current not in self._apps:  # (unloaded: the next request loads it again, as A1111's does)
            try:
                async with self._switching:
                    await self._change_to(self.current)
            except ApiError as e:
                return await _error_response(Request(scope), 503, e.message, e.field)(scope, receive, send)
        if method == "POST" and path in ("/prompt", "/api/prompt"):
            return await _BodyLimit(self._comfyui_prompt, self.app.state.config.max_body_bytes)(scope, receive, send)
        if method == "POST" and (path == "/sdapi/v1/options" or path in GENERATING):
            # (the body read whole, within the served model's limit, and handed on)
            limit = self.app.state.config.max_body_bytes
            handler = self._options if path == "/sdapi/v1/options" else self._generate
            return await _BodyLimit(handler, limit)(scope, receive, send)
        return await self._serve_request(scope, receive, send)

    async def _serve_request(self, scope, receive, send) -> None:
        """The request on the model's app, on a copy of its scope: Starlette writes the app, its route and endpoint
        into the scope, and the server keeps a connection's last scope while it stays open (a browser's keep-alive),
        which would keep a model that left memory there."""
        await self.app(dict(scope), receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start_workers()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for app in self._apps.values():
                    await run_in_threadpool(app.state.worker.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _start_workers(self) -> None:
        # (the models in memory: a server started again starts them again; a method, so that no frame waiting in
        # _lifespan holds a model that later leaves memory)
        for app in self._apps.values():
            app.state.worker.start()

    # -- the requests it reads ---------------------------------------------------------------
    async def _options(self, scope, receive, send):
        body, receive = await _whole_body(receive)
        settings = _json_object(body)
        want = settings.get("sd_model_checkpoint") if settings is not None else None
        if want is not None:
            target = find(self.checkpoints, str(want))
            if target is None:
                return await self._refuse(scope, receive, send, f"sd_model_checkpoint: no checkpoint {want!r} here; "
                                          f"the server has {self._titles()}", "sd_model_checkpoint")
            try:
                async with self._switching:
                    await self._change_to(target)
            except ApiError as e:
                return await self._refuse(scope, receive, send, e.message, e.field)
            settings = {k: v for k, v in settings.items() if k != "sd_model_checkpoint"}
            body, receive = _replayed(json.dumps(settings).encode(), receive)
        status = await _forward(self.app, scope, receive, send)
        if status == 200 and settings:
            self._carried.update((k, v) for k, v in settings.items() if k != "sd_model_checkpoint")

    async def _generate(self, scope, receive, send):
        body, receive = await _whole_body(receive)
        # (parsed only where it may name a model: an img2img body holds megabytes of base64 pictures)
        names = b"sd_model_checkpoint" in body or (scope["path"] == "/v1/images/generations" and b'"model"' in body)
        request = (_json_object(body) if names else None) or {}
        override = request.get("override_settings")
        want = override.get("sd_model_checkpoint") if isinstance(override, dict) else None
        if want is None and scope["path"] == "/v1/images/generations" and isinstance(request.get("model"), str):
            # (OpenAI's `model`, where it names one of ours: a client's default, e.g. "dall-e-2", runs on the one
            # served)
            target = find(self.checkpoints, request["model"])
        elif want is not None:
            target = find(self.checkpoints, str(want), closest=True)
            if target is None:
                return await self._refuse(scope, receive, send, f"override_settings.sd_model_checkpoint: no "
                                          f"checkpoint like {want!r} here; the server has {self._titles()}",
                                          "override_settings")
            # (read here: the model's own app would list it among the settings it did not read)
            request["override_settings"] = {k: v for k, v in override.items() if k != "sd_model_checkpoint"}
            body, receive = _replayed(json.dumps(request).encode(), receive)
        else:
            target = None
        if (target is None or target == self.current) and await self._run(scope, receive, send, target):
            return
        restore = request.get("override_settings_restore_afterwards", True) is not False
        async with self._switching:
            self._open.clear()
            try:
                before = self.current
                try:
                    await self._change_to(target)
                except ApiError as e:
                    return await self._refuse(scope, receive, send, e.message, e.field)
                answer = []  # (held until the model is back, as A1111 answers: a client's next request finds it)

                async def held(message):
                    answer.append(message)
                try:
                    await self._serve_request(scope, receive, held)
                finally:
                    if restore:
                        try:
                            await self._change_to(before)
                        except ApiError as e:  # (the model that did load is served)
                            log.warning("override_settings_restore_afterwards: %s", e.message)
                    for message in answer:
                        await send(message)
            finally:
                self._open.set()

    async def _comfyui_prompt(self, scope, receive, send):
        """ComfyUI's POST /prompt: on the model its CheckpointLoaderSimple names (changed to first, and kept, as ComfyUI
        keeps the model it loaded); the model stays until the prompt's job ends (`_hold_for`). A prompt that names
        several (SDXL's base and refiner, a second model for a hires. fix pass) runs on the one served if it is among
        them, else on the first named, with the others loaded beside it (`_loaded_pipe`): as many models as it names
        are in memory while it runs, whatever --checkpoints-in-memory says, as ComfyUI loads what a prompt needs."""
        from imagine.server.comfyui import CHECKPOINT_LOADERS

        body, receive = await _whole_body(receive)
        graph = (_json_object(body) or {}).get("prompt")
        names = list(dict.fromkeys(
            n["inputs"]["ckpt_name"] for _, n in sorted(graph.items(), key=lambda kv: (len(kv[0]), kv[0]))
            if isinstance(n, dict) and n.get("class_type") in CHECKPOINT_LOADERS
            and isinstance(n.get("inputs"), dict) and isinstance(n["inputs"].get("ckpt_name"), str))) \
            if isinstance(graph, dict) else []
        named = list(dict.fromkeys(c for c in (find(self.checkpoints, n) for n in names) if c is not None))
        # (a name not here: the app's validation says so)
        target = self.current if self.current in named else (named[0] if named else None)
        others = [c for c in named if c != target]
        while True:
            if target is not None and (target != self.current or any(c not in self._apps for c in others)):
                try:
                    async with self._switching:
                        await self._change_to(target, others)
                except ApiError as e:
                    error = {"type": "prompt_outputs_failed_validation", "message": e.message, "details": "",
                             "extra_info": {}}
                    return await JSONResponse({"error": error, "node_errors": {}}, status_code=400)(scope, receive,
                                                                                                  send)
            if await self._run(scope, receive, send, target, others):
                return

    def _hold_for(self, future) -> None:
        """A ComfyUI prompt's job was queued (in the event loop): the model it runs on stays until the job ends."""
        loop = asyncio.get_running_loop()
        self._under_way += 1
        self._idle.clear()

        def ended() -> None:
            self._under_way -= 1
            if not self._under_way:
                self._idle.set()

        future.add_done_callback(lambda _: loop.call_soon_threadsafe(ended))

    async def _run(self, scope, receive, send, expected: Checkpoint | None = None, beside: list = ()) -> bool:
        """A generating request on the model served now; waits while the model changes. With `expected` (the model
        the request names), False if another is served once the gate opens, or one of those it needs `beside` it has
        left memory (the request then changes to it)."""
        await self._open.wait()
        if expected is not None and (self.current != expected or any(c not in self._apps for c in beside)):
            return False
        self._under_way += 1
        self._idle.clear()
        try:
            await self._serve_request(scope, receive, send)
        finally:
            self._under_way -= 1
            if not self._under_way:
                self._idle.set()
        return True

    # -- changing the model ------------------------------------------------------------------
    async def _unload(self) -> None:
        """Every model out of memory (A1111's unload-checkpoint), after the pictures under way (called holding
        _switching)."""
        self._open.clear()
        try:
            await self._idle.wait()
            self._ready.clear()
            await run_in_threadpool(self._make_room, 0)
        finally:
            self._ready.set()
            self._open.set()

    async def _change_to(self, target: Checkpoint, beside: list[Checkpoint] = ()) -> None:
        """Serve `target` from now on (called holding _switching): new pictures wait, those under way finish on the
        model they began on, then it loads (or is found in memory), and the checkpoints `beside` it (a ComfyUI
        prompt's others) load too. An ApiError if one cannot load: the model served before is served still (loaded
        again if it had to leave memory)."""
        if target == self.current and target in self._apps and all(c in self._apps for c in beside):
            return
        was_open = self._open.is_set()
        self._open.clear()
        try:
            await self._idle.wait()
            if target not in self._apps and len(self._apps) >= max(self.keep, 1 + len(beside)):
                self._ready.clear()  # (the model served leaves memory first: every request waits for the new one)
            await run_in_threadpool(self._serve, target, list(beside))
            if beside:
                await run_in_threadpool(self._load_beside, list(beside))
        finally:
            self._ready.set()
            if was_open:
                self._open.set()

    def _load_beside(self, beside: list[Checkpoint]) -> None:
        """The checkpoints `beside` in memory with the one served, after `_serve(target, beside)` made them (those there
        already) the most recent: those least recently served leave first to make room."""
        missing = [c for c in beside if c not in self._apps]
        room = max(self.keep, 1 + len(beside)) - len(missing)
        self._make_room(room)  # (those wanted are the most recent: they stay)
        for c in missing:
            try:
                self._apps[c] = self._started(c)
            except Exception as e:
                log.warning("checkpoint %s did not load: %s", c.name, e)
                raise ApiError(422, f"ckpt_name: {c.name} did not load ({type(e).__name__}: {e})",
                               "sd_model_checkpoint") from None

    def _loaded_pipe(self, name: str):
        """The pipeline of the checkpoint `name` if it is in memory (ComfyState.other_pipe: called in a prompt's job,
        while no model can change), else None."""
        c = find(self.checkpoints, name)
        app = self._apps.get(c) if c is not None else None
        return app.state.pipe if app is not None else None

    def _serve(self, target: Checkpoint, beside: list[Checkpoint] = ()) -> None:
        # (`beside`: a ComfyUI prompt's other checkpoints, kept if in memory: the most recent, they leave last)
        for c in beside:
            if c in self._apps:
                self._apps.move_to_end(c)
        room = max(self.keep, 1 + len(beside))
        if target in self._apps:
            self._apps.move_to_end(target)
            self.current = target
            self._make_room(room)  # (a ComfyUI prompt's others, loaded beside the one it ran on, go now)
            return
        before = self.current
        if before not in self._apps:  # (after an unload: nothing to go back to if it fails; the next request retries)
            try:
                self._apps[target] = self._started(target)
            except Exception as e:
                raise ApiError(422, f"sd_model_checkpoint: {target.name} did not load ({type(e).__name__}: {e}); no "
                                    "model is loaded", "sd_model_checkpoint") from None
            self.current = target
            return
        self._make_room(room - 1)  # (before loading: two models of several GB need not fit at once)
        try:
            app = self._started(target)
        except Exception as e:
            log.warning("checkpoint %s did not load: %s", target.name, e)
            if before not in self._apps:
                self._apps[before] = self._started(before)
            raise ApiError(422, f"sd_model_checkpoint: {target.name} did not load ({type(e).__name__}: {e}); still "
                                f"serving {before.name}", "sd_model_checkpoint") from None
        self._apps[target] = app
        self.current = target

    def _started(self, checkpoint: Checkpoint):
        app = self._load(checkpoint)
        app.state.worker.start()
        try:
            app.state.apply_options(dict(self._carried))
        except ApiError:  # (one this model cannot take: the others, one at a time)
            for k, v in self._carried.items():
                try:
                    app.state.apply_options({k: v})
                except ApiError as e:
                    log.warning("setting %s=%r not carried to %s: %s", k, v, checkpoint.name, e.message)
        return app

    def _make_room(self, room: int) -> None:
        while len(self._apps) > room:
            checkpoint, app = self._apps.popitem(last=False)
            app.state.worker.stop()
            del app
            _forget_endpoints()
            gc.collect()
            log.info("checkpoint %s left memory", checkpoint.name)

    def _titles(self) -> str:
        return ", ".join(repr(c.title(c.sha256())) for c in self.checkpoints) or "none"

    async def _refuse(self, scope, receive, send, message: str, field: str | None) -> None:
        await _error_response(Request(scope), 422, message, field)(scope, receive, send)


def _forget_endpoints() -> None:
    """FastAPI keeps its endpoints' kinds in module-wide caches (fastapi.dependencies.models, 4096 entries in 0.165),
    holding each endpoint function, and with it the closure over the pipeline of an app that is gone: without
    clearing them, a model left in memory by a switch stays there (measured: two SD-1.5-sized models, 7.6 GB served,
    14.9 GB after a switch). They are caches: cleared, they fill again."""
    from fastapi.dependencies import models

    for name in ("_is_gen_callable_cached", "_is_async_gen_callable_cached", "_is_coroutine_callable_cached"):
        cache = getattr(models, name, None)
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()


async def _whole_body(receive) -> tuple[bytes, Callable]:
    """The request's body, and a `receive` that gives it again and then the client's own messages."""
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts), _replayed(b"".join(parts), receive, message)[1]
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return _replayed(b"".join(parts), receive)


def _replayed(body: bytes, receive, after: dict | None = None) -> tuple[bytes, Callable]:
    messages = [{"type": "http.request", "body": body, "more_body": False}, *([after] if after else [])]

    async def again():
        return messages.pop(0) if messages else await receive()
    return body, again


def _json_object(body: bytes) -> dict | None:
    """The body as a JSON object, or None (a form, or not JSON: the model's own app says what is wrong)."""
    try:
        value = json.loads(body) if body else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _forward(app, scope, receive, send) -> int:
    """Run the request on `app`; its response's status."""
    status = 0

    async def sent(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)
    await app(dict(scope), receive, sent)  # (a copy: CheckpointServer._serve_request says why)
    return status
