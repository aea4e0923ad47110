"""One thread for every forward pass of the retrieval model; concurrent requests share a pass.

Request threads hand a preprocessed image (or a sentence) to `EmbedBatcher` and wait on a future. The model
thread takes the first waiting job, then everything else already queued (up to `max_batch`, waiting at most
`max_wait_ms` for more), and runs one forward pass for all of them. Under no load a job runs at once on its own
(no added latency); under load, jobs queue up while a pass runs and the next pass takes them together. The model
is only ever called from this thread, so it needs no locking and torch's intra-op threads are not
oversubscribed by several request threads at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Job:
    kind: str  # "image" (payload: preprocessed (3, S, S) tensor) or "text" (payload: str)
    payload: Any
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counts since start: forward passes per kind, jobs, and the largest batch seen."""

    passes: int = 0
    jobs: int = 0
    largest: int = 0

    def as_dict(self) -> dict:
        mean = self.jobs / self.passes if self.passes else 0.0
        return {"passes": self.passes, "jobs": self.jobs, "largest": self.largest, "mean_batch": round(mean, 2)}


class EmbedBatcher:
    """Embed images and texts with `model` on one thread, batching concurrent requests into one pass.

    `max_batch=1` turns batching off (every job gets its own pass, still on the model thread): the baseline the
    benchmarks compare against.
    """

    def __init__(self, model: Any, max_batch: int = 32, max_wait_ms: float = 0.0, precision: str | None = None):
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1e3
        self.precision = precision
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cxr-embed", daemon=True)
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------ public

    def embed_image(self, pixels: Any, timeout: float | None = None) -> np.ndarray:
        """One preprocessed image tensor (3, S, S) -> its L2-normalised (D,) float32 vector."""
        return self.submit_image(pixels).result(timeout)

    def embed_text(self, text: str, timeout: float | None = None) -> np.ndarray:
        """One sentence -> its L2-normalised (D,) float32 vector."""
        return self.submit_text(text).result(timeout)

    def submit_image(self, pixels: Any) -> Future:
        """Queue one preprocessed image; the future's result is its vector (await it with asyncio.wrap_future)."""
        return self._submit("image", pixels)

    def submit_text(self, text: str) -> Future:
        """Queue one sentence; the future's result is its vector."""
        return self._submit("text", str(text))

    def encode_images(self, images: list[np.ndarray], **_: Any) -> np.ndarray:
        """The `encode_images` the VLM's retrieval calls: HxW arrays -> (N, D), through the model thread."""
        transform = self.model.image_transform()
        futures = [self._submit("image", transform(np.asarray(im, dtype=np.float32))) for im in images]
        return np.stack([f.result() for f in futures]) if futures else np.zeros((0, self.model.embed_dim), "f4")

    def close(self, timeout: float = 30) -> None:
        """Stop the model thread after the jobs already queued (waiting at most `timeout` seconds for it)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------ model thread

    def _submit(self, kind: str, payload: Any) -> Future:
        if self._closed:
            raise RuntimeError("the embedding thread is closed")
        job = _Job(kind, payload)
        self._queue.put(job)
        return job.future

    def _take(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            for kind in ("image", "text"):
                group = [j for j in jobs if j.kind == kind]
                if group:
                    self._pass(kind, group)

    def _pass(self, kind: str, group: list[_Job]) -> None:
        import torch

        from retrieval.models.image_stream import run_pixels

        live = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            if kind == "image":
                pixels = torch.stack([torch.as_tensor(j.payload) for j in live])
                vecs = run_pixels(self.model, pixels, "embeddings", self.precision)
            else:
                vecs = np.asarray(self.model.encode_texts([j.payload for j in live]), dtype=np.float32)
        except BaseException as e:  # one bad pass fails its jobs, never the thread
            log.exception("embedding pass of %d %s job(s) failed", len(live), kind)
            for j in live:
                j.future.set_exception(e)
            return
        self.stats.passes += 1
        self.stats.jobs += len(live)
        self.stats.largest = max(self.stats.largest, len(live))
        for j, v in zip(live, vecs, strict=True):
            j.future.set_result(np.ascontiguousarray(v, dtype=np.float32))
