"""The FastAPI app of `cxr serve`: request parsing, auth and error statuses over `ServeService`.

Endpoints (JSON; the schema is at /openapi.json, browsable at /docs):

    POST /search             image upload (multipart field `image`, or the raw bytes) or {"text": ...};
                             k, target (reports | images), exclude_patient as fields or query parameters;
                             returns what `cxr query --json` prints
    POST /generate           image + task (report | vqa | classify | identify | ground | segment) + question /
                             phrase + k;
                             text, boxes, and the exemplars the prompt carried (study id, score, report, shared)
    GET  /studies/{id}       a study's report, labels and images (looked up in the index meta)
    GET  /studies/{id}/image a PNG thumbnail (?size=256, ?image_id= for one image of the study)
    GET  /health, GET /info  liveness; model, index, VLM, versions, batching counts
    POST /reload             reopen the index folder now (it is also watched for changes); takes no body
    GET  /                   the web viewer (static/), no build step
    GET  /docs               Swagger UI, from files shipped with the fastapi-offline package (no CDN)

Blocking work runs in the service's worker pool, never on the event loop. A body over the upload limit is refused
with 413 while it is read (or at once from its Content-Length), one that has not arrived within `body_timeout`
with 408. With a token, every endpoint but the page, its static files, /health and the schema needs
`Authorization: Bearer TOKEN`. No CORS headers unless origins are given. `web_guard.py` refuses foreign Host
headers and cross-site posts. Every error is one line of JSON (`{"detail": "..."}`), without the server's paths.
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
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles
    from fastapi_offline import FastAPIOffline
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from serve.connections import AnswerWhenCancelled  # uvicorn's protocol
except ImportError as e:  # an optional extra
    raise ImportError(
        f"`cxr serve` needs the serve extra ({e.name} is missing): pip install 'cxr-retrieval[serve]'"
    ) from e

from retrieval.errors import CXRError, ImageReadError, IndexError_, UsageError
from retrieval.text_limits import TextTooLong, check_query_text
from serve.request_parsing import (
    GENERATE_BODY,
    JSON,
    SEARCH_BODY,
    int_field,
    parse_request,
    read_limited,
    str_field,
)
from serve.service import ServeService
from serve.uploads import UploadError
from serve.web_guard import WebGuard

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
DOCS_STATIC = "/docs-static"  # Swagger UI's script, style sheet and icon (fastapi-offline's copies)
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
    allowed_hosts: list[str] | None = None,
    body_timeout: float | None = 60.0,
) -> FastAPI:
    """The HTTP app over `service`. `token` requires `Authorization: Bearer TOKEN` on the data endpoints;
    `cors_origins` turns CORS on for those origins only (off by default). `allowed_hosts` (see
    `web_guard.allowed_hosts`; None answers any Host) is the Host allow-list. A request body must arrive within
    `body_timeout` seconds. With `close_on_shutdown` the app closes the service when the server shuts down
    (after uvicorn's grace period, without waiting for work still running): uvicorn re-raises SIGTERM/SIGINT
    after its shutdown, so code after `uvicorn.run` never runs then, but the app's shutdown does."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if close_on_shutdown:
            await asyncio.to_thread(service.close, False)

    app = FastAPIOffline(
        redoc_url=None,
        static_url=DOCS_STATIC,
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
    _add_error_handlers(app, service)
    app.middleware("http")(_page_headers)
    app.middleware("http")(WebGuard(allowed_hosts, cors_origins or ()))
    app.add_middleware(AnswerWhenCancelled)  # added last: the outermost
    app.get("/", include_in_schema=False)(_page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    auth = Depends(bearer_check(token))
    app.include_router(service_routes(service, auth))
    app.include_router(query_routes(service, auth, body_timeout))
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


def _add_error_handlers(app: FastAPI, service: ServeService) -> None:
    """UploadError -> its status, TextTooLong -> 413, UsageError -> 422, IndexError_ -> 409, a parameter FastAPI
    refuses -> 422, HTTPException -> its status, any other error -> 500; each as one line of JSON without the
    server's paths."""

    def one_line(e: Exception | str, status: int) -> JSON:
        text = " ".join(service.redact(str(e)).split())
        return JSON({"detail": text[:2000]}, status_code=status)

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, e: UploadError):
        response = one_line(e, e.status)
        if e.status in (408, 413):  # the body was not read to its end: this connection is done
            response.headers["Connection"] = "close"
        return response

    @app.exception_handler(TextTooLong)
    async def _too_long(_: Request, e: TextTooLong):
        return one_line(e, 413)

    @app.exception_handler(UsageError)
    async def _usage_error(_: Request, e: UsageError):
        return one_line(e, 422)

    @app.exception_handler(IndexError_)
    async def _index_error(_: Request, e: IndexError_):
        return one_line(e, 409)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        response = one_line(e.detail, e.status_code)
        response.headers.update(e.headers or {})  # WWW-Authenticate, Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_: Request, e: RequestValidationError):
        said = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:])}: {err.get('msg', '')}" for err in e.errors()]
        return one_line("; ".join(said) or "invalid request", 422)

    @app.exception_handler(CXRError)
    async def _cxr_error(_: Request, e: CXRError):
        log.warning("request failed: %s", e)
        return one_line(e, 500)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception):
        log.error("request failed", exc_info=e)
        return one_line(f"internal error ({type(e).__name__}); the server log has the details", 500)


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
        """Model name and fingerprint, index size and factory, VLM, versions, workers, batching counts; a failed
        reload's error until the index folder opens again."""
        if service.reload_error is not None:
            await in_pool(service, service.retry_failed_reload)
        return service.info()

    @router.post("/reload", dependencies=[auth])
    async def reload(request: Request) -> dict:
        """Reopen the index folder now; queries in flight finish on the old index. Takes no body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_limited(request, 1024, timeout=10)
        if ctype not in ("", "application/json") or body.strip() not in (b"", b"{}"):
            raise UploadError(415, "POST /reload takes no body")
        return await in_pool(service, service.reload, True)

    return router


def query_routes(service: ServeService, auth: Any, body_timeout: float | None = None) -> APIRouter:
    """POST /search and POST /generate: an upload or a sentence in, bodies read under the upload limit and
    within `body_timeout` seconds."""
    router = APIRouter(dependencies=[auth])
    limit = int(service.config.max_upload_mb * 2**20)

    @router.post("/search", tags=["retrieval"], openapi_extra=SEARCH_BODY)
    async def search(request: Request) -> dict:
        """The k reports (one per study) or images most like an uploaded image or a sentence."""
        p = await parse_request(request, limit, body_timeout)
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
        p = await parse_request(request, limit, body_timeout)
        f = p.fields
        fields = {
            "task": str_field(f, "task", "report"),
            "question": str_field(f, "question"),
            "phrase": str_field(f, "phrase"),
            "k": int_field(f, "k", 3),
            "exclude_patient": str_field(f, "exclude_patient"),
            "exclude_study": str_field(f, "exclude_study"),
        }
        check_query_text(fields["question"], "the question")  # before any decoding
        check_query_text(fields["phrase"], "the phrase")
        if p.image is None:
            raise UsageError('send an image (multipart field "image", or the raw bytes)')

        def work() -> dict:
            image = service.decode(p.image, p.filename, p.content_type)
            return service.generate(image, **fields)

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
