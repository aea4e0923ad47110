"""`cxr serve`: the model, index and VLM held in memory behind an HTTP API and a web viewer.

- `service.ServeService` does the work (library calls only: `Searcher`, `Generator`, `read_image`); it owns the
  worker pool, the batching model thread and the index that is reloaded when it changes on disk.
- `batching.EmbedBatcher` runs every forward pass of the retrieval model on one thread and lets concurrent
  requests share a pass.
- `uploads` sniffs and decodes uploaded images without leaving temporary files behind.
- `app.create_app(service)` is the thin FastAPI layer (needs the `serve` extra: fastapi, uvicorn,
  python-multipart); `static/` is the page it serves.
"""

from __future__ import annotations
