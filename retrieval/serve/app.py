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
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import UploadFile
except ImportError as e:  # an optional extra
    raise ImportError(
        f"`cxr serve` needs the serve extra ({e.name} is missing): pip install 'cxr-retrieval[serve]'"
    ) from e

from retrieval.errors import CXRError, ImageReadError, IndexError_, UsageError
from retrieval.serve.service import ServeService
from retrieval.serve.uploads import UploadError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_IMAGE_FIELD = {
    "type": "string",
    "format": "binary",
    "description": "PNG, JPEG or DICOM (at most the server's upload limit, default 50 MB)",
}
_COMMON_FIELDS = {
    "k": {"type": "integer", "minimum": 1, "default": 5},
    "target": {"type": "string", "enum": ["reports", "images"], "default": "reports"},
    "exclude_patient": {"type": "string"},
}
SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": _IMAGE_FIELD, "text": {"type": "string"}, **_COMMON_FIELDS},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {"text": {"type": "string"}, **_COMMON_FIELDS},
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": _IMAGE_FIELD,
                        "task": {"type": "string", "enum": ["report", "vqa", "classify", "identify", "ground"]},
                        "question": {"type": "string", "description": "for task vqa"},
                        "phrase": {"type": "string", "description": "for task ground, e.g. 'right lung'"},
                        "k": {"type": "integer", "minimum": 0, "default": 3},
                        "exclude_patient": {"type": "string"},
                        "exclude_study": {"type": "string"},
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


class JSON(JSONResponse):
    """JSON with non-ASCII text kept and numpy scalars converted."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, default=_plain).encode("utf-8")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


@dataclass
class Parsed:
    """A request's fields (query parameters overridden by form or JSON fields) and its image, if any."""

    fields: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None
    filename: str = "upload"
    content_type: str = ""


async def _read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (or at once by its Content-Length)."""
    too_big = UploadError(413, f"upload over the limit of {limit / 2**20:g} MB")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, limit: int) -> Parsed:
    body = await _read_limited(request, limit)
    out = Parsed(fields=dict(request.query_params))
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=32)
        except Exception as e:  # starlette raises MultiPartException / HTTPException for malformed forms
            raise UploadError(422, f"malformed form data: {getattr(e, 'detail', None) or e}") from None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    out.image = await value.read()
                    out.filename = value.filename or "upload"
                    out.content_type = value.content_type or ""
                else:
                    out.fields[key] = value
        finally:
            await form.close()
    elif ctype.startswith("application/json"):
        try:
            doc = json.loads(body or b"{}")
        except ValueError as e:
            raise UploadError(422, f"the JSON body does not parse: {e}") from None
        if not isinstance(doc, dict):
            raise UploadError(422, 'the JSON body must be an object, e.g. {"text": "pleural effusion"}')
        out.fields.update(doc)
    elif body:
        out.image = body
        out.filename = str(out.fields.pop("filename", "upload"))
        out.content_type = ctype
    return out


def _int(fields: dict, name: str, default: int) -> int:
    v = fields.get(name, default)
    bad = UsageError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise bad
    try:
        return int(v)
    except (TypeError, ValueError):
        raise bad from None


def _str(fields: dict, name: str, default: str | None = None) -> str | None:
    v = fields.get(name, default)
    if v is None or (isinstance(v, str) and v == "" and default is None):
        return default
    return str(v)


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
    limit = int(service.config.max_upload_mb * 2**20)

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

    def auth(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def pool(fn, *args, **kwargs):
        return await asyncio.wrap_future(service.run(fn, *args, **kwargs))

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

    @app.middleware("http")
    async def _page_headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers.update(PAGE_HEADERS)
        else:
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        """Liveness and the number of rows in the index being served."""
        return service.health()

    @app.get("/info", tags=["service"], dependencies=[Depends(auth)])
    async def info() -> dict:
        """Model name and fingerprint, index size and factory, VLM, versions, workers, batching counts."""
        return service.info()

    @app.post("/reload", tags=["service"], dependencies=[Depends(auth)])
    async def reload() -> dict:
        """Reopen the index folder now; queries in flight finish on the old index."""
        return await pool(service.reload, True)

    @app.post("/search", tags=["retrieval"], dependencies=[Depends(auth)], openapi_extra=SEARCH_BODY)
    async def search(request: Request) -> dict:
        """The k reports (one per study) or images most like an uploaded image or a sentence."""
        p = await _parse(request, limit)
        f = p.fields
        k, target, excl = _int(f, "k", 5), _str(f, "target", "reports"), _str(f, "exclude_patient")
        text = _str(f, "text")
        if p.image is not None and text is not None:
            raise UsageError('give either an image or {"text": "..."} (exactly one)')
        if p.image is None and text is None:
            raise UsageError('send an image (multipart field "image", or the raw bytes) or {"text": "..."}')

        def begin():
            if p.image is None:
                return service.search_begin(text=text, k=k, target=target, exclude_patient=excl)
            image = service.decode(p.image, p.filename, p.content_type)
            return service.search_begin(image=image, k=k, target=target, exclude_patient=excl, name=p.filename)

        job = await pool(begin)  # decode + preprocess in a worker thread
        await asyncio.wrap_future(job.vector)  # the model thread's batch: no worker thread held meanwhile
        return await pool(service.search_finish, job)

    @app.post("/generate", tags=["generation"], dependencies=[Depends(auth)], openapi_extra=GENERATE_BODY)
    async def generate(request: Request) -> dict:
        """The VLM's report, answer, diagnoses or boxes for an uploaded image, with the exemplars it rests on."""
        p = await _parse(request, limit)
        f = p.fields
        if p.image is None:
            raise UsageError('send an image (multipart field "image", or the raw bytes)')

        def work() -> dict:
            image = service.decode(p.image, p.filename, p.content_type)
            return service.generate(
                image,
                task=_str(f, "task", "report"),
                question=_str(f, "question"),
                phrase=_str(f, "phrase"),
                k=_int(f, "k", 3),
                exclude_patient=_str(f, "exclude_patient"),
                exclude_study=_str(f, "exclude_study"),
            )

        return await pool(work)

    @app.get("/studies/{study_id}", tags=["studies"], dependencies=[Depends(auth)])
    async def study(study_id: str) -> dict:
        """A study's report, labels and images, looked up in the index (never a file path)."""
        rec = service.study(study_id)
        if rec is None:
            raise HTTPException(404, f"no study {study_id!r} in the index")
        return rec

    @app.get(
        "/studies/{study_id}/image",
        tags=["studies"],
        dependencies=[Depends(auth)],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def study_image(
        study_id: str,
        size: int = Query(256, ge=16, le=1024, description="longer side in pixels"),
        image_id: str | None = Query(None, description="one image of the study (default: its first)"),
    ) -> Response:
        """A PNG thumbnail of the study's image, from the file the index meta names."""
        try:
            data = await pool(service.thumbnail, study_id, size, image_id)
        except ImageReadError as e:
            raise HTTPException(404, f"the image of study {study_id!r} cannot be read: {e.reason}") from None
        if data is None:
            what = f"image {image_id!r} in study {study_id!r}" if image_id else f"study {study_id!r}"
            raise HTTPException(404, f"no {what} in the index")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    return app


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
