"""HTTP glue between the FastAPI ingress and the sampler: parse, submit, shape the response.

Kept out of ``serve/app.py`` so the ingress routes stay one-liners and the response format lives
in one place. Error bodies are always JSON: ``{"error": ..., "errors": [{"field", "message"}]}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from svg_ray.serving.images import b64
from svg_ray.serving.sampler import JobResult
from svg_ray.serving.schema import GenerationJob, Limits, RequestError, parse_generate

log = logging.getLogger(__name__)


def error_response(err: RequestError) -> JSONResponse:
    """4xx JSON naming the offending fields."""
    return JSONResponse(err.body(), status_code=err.status)


def unavailable_response(message: str, retry_after_s: int = 1) -> JSONResponse:
    """503 + Retry-After: queues full (Serve back-pressure) or the replica died mid-request."""
    return JSONResponse(
        {"error": "unavailable", "errors": [{"field": "body", "message": message}]},
        status_code=503,
        headers={"Retry-After": str(retry_after_s)},
    )


def generate_response(result: JobResult, total_s: float, output: str) -> Response:
    """JSON with base64 PNGs, or one image/png (a grid for several images) with X- headers."""
    timing: dict[str, Any] = {"total_s": round(total_s, 4), **result.timing()}
    if output == "png":
        return Response(
            content=result.pngs[0],
            media_type="image/png",
            headers={
                "X-Seed": str(result.seeds[0]),
                "X-Images": str(len(result.labels)),
                "X-Total-S": str(timing["total_s"]),
                "X-Sample-S": str(timing["sample_s"]),
                "X-Decode-S": str(timing["decode_s"]),
                "X-Batch-Requests": str(result.batch_requests),
                "Cache-Control": "no-store",
            },
        )
    return JSONResponse(
        {
            "images": [b64(p) for p in result.pngs],
            "media_type": "image/png",
            "labels": result.labels,
            "seeds": result.seeds,
            "seed": result.seeds[0],
            "width": result.width,
            "height": result.height,
            "settings": result.settings,
            "timing": timing,
        }
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without reading them all."""
    too_big = RequestError(413, [{"field": "body", "message": f"larger than {limit} bytes"}])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def handle_generate(
    request: Request,
    limits: Limits,
    submit: Callable[[GenerationJob], Awaitable[JobResult]],
) -> Response:
    """POST /v1/generate: read and validate the body, run it through ``submit``, respond."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    t0 = time.perf_counter()
    try:
        raw = await read_body(request, limits.server.max_body_bytes)
        job = parse_generate(raw, limits)
    except RequestError as e:
        return error_response(e)
    try:
        result = await submit(job)
    except BackPressureError:
        return unavailable_response("server busy, retry")
    except RayActorError:  # Serve replaces the replica; a retry lands on a live one
        log.exception("sampler replica died during a request")
        return unavailable_response("sampler replica restarted, retry")
    except Exception:  # the client gets JSON, the log gets the traceback
        log.exception("generate failed")
        return JSONResponse({"error": "internal_error", "errors": []}, status_code=500)
    return generate_response(result, time.perf_counter() - t0, job.output)
