"""KServe v2 health and metadata (GET) through the gateway, asked of Triton's own HTTP frontend.

    GET /v2/health/live   /v2/health/ready   /v2
    GET /v2/models/{model}[/versions/{version}]   /v2/models/{model}[/versions/{version}]/ready
    GET /v2/models/reranker[/versions/{version}]/config

Where the gateway is the only public HTTP door to Triton (`triton-rerank serve`: Triton's HTTP
frontend listens on loopback, the gateway's KServe front on the public HTTP port), these are the
reads tritonclient.http makes besides inference. Each is sent on to Triton's HTTP endpoint as a
bodiless GET of the same route, the model name quoted as one path segment, and Triton's answer
(status and JSON) comes back unchanged. The ensemble's configuration is the service's contract (its
inputs, outputs and `reranker_kind`: what SCORES mean, which RerankClient.reranker_kind reads);
the steps' configurations are not forwarded. Nothing else of Triton's HTTP API is: statistics, the
repository, shared memory, trace and logging stay closed, as behind deploy/nginx.conf
(perf_analyzer reads the configuration over gRPC).

Only registered when the gateway knows Triton's HTTP address (GatewaySettings.triton_http_url).
No API key: load balancers and orchestrators probe health without one, and metadata is what any
client needs to form a request.
"""

from __future__ import annotations

import asyncio
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import urlopen

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..client.triton_io import MODEL_NAME
from .errors import RETRY_AFTER_SECONDS

# Triton's metadata answers are a few KiB; more is not an answer to pass on.
MAX_ANSWER_BYTES = 1024 * 1024
TIMEOUT_SECONDS = 5.0

router = APIRouter()


def _fetch(url: str) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET; HTTP errors are answers too."""
    try:
        with urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return response.status, response.read(MAX_ANSWER_BYTES), response.headers.get("content-type", "")
    except HTTPError as error:
        with error:
            return error.code, error.read(MAX_ANSWER_BYTES), error.headers.get("content-type", "")


async def _forward(request: Request, path: str) -> Response:
    url = f"http://{request.app.state.gateway.settings.triton_http_url}{path}"
    try:
        status, body, content_type = await asyncio.to_thread(_fetch, url)
    except (URLError, OSError) as error:
        return JSONResponse({"error": f"Triton is not reachable (restarting, or not started yet): {error}"},
                            status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})
    return Response(body, status_code=status, media_type=content_type or None)


def _model_path(request: Request) -> str:
    """/v2/models/<model>[/versions/<version>], each path parameter one quoted segment."""
    params = request.path_params
    path = f"/v2/models/{quote(params['model'], safe='')}"
    if "version" in params:
        path += f"/versions/{quote(params['version'], safe='')}"
    return path


@router.get("/v2/health/live", include_in_schema=False)
async def live(request: Request):
    return await _forward(request, "/v2/health/live")


@router.get("/v2/health/ready", include_in_schema=False)
async def ready(request: Request):
    return await _forward(request, "/v2/health/ready")


@router.get("/v2", include_in_schema=False)
async def server_metadata(request: Request):
    return await _forward(request, "/v2")


# "stats" names every model's statistics (GET /v2/models/stats), not a model: closed like the rest.
@router.get("/v2/models/{model}", include_in_schema=False)
@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, model: str):
    if model == "stats":
        return JSONResponse({"error": "model statistics are not served here"}, status_code=403)
    return await _forward(request, _model_path(request))


@router.get("/v2/models/{model}/ready", include_in_schema=False)
@router.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request):
    return await _forward(request, f"{_model_path(request)}/ready")


@router.get(f"/v2/models/{MODEL_NAME}/config", include_in_schema=False)
@router.get(f"/v2/models/{MODEL_NAME}/versions/{{version}}/config", include_in_schema=False)
async def ensemble_config(request: Request):
    return await _forward(request, f"/v2/models/{MODEL_NAME}" + (
        f"/versions/{quote(request.path_params['version'], safe='')}" if "version" in request.path_params else "")
        + "/config")
