"""Server fixes of session 29, each against what a client of AUTOMATIC1111's API sees."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import requests

pytest.importorskip("webuiapi")

from test_server import _txt2img, _wait, pipe, server, tiny_model  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_of_a_task_goes_from_running_to_finished_without_a_gap(server, monkeypatch):
    """A client polling progress?id_task= (A1111's page does, until `completed`) must never read "unknown task" for
    a task it saw running: the task is finished as soon as its job leaves the worker. The handler that awaits the job
    is held back here (its future resolves only when the test says), standing in for an event loop that has not yet
    resumed it; the old server recorded the task as finished only there, so it answered "unknown task" meanwhile."""
    worker = server.worker
    real_submit, release, handed = worker.submit, threading.Event(), []

    def submit(job):
        inner = real_submit(job)
        outer: Future = Future()

        def forward():
            release.wait(60)
            exc = inner.exception()
            outer.set_exception(exc) if exc is not None else outer.set_result(inner.result())

        inner.add_done_callback(lambda _: threading.Thread(target=forward, daemon=True).start())
        handed.append(inner)
        return outer

    monkeypatch.setattr(worker, "submit", submit)
    task = "s29-gapless"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_txt2img, server, force_task_id=task)
        _wait(lambda: handed and handed[0].done(), 60, "the job to finish in the worker")
        _wait(lambda: worker.position(task) is None, 30, "the job to leave the worker")
        p = requests.get(server.url + "/sdapi/v1/progress", params={"id_task": task}, timeout=30).json()
        release.set()
        assert answer.result(120).status_code == 200
    assert p["completed"] is True and p["textinfo"] == "finished" and p["progress"] == 1.0, p


def test_an_unknown_task_is_still_unknown(server):
    p = requests.get(server.url + "/sdapi/v1/progress", params={"id_task": "never-sent-s29"}, timeout=30).json()
    assert p["completed"] is False and p["textinfo"] == "unknown task"
