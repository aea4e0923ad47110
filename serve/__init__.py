"""`cxr serve`: the model, index and VLM held in memory behind an HTTP API and a web viewer.

- `service.ServeService` does the work (library calls only: `Searcher`, `Generator`, `read_image`); it owns the
  worker pool, the batching model thread and the index that is reloaded when it changes on disk.
- `batching.EmbedBatcher` runs every forward pass of the retrieval model on one thread and lets concurrent
  requests share a pass.
- `uploads` sniffs and decodes uploaded images without leaving temporary files behind, refusing from the
  header alone those over the pixel or decode-memory limits (`settings.ServeConfig`).
- `web_guard` (Host allow-list, cross-site posts), `redaction` (no server path in a response) and `connections`
  (deadlines on request heads; uvicorn's timeouts) bound what the server answers and reveals.
- `app.create_app(service)` is the thin FastAPI layer (needs the `serve` extra: fastapi, uvicorn,
  python-multipart); `static/` is the page it serves.
"""

from __future__ import annotations
