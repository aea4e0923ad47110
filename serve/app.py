"""The FastAPI app of `cxr serve`: request parsing, auth and error statuses over `ServeService`.

Endpoints (JSON; the schema is at /openapi.json, browsable at /docs):

    POST /search             image upload (multipart field `image`, or the raw bytes) or {"text": ...};
                             k, target (reports | images), exclude_patient as fields or query parameters;
                             returns what `cxr query --json` prints
    POST /generate           image + task (report | vqa | classify | identify | ground) + question / phrase + k;
                             text, boxes, and the exemplars the prompt carried (study id, score, report, shared)
    GET  /studies/{id}       a study's report, labels and images (looked up in the index meta)
    GET  /studies/{id}/image a PNG thumbnail (?size=256, ?image_id= for one image of the study)
    GET  /health, GET /info  liveness; model, index, VLM, versions, batching counts
    POST /reload             reopen the index folder now (it is also watched for changes)
    GET  /                   the web viewer (static/), no build step

Blocking work runs in the service's worker pool, never on the event loop. A body over the upload limit is refused
with 413 while it is read (or at once from its Content-Length). With a token, every endpoint but the page, its
static files, /health and the schema needs `Authorization: Bearer TOKEN`. No CORS headers unless origins are
given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles
except ImportError as e:  # an optional extra
    raise ImportError(
        f"`cxr serve` needs the serve extra ({e.name} is missing): pip install 'cxr-retrieval[serve]'"
    ) from e

from retrieval.errors import CXRError, ImageReadError, IndexError_, UsageError
from serve.request_parsing import (
    GENERATE_BODY,
    JSON,
    SEARCH_BODY,
    int_field,
    parse_request,
    str_field,
)
from serve.service import ServeService
from serve.uploads import UploadError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    service: ServeService,
    token: str | None = None,
    cors_origins: list[str] | None = None,
    close_on_shutdown: bool = False,
) -> FastAPI:
    """The HTTP app over `service`. `token` requires `Authorization: Bearer TOKEN` on the data endpoints;
    `cors_origins` turns CORS on for those origins only (off by default). With `close_on_shutdown` the app
    closes the service when the server shuts down: uvicorn re-raises SIGTERM/SIGINT after its shutdown, so
    code after `uvicorn.run` never runs then, but the app's shutdown does."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if close_on_shutdown:
            await asyncio.to_thread(service.close)

    app = FastAPI(
        lifespan=lifespan,
        title="cxr-retrieval",
        version=service.info()["versions"].get("cxr-retrieval", "0"),
        description="Cross-modal chest X-ray retrieval and retrieval-augmented report drafting.",
        default_response_class=JSON,
    )
    app.state.service = service
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    _add_error_handlers(app)
    app.middleware("http")(_page_headers)
    app.get("/", include_in_schema=False)(_page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    auth = Depends(bearer_check(token))
    app.include_router(service_routes(service, auth))
    app.include_router(query_routes(service, auth))
    app.include_router(study_routes(service, auth))
    return app


def bearer_check(token: str | None) -> Callable[[Request], None]:
    """The dependency that refuses a request without `Authorization: Bearer TOKEN` (no check without a token)."""

    def auth(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return auth


async def in_pool(service: ServeService, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking work in the service's worker pool and await it."""
    return await asyncio.wrap_future(service.run(fn, *args, **kwargs))


def _add_error_handlers(app: FastAPI) -> None:
    """UploadError -> its status, UsageError -> 422, IndexError_ -> 409, any other CXRError -> 500."""

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, e: UploadError):
        return JSON({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(UsageError)
    async def _usage_error(_: Request, e: UsageError):
        return JSON({"detail": str(e)}, status_code=422)

    @app.exception_handler(IndexError_)
    async def _index_error(_: Request, e: IndexError_):
        return JSON({"detail": str(e)}, status_code=409)

    @app.exception_handler(CXRError)
    async def _cxr_error(_: Request, e: CXRError):
        log.warning("request failed: %s", e)
        return JSON({"detail": str(e)}, status_code=500)


async def _page_headers(request: Request, call_next):
    response = await call_next(request)
    if request.url.path == "/" or request.url.path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)
    else:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


async def _page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


def service_routes(service: ServeService, auth: Any) -> APIRouter:
    """GET /health (open), GET /info, POST /reload."""
    router = APIRouter(tags=["service"])

    @router.get("/health")
    async def health() -> dict:
        """Liveness and the number of rows in the index being served."""
        return service.health()

    @router.get("/info", dependencies=[auth])
    async def info() -> dict:
        """Model name and fingerprint, index size and factory, VLM, versions, workers, batching counts."""
        return service.info()

    @router.post("/reload", dependencies=[auth])
    async def reload() -> dict:
        """Reopen the index folder now; queries in flight finish on the old index."""
        return await in_pool(service, service.reload, True)

    return router


def query_routes(service: ServeService, auth: Any) -> APIRouter:
    """POST /search and POST /generate: an upload or a sentence in, bodies read under the upload limit."""
    router = APIRouter(dependencies=[auth])
    limit = int(service.config.max_upload_mb * 2**20)

    @router.post("/search", tags=["retrieval"], openapi_extra=SEARCH_BODY)
    async def search(request: Request) -> dict:
        """The k reports (one per study) or images most like an uploaded image or a sentence."""
        p = await parse_request(request, limit)
        f = p.fields
        k, target, excl = int_field(f, "k", 5), str_field(f, "target", "reports"), str_field(f, "exclude_patient")
        text = str_field(f, "text")
        if p.image is not None and text is not None:
            raise UsageError('give either an image or {"text": "..."} (exactly one)')
        if p.image is None and text is None:
            raise UsageError('send an image (multipart field "image", or the raw bytes) or {"text": "..."}')

        def begin():
            if p.image is None:
                return service.search_begin(text=text, k=k, target=target, exclude_patient=excl)
            image = service.decode(p.image, p.filename, p.content_type)
            return service.search_begin(image=image, k=k, target=target, exclude_patient=excl, name=p.filename)

        job = await in_pool(service, begin)  # decode + preprocess in a worker thread
        await asyncio.wrap_future(job.vector)  # the model thread's batch: no worker thread held meanwhile
        return await in_pool(service, service.search_finish, job)

    @router.post("/generate", tags=["generation"], openapi_extra=GENERATE_BODY)
    async def generate(request: Request) -> dict:
        """The VLM's report, answer, diagnoses or boxes for an uploaded image, with the exemplars it rests on."""
        p = await parse_request(request, limit)
        f = p.fields
        if p.image is None:
            raise UsageError('send an image (multipart field "image", or the raw bytes)')

        def work() -> dict:
            image = service.decode(p.image, p.filename, p.content_type)
            return service.generate(
                image,
                task=str_field(f, "task", "report"),
                question=str_field(f, "question"),
                phrase=str_field(f, "phrase"),
                k=int_field(f, "k", 3),
                exclude_patient=str_field(f, "exclude_patient"),
                exclude_study=str_field(f, "exclude_study"),
            )

        return await in_pool(service, work)

    return router


def study_routes(service: ServeService, auth: Any) -> APIRouter:
    """GET /studies/{id} and GET /studies/{id}/image: looked up in the index meta, never as a file path."""
    router = APIRouter(tags=["studies"], dependencies=[auth])

    @router.get("/studies/{study_id}")
    async def study(study_id: str) -> dict:
        """A study's report, labels and images, looked up in the index (never a file path)."""
        rec = service.study(study_id)
        if rec is None:
            raise HTTPException(404, f"no study {study_id!r} in the index")
        return rec

    @router.get("/studies/{study_id}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def study_image(
        study_id: str,
        size: int = Query(256, ge=16, le=1024, description="longer side in pixels"),
        image_id: str | None = Query(None, description="one image of the study (default: its first)"),
    ) -> Response:
        """A PNG thumbnail of the study's image, from the file the index meta names."""
        try:
            data = await in_pool(service, service.thumbnail, study_id, size, image_id)
        except ImageReadError as e:
            raise HTTPException(404, f"the image of study {study_id!r} cannot be read: {e.reason}") from None
        if data is None:
            what = f"image {image_id!r} in study {study_id!r}" if image_id else f"study {study_id!r}"
            raise HTTPException(404, f"no {what} in the index")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    return router


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, token: str | None) -> str | None:
    """The warning `cxr serve` prints for a non-loopback address without a token (anyone on the network could
    query the index and read its reports)."""
    if token or is_loopback(host):
        return None
    return (
        f"warning: serving on {host} without --token: anyone who can reach this address can search the index "
        "and read its reports; pass --token or bind to 127.0.0.1"
    )
