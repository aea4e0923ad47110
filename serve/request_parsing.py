"""Reading the requests of `cxr serve`: a body under a byte limit, form / JSON / raw-image fields, typed
fields, the JSON response class, and the request bodies the OpenAPI schema shows for the upload endpoints."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from retrieval.errors import UsageError
from serve.uploads import UploadError

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
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    schema: dict[str, Any] = {"type": "object"}
    if required:
        schema["required"] = required
    return {"schema": {**schema, "properties": properties}}


def _request_body(content: dict) -> dict:
    return {"requestBody": {"required": True, "content": content}}


SEARCH_BODY = _request_body(
    {
        "multipart/form-data": _object({"image": _IMAGE_FIELD, "text": {"type": "string"}, **_COMMON_FIELDS}),
        "application/json": _object({"text": {"type": "string"}, **_COMMON_FIELDS}, required=["text"]),
        "image/png": _BINARY,
        "image/jpeg": _BINARY,
        "application/dicom": _BINARY,
    }
)
GENERATE_BODY = _request_body(
    {
        "multipart/form-data": _object(
            {
                "image": _IMAGE_FIELD,
                "task": {"type": "string", "enum": ["report", "vqa", "classify", "identify", "ground", "segment"]},
                "question": {"type": "string", "description": "for task vqa"},
                "phrase": {"type": "string", "description": "for task ground or segment, e.g. 'right lung'"},
                "k": {"type": "integer", "minimum": 0, "default": 3},
                "exclude_patient": {"type": "string"},
                "exclude_study": {"type": "string"},
            },
            required=["image"],
        ),
        "image/png": _BINARY,
    }
)


class JSON(JSONResponse):
    """JSON with non-ASCII text kept and numpy scalars converted."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, default=plain_json).encode("utf-8")


def plain_json(v: Any) -> Any:
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


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (or at once by its Content-Length),
    and with 408 when it has not all arrived within `timeout` seconds."""
    too_big = UploadError(413, f"upload over the limit of {limit / 2**20:g} MB")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, n = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise UploadError(408, f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(body: bytes) -> dict:
    """The JSON object of a body (empty: {}); UploadError 422 for anything else, in one line: invalid UTF-8 or
    JSON, NaN / Infinity, integers of thousands of digits, nesting deeper than Python's parser goes, or a value
    that is not an object."""
    try:
        doc = json.loads((body or b"{}").decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise UploadError(422, "the JSON body is nested too deeply") from None
    except UnicodeDecodeError:
        raise UploadError(422, "the JSON body is not UTF-8") from None
    except ValueError as e:  # JSONDecodeError, over-long integers, NaN / Infinity
        raise UploadError(422, f"the JSON body does not parse: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise UploadError(422, 'the JSON body must be an object, e.g. {"text": "pleural effusion"}')
    return doc


async def parse_request(request: Request, limit: int, timeout: float | None = None) -> Parsed:
    body = await read_limited(request, limit, timeout)
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
        out.fields.update(parse_json_object(body))
    elif body:
        out.image = body
        out.filename = str(out.fields.pop("filename", "upload"))
        out.content_type = ctype
    return out


def int_field(fields: dict, name: str, default: int) -> int:
    v = fields.get(name, default)
    bad = UsageError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise bad
    try:
        return int(v)
    except (TypeError, ValueError):
        raise bad from None


def str_field(fields: dict, name: str, default: str | None = None) -> str | None:
    v = fields.get(name, default)
    if v is None or (isinstance(v, str) and v == "" and default is None):
        return default
    if not isinstance(v, str):  # a JSON number, list or object where a string belongs
        raise UsageError(f"{name} must be a string, got {type(v).__name__}")
    return v
