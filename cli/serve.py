"""`cxr serve`: the HTTP API and web viewer over an index (default: the `cxr demo` work folder)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cli.options import DEVICE


def serve(
    index: Path,
    vlm: Path | None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    workers: int | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 0.0,
    watch_interval: float = 2.0,
    max_upload_mb: float = 50.0,
    cors_origins: list[str] | None = None,
    device: str = "auto",
    backend: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
    access_log: bool = False,
) -> None:
    """Load everything once, then serve until interrupted (also called by `cxr demo --serve`)."""
    import logging

    from cli.quiet import quiet_transformers
    from retrieval.errors import UsageError
    from serve.service import ServeConfig, ServeService, default_workers

    quiet_transformers()

    try:
        import uvicorn

        from serve.app import bind_warning, create_app
    except ImportError as e:
        raise UsageError(f"`cxr serve` needs the serve extra: pip install 'cxr-retrieval[serve]' ({e})") from e
    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("retrieval").setLevel(logging.INFO)  # reloads and failures; not faiss's loader chatter
    warning = bind_warning(host, token)
    if warning:
        print(warning, file=sys.stderr)
    config = ServeConfig(
        index=index,
        model=model,
        vlm=vlm,
        device=device,
        backend=backend,
        nprobe=nprobe,
        ef_search=ef_search,
        workers=workers or default_workers(),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        watch_interval=watch_interval,
        max_upload_mb=max_upload_mb,
    )
    service = ServeService(config)
    try:
        app = create_app(service, token=token, cors_origins=cors_origins, close_on_shutdown=True)
        info = service.info()
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving http://{shown}:{port}/  model {info['model']['name']}, index {info['index']['count']:,} rows "
            f"({info['index']['factory']}), VLM {'loaded' if info['vlm']['loaded'] else 'none'}, "
            f"{config.workers} workers" + (", bearer token required" if token else ""),
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, workers=None)
    finally:
        service.close()


def serve_cmd(
    index: Path = typer.Option(None, "--index", "-i", help="Index folder (default: the `cxr demo` work folder's)."),
    vlm: Path = typer.Option(
        None, "--vlm", help="VLM folder for /generate (default: the demo's, when serving the demo index)."
    ),
    no_vlm: bool = typer.Option(False, "--no-vlm", help="Serve retrieval only."),
    model: str | None = typer.Option(None, "--model", help="Model (default: the folder recorded in the index)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    token: str | None = typer.Option(
        None, "--token", envvar="CXR_SERVE_TOKEN", help="Require 'Authorization: Bearer TOKEN' (env CXR_SERVE_TOKEN)."
    ),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Worker threads (default: one per core)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most queries per forward pass (1 = no batching)."),
    max_wait_ms: float = typer.Option(0.0, "--max-wait-ms", min=0, help="Wait this long for a batch to fill."),
    watch_interval: float = typer.Option(
        2.0, "--watch-interval", min=0, help="Seconds between checks for an index changed on disk (0 = off)."
    ),
    max_upload_mb: float = typer.Option(50.0, "--max-upload-mb", help="Larger uploads get HTTP 413."),
    cors_origin: list[str] = typer.Option(None, "--cors-origin", help="Allow this origin (CORS is off by default)."),
    device: str = DEVICE,
    backend: str = typer.Option("auto", "--backend", help="auto, faiss, faiss-gpu or torch."),
    nprobe: int | None = typer.Option(None, "--nprobe", min=1, help="IVF indexes: inverted lists to visit."),
    ef_search: int | None = typer.Option(None, "--ef-search", min=1, help="HNSW indexes: search breadth."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
) -> None:
    """Serve the HTTP API and the web viewer: model, index and VLM load once, queries answer in milliseconds."""
    from index.store import has_index
    from retrieval.errors import UsageError
    from serve.demo_pipeline import DEFAULT_WORKDIR

    demo = index is None
    if demo:
        index = DEFAULT_WORKDIR / "index"
        if not has_index(index):  # the store's own test (CURRENT, or a folder written before generations)
            raise UsageError(f"no demo index at {index}: run `cxr demo` (or `make demo`) first, or pass --index")
        if vlm is None and (DEFAULT_WORKDIR / "vlm" / "vlm_config.json").exists():
            vlm = DEFAULT_WORKDIR / "vlm"
    serve(
        index,
        None if no_vlm else vlm,
        model,
        host,
        port,
        token or os.environ.get("CXR_SERVE_TOKEN") or None,
        workers,
        max_batch,
        max_wait_ms,
        watch_interval,
        max_upload_mb,
        cors_origin or None,
        device,
        backend,
        nprobe,
        ef_search,
        access_log,
    )
