"""Serving: an AUTOMATIC1111- and OpenAI-compatible HTTP API and a web page (`imagine serve`).

`create_app(pipe, ServerConfig(...))` builds the FastAPI app; `ModelWorker` is the one thread
that runs the pipeline, fed by a bounded queue.
"""

from imagine.server.app import ServerConfig, create_app
from imagine.server.worker import Job, ModelWorker, QueueFull, Settings

__all__ = ["ServerConfig", "create_app", "Job", "ModelWorker", "QueueFull", "Settings"]
