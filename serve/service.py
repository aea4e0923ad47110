"""The object `cxr serve` holds in memory: model, index and VLM, loaded once, and the calls the API makes.

Everything here is a library call (`Searcher.query_vector`, `Generator`, `read_image`); the FastAPI app in
`app.py` only parses requests and maps errors to statuses. What this object adds to those calls:

- a worker pool (threads, sized to the cores) that request handlers run their blocking work in;
- one model thread (`EmbedBatcher`) that embeds concurrent queries in one forward pass;
- the index as an immutable snapshot: a query takes the current one when it starts and finishes on it, while a
  reload (on `POST /reload`, or by the watcher when the folder's files change, e.g. after `cxr index add`)
  opens the new index beside it and swaps it in; a failed reload keeps serving the old one;
- study ids looked up in the index's meta rows, never joined into file paths (`studies.py`);
- the exemplars a drafted report rests on, with their reports and the sentences the draft shares with each
  (`sentences.py`);
- bounded work per request: text over `MAX_QUERY_CHARS` is refused, an upload is refused from its header when its
  pixels or its decode's memory are over the limits, and at most `max_decodes` uploads decode at once;
- no server path in what it returns (search results, /info, error messages) unless `show_paths`.

The snapshot and the folder signature the watcher compares are `snapshot.py`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.search import result_records
from retrieval.errors import IndexError_, UsageError
from retrieval.text_limits import check_query_text
from serve.batching import EmbedBatcher
from serve.redaction import redact_paths
from serve.sentences import annotate_exemplars
from serve.settings import ServeConfig
from serve.snapshot import TARGETS, IndexSnapshot, folder_signature, open_snapshot
from serve.studies import Thumbnails, study_record

log = logging.getLogger(__name__)


@dataclass
class SearchJob:
    """A query between `search_begin` and `search_finish`: its index snapshot and its vector to come."""

    snapshot: IndexSnapshot
    vector: Future
    query: dict
    k: int
    target: str
    exclude: str | None


def library_versions() -> dict:
    """Versions reported by /info."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("cxr-retrieval", "torch", "faiss-cpu", "open_clip_torch", "fastapi", "uvicorn", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


class ServeService:
    """Model, index (as swappable snapshots) and VLM, loaded once; the operations the HTTP API exposes.

    Pass `model` to use an already loaded model (tests, notebooks); otherwise `config.model` or the folder the
    index records is loaded. Call `close()` when done (it stops the threads and removes the upload folder).
    """

    def __init__(self, config: ServeConfig, model: Any = None, start_watcher: bool = True):
        from index.store import load_recorded_model, read_info

        if config.archive_url is not None:
            from serve.archive_link import check_archive_url

            config.archive_url = check_archive_url(config.archive_url)
        self.config = config
        self.index_path = Path(config.index)
        if model is None:
            model = load_recorded_model(read_info(self.index_path), self.index_path, config.model, config.device)
        if hasattr(model, "eval"):
            model.eval()
        self.model = model
        self._transform = model.image_transform()
        self._reload_lock = threading.Lock()
        self._generation = 0
        self.reload_error: str | None = None
        self._failed_signature: tuple | None = None
        self._last_retry = 0.0
        self._snapshot = self._open()  # refuses a model of another fingerprint, like `cxr query`
        self.batcher = EmbedBatcher(model, config.max_batch, config.max_wait_ms)
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(config.workers)), thread_name_prefix="cxr-serve")
        self.upload_dir = Path(tempfile.mkdtemp(prefix="cxr-serve-uploads-"))
        self.thumbnails = Thumbnails(config.thumbnail_cache)
        self._decode_slots = threading.BoundedSemaphore(max(1, int(config.max_decodes)))
        self._gen_lock = threading.Lock()
        self.generator = None
        if config.vlm is not None:
            from generation.writing.generate import Generator

            self.generator = Generator(config.vlm, None, device=config.device, retrieval_model=self.batcher)
        # uploads decode no smaller than the largest input any model here resizes them to (JPEGs decode faster)
        sizes = [getattr(self._transform, "size", None)]
        if self.generator is not None:
            sizes += [getattr(e.image_transform(), "size", None) for e in self.generator.encoders]
        self._decode_size = None if None in sizes else max(int(x) for x in sizes)
        self._stop = threading.Event()
        self._watcher = None
        if start_watcher and config.watch_interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="cxr-index-watch", daemon=True)
            self._watcher.start()
        log.info(
            "serving %s (%d rows) with model %s",
            self.index_path,
            self.snapshot.searcher.index.count,
            getattr(model, "name", "?"),
        )

    # ------------------------------------------------------------------ index snapshots and reload

    @property
    def snapshot(self) -> IndexSnapshot:
        """The index queries start on now."""
        return self._snapshot

    def _open(self) -> IndexSnapshot:
        snap = open_snapshot(self.index_path, self.model, self.config, self._generation + 1)
        self._generation = snap.generation  # a failed open numbers nothing
        return snap

    def reload(self, force: bool = True) -> dict:
        """Reopen the index folder and swap it in (when `force`, or when its files changed since the last load).

        Queries already running finish on the snapshot they started with. A folder that cannot be opened (a
        write in progress, a model of another fingerprint) leaves the old index serving and raises IndexError_."""
        with self._reload_lock:
            old = self._snapshot
            if not force and folder_signature(self.index_path) == old.signature:
                return {"reloaded": False, **old.state()}
            try:
                new = self._open()
            except Exception as e:
                self.reload_error = str(e)
                raise IndexError_(f"reload failed, still serving generation {old.generation}: {e}") from e
            self._snapshot = new
            self.reload_error = None
            self._failed_signature = None
            self.thumbnails.clear()
            log.info(
                "index reloaded: %d -> %d rows (generation %d)",
                old.searcher.index.count,
                new.searcher.index.count,
                new.generation,
            )
            return {"reloaded": True, "previous_count": old.searcher.index.count, **new.state()}

    def retry_failed_reload(self, min_interval: float = 1.0) -> None:
        """While the last reload failed, try again (at most once per `min_interval` seconds): once the folder
        opens again (repaired, even to the very files being served), the error is cleared."""
        if self.reload_error is None or time.monotonic() - self._last_retry < min_interval:
            return
        self._last_retry = time.monotonic()
        try:
            self.reload(force=True)
        except IndexError_:
            pass

    def check_for_change(self) -> bool:
        """Reload when the folder's files changed; True when a new index was swapped in. Errors are logged once
        per folder state and retried when the folder changes again."""
        sig = folder_signature(self.index_path)
        if sig == self._snapshot.signature or sig == self._failed_signature:
            return False
        try:
            return bool(self.reload(force=False)["reloaded"])
        except IndexError_ as e:
            self._failed_signature = sig
            log.warning("%s", e)
            return False

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watch_interval):
            try:
                self.check_for_change()
            except Exception:  # the watcher must never die
                log.exception("index watcher")

    # ------------------------------------------------------------------ validation

    def _check_query(self, k: int, target: str) -> None:
        if not isinstance(k, int) or k < 1 or k > self.config.max_k:
            raise UsageError(f"k must be an integer from 1 to {self.config.max_k}, got {k!r}")
        if target not in TARGETS:
            raise UsageError(f"target must be 'reports' or 'images', got {target!r}")

    # ------------------------------------------------------------------ operations

    def decode(self, data: bytes, filename: str = "", content_type: str = "") -> np.ndarray:
        """An uploaded image's pixels (UploadError 415/422 when it is not a readable PNG, JPEG or DICOM)."""
        from serve.uploads import decode_upload

        with self._decode_slots:  # at most max_decodes at once: memory is bounded per decode and in all
            return decode_upload(
                data,
                filename,
                content_type,
                self.upload_dir,
                self.config.max_pixels,
                min_size=self._decode_size,
                max_decode_bytes=int(self.config.max_decode_mb * 2**20),
            )

    def redact(self, message: str) -> str:
        """`message` without the server's paths (unless `show_paths`)."""
        if self.config.show_paths:
            return message
        named = {"index": self.index_path, "vlm": self.config.vlm, "uploads": self.upload_dir}
        return redact_paths(message, named)

    def search(self, *args: Any, **kwargs: Any) -> dict:
        """Top-k reports or images for an image (HxW array in [0, 1]) or a sentence, as `cxr query --json`; the
        arguments are `search_begin`'s (image or text, k, target, exclude_patient, name)."""
        return self.search_finish(self.search_begin(*args, **kwargs))

    def search_begin(
        self,
        image: np.ndarray | None = None,
        text: str | None = None,
        k: int = 5,
        target: str = "reports",
        exclude_patient: str | None = None,
        name: str = "upload",
    ) -> SearchJob:
        """First half of `search`: check the query, take the current index, preprocess, and queue the embedding.

        The HTTP app awaits `job.vector` on its event loop instead of holding a worker thread while the model
        thread runs, so queries waiting for the model pile up in its queue and share a forward pass."""
        if (image is None) == (text is None):
            raise UsageError('give either an image or {"text": "..."} (exactly one)')
        self._check_query(k, target)
        snap = self._snapshot  # this query finishes on this index, whatever a reload does meanwhile
        if text is not None:
            if not str(text).strip():
                raise UsageError("the text query is empty")
            check_query_text(str(text))
            return SearchJob(snap, self.batcher.submit_text(text), {"text": text}, k, target, exclude_patient)
        pixels = self._transform(np.asarray(image, dtype=np.float32))
        return SearchJob(snap, self.batcher.submit_image(pixels), {"image": name}, k, target, exclude_patient)

    def search_finish(self, job: SearchJob) -> dict:
        """Second half of `search`: the index search on the job's snapshot, once its vector is there."""
        vec = job.vector.result()
        searcher, exclude = job.snapshot.searcher, job.exclude or None
        if "text" in job.query:  # as `cxr query --text`: findings-aware
            hits = searcher.text_results(vec[None, :], job.query["text"], job.k, job.target, exclude_patient=exclude)
        else:
            hits = searcher.query_vector(vec[None, :], job.k, job.target, exclude_patient=exclude)
        match = searcher.match(vec[None, :], "text" if "text" in job.query else "image", exclude)
        far = match is not None and not match["close"]  # no close match: say so, rank nothing (index/abstain.py)
        results = [] if far else result_records(hits)
        if not self.config.show_paths:
            for r in results:
                r.pop("image_path", None)
        paths = {"index": str(self.index_path)} if self.config.show_paths else {}
        return {**job.query, **paths, "target": job.target, "k": job.k, "no_close_match": far, "match": match,
                "results": results}  # fmt: skip

    def generate(
        self,
        image: np.ndarray,
        task: str = "report",
        question: str | None = None,
        phrase: str | None = None,
        k: int = 3,
        exclude_patient: str | None = None,
        exclude_study: str | None = None,
    ) -> dict:
        """The VLM's output for one image: text, boxes, and the exemplars the prompt carried (with their reports
        and the sentences of the text that each exemplar's report also contains)."""
        from generation.writing.generate import task_prompt
        from generation.writing.image_answer import generate_for_image

        if self.generator is None:
            raise UsageError("this server has no VLM; start it with --vlm DIR (a folder from `cxr vlm train`)")
        if not isinstance(k, int) or k < 0 or k > 32:
            raise UsageError(f"k must be an integer from 0 to 32, got {k!r}")
        task_prompt(task, question, phrase)  # unknown task, or ground without a phrase: a usage error
        snap = self._snapshot
        with self._gen_lock:  # one decode at a time: the VLM and its encoders are not shared between threads
            self.generator.searcher = snap.searcher if k > 0 else None
            res = generate_for_image(
                np.asarray(image, dtype=np.float32),
                None,
                self.generator.vlm_dir,
                task=task,
                k=k,
                question=question,
                phrase=phrase,
                generator=self.generator,
                exclude_study=exclude_study or None,
                exclude_patient=exclude_patient or None,
            )
        res.setdefault("boxes", [])
        annotate_exemplars(res, lambda study_id: study_record(snap, study_id))
        return res

    def study(self, study_id: str) -> dict | None:
        """The study's report, labels and images, looked up in the index meta (None when it is not there)."""
        return study_record(self._snapshot, study_id)

    def thumbnail(self, study_id: str, size: int = 256, image_id: str | None = None) -> bytes | None:
        """A PNG of the study's first image (or of `image_id`), its longer side `size` pixels (`Thumbnails.get`)."""
        return self.thumbnails.get(self._snapshot, study_id, size, image_id)

    def health(self) -> dict:
        """Liveness plus the row count of the index being served."""
        return {"status": "ok", "count": self._snapshot.searcher.index.count}

    def info(self) -> dict:
        """Model name and fingerprint, index size and factory, VLM, versions, workers and batching counts."""
        snap = self._snapshot
        idx = snap.searcher.index
        m = self.model
        return {
            "model": {
                "name": str(getattr(m, "name", "?")),
                "fingerprint": str(getattr(m, "fingerprint", "")),
                "embed_dim": int(getattr(m, "embed_dim", idx.dim)),
            },
            "index": {
                **({"path": str(self.index_path)} if self.config.show_paths else {}),
                "factory": idx.info.get("factory"),
                "dim": idx.dim,
                "created": idx.info.get("created"),
                "backends": {t: b.name for t, b in snap.searcher._backends.items()},
                "reload_error": None if self.reload_error is None else self.redact(self.reload_error),
                **snap.state(),
            },
            "vlm": {
                **({"path": str(self.config.vlm) if self.config.vlm else None} if self.config.show_paths else {}),
                "loaded": self.generator is not None,
            },
            "versions": library_versions(),
            "workers": self.config.workers,
            "batching": {"max_batch": self.batcher.max_batch, **self.batcher.stats.as_dict()},
            "max_upload_mb": self.config.max_upload_mb,
            "watch_interval_s": self.config.watch_interval,
            "archive_url": self.config.archive_url,
        }

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        """Submit blocking work to the worker pool (a concurrent.futures.Future)."""
        return self.pool.submit(fn, *args, **kwargs)

    def close(self, wait: bool = True) -> None:
        """Stop the watcher, the model thread and the pool; remove the upload folder. Safe to call twice.

        `wait=False` (a server shutting down after its grace period) cancels the queued work and does not wait
        for the work still running: its threads are left to the process's exit."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5 if wait else 0.5)
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.batcher.close(timeout=30 if wait else 0.5)
        shutil.rmtree(self.upload_dir, ignore_errors=True)
