"""`cxr serve`: the HTTP API and web viewer over an index (default: the `cxr demo` work folder)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cli.options import DEVICE
from serve.settings import MAX_DECODE_MB, MAX_DECODES, MAX_PIXELS

# the defaults of what `cxr serve` bounds and reveals (`serve(limits=...)` changes any of them)
SERVE_LIMITS = {
    "allowed_hosts": [],
    "show_paths": False,
    "header_timeout": 10.0,
    "body_timeout": 60.0,
    "keep_alive": 5.0,
    "grace": 10.0,
    "max_pixels": MAX_PIXELS,
    "max_decode_mb": MAX_DECODE_MB,
    "max_decodes": MAX_DECODES,
}
# the options of those bounds
ALLOWED_HOST = typer.Option(
    None, "--allowed-host", help="Also answer this Host name (default: the bound address; '*': any)."
)
SHOW_PATHS = typer.Option(False, "--show-paths", help="Show the server's paths in responses.")
HEADER_TIMEOUT = typer.Option(
    SERVE_LIMITS["header_timeout"], "--header-timeout", min=0.1, help="Seconds for a request's head."
)
BODY_TIMEOUT = typer.Option(
    SERVE_LIMITS["body_timeout"], "--body-timeout", min=0.1, help="Seconds for a request's body."
)
KEEP_ALIVE = typer.Option(
    SERVE_LIMITS["keep_alive"], "--timeout-keep-alive", min=0.1, help="Idle seconds between requests."
)
GRACE = typer.Option(SERVE_LIMITS["grace"], "--grace", min=0, help="On SIGTERM, seconds to finish requests in flight.")
MAX_PIXELS_OPTION = typer.Option(MAX_PIXELS, "--max-pixels", min=1, help="Most pixels an upload may have.")
MAX_DECODE_MB_OPTION = typer.Option(MAX_DECODE_MB, "--max-decode-mb", min=1, help="Most memory one decode needs.")
MAX_DECODES_OPTION = typer.Option(MAX_DECODES, "--max-decodes", min=1, help="Uploads decoded at once.")


def _banner(info: dict, host: str, port: int, workers: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return (
        f"serving http://{shown}:{port}/  model {info['model']['name']}, index {info['index']['count']:,} rows "
        f"({info['index']['factory']}), VLM {'loaded' if info['vlm']['loaded'] else 'none'}, "
        f"{workers} workers" + (", bearer token required" if token else "")
    )


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
    archive_url: str | None = None,
    limits: dict | None = None,
) -> None:
    """Load everything once, then serve until interrupted (also called by `cxr demo --serve`). `limits`: the
    `SERVE_LIMITS` keys to change (hosts, paths, timeouts, pixels)."""
    import logging

    from cli.quiet import quiet_transformers
    from retrieval.errors import UsageError
    from serve.service import ServeService
    from serve.settings import ServeConfig, default_workers

    quiet_transformers()

    try:
        import uvicorn

        from serve.app import bind_warning, create_app
        from serve.connections import uvicorn_settings
        from serve.web_guard import allowed_hosts
    except ImportError as e:
        raise UsageError(f"`cxr serve` needs the serve extra: pip install 'cxr-retrieval[serve]' ({e})") from e
    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    lim = {**SERVE_LIMITS, **(limits or {})}
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
        archive_url=archive_url,
        max_pixels=lim["max_pixels"],
        max_decode_mb=lim["max_decode_mb"],
        max_decodes=lim["max_decodes"],
        show_paths=lim["show_paths"],
    )
    service = ServeService(config)
    try:
        hosts = allowed_hosts(host, lim["allowed_hosts"])
        app = create_app(service, token, cors_origins, True, hosts, lim["body_timeout"])
        print(_banner(service.info(), host, port, config.workers, token), file=sys.stderr, flush=True)
        timeouts = uvicorn_settings(lim["header_timeout"], lim["keep_alive"], lim["grace"])
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, workers=None, **timeouts)
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
    archive_url: str | None = typer.Option(
        None,
        "--archive-url",
        envvar="CXR_ARCHIVE_URL",
        help="Link each study to the archive's viewer: a URL template naming {study_instance_uid} (or another UID).",
    ),
    allowed_host: list[str] = ALLOWED_HOST,
    show_paths: bool = SHOW_PATHS,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
    grace: float = GRACE,
    max_pixels: int = MAX_PIXELS_OPTION,
    max_decode_mb: float = MAX_DECODE_MB_OPTION,
    max_decodes: int = MAX_DECODES_OPTION,
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
    guard = dict(
        allowed_hosts=allowed_host or [], show_paths=show_paths, header_timeout=header_timeout,
        body_timeout=body_timeout, keep_alive=keep_alive, grace=grace, max_pixels=max_pixels,
        max_decode_mb=max_decode_mb, max_decodes=max_decodes,
    )  # fmt: skip
    serve(
        index, None if no_vlm else vlm, model, host, port, token or os.environ.get("CXR_SERVE_TOKEN") or None,
        workers, max_batch, max_wait_ms, watch_interval, max_upload_mb, cors_origin or None, device, backend,
        nprobe, ef_search, access_log, archive_url, guard,
    )  # fmt: skip
