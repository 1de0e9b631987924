"""Exceptions of the rerank client, and how tritonclient's errors map onto them.

tritonclient reports every failure as InferenceServerException with a protocol-specific
status: "400" / "503" over HTTP, "StatusCode.INVALID_ARGUMENT" / "StatusCode.UNAVAILABLE"
over gRPC. Connection failures are InferenceServerException (gRPC) or plain OSError (HTTP).
Callers should not have to know which; they catch one of the classes below.
"""

from __future__ import annotations

import asyncio
import re

from tritonclient.utils import InferenceServerException


class RerankError(Exception):
    """Base class of everything the rerank client raises."""


class InvalidRequestError(RerankError, ValueError):
    """The server (or the client's own checks) refused the request; the message says what to change."""


class ServerUnavailableError(RerankError, ConnectionError):
    """The server cannot be reached or is overloaded (Triton UNAVAILABLE); worth retrying later."""


class RerankTimeoutError(RerankError, TimeoutError):
    """No answer within the client's timeout (the request may still be running on the server)."""


class RerankServerError(RerankError):
    """Any other server-side failure (model missing, internal error); `status` is Triton's code."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


_INVALID = {"400", "StatusCode.INVALID_ARGUMENT"}
_UNAVAILABLE = {"503", "502", "StatusCode.UNAVAILABLE"}
_TIMEOUT = {"504", "StatusCode.DEADLINE_EXCEEDED"}


def renumber_documents(message: str, offset: int) -> str:
    """Server messages name documents by their index in one request; make that the caller's index.

    The client cuts a long document list into several requests, so "document 3" of the request
    starting at document 256 is the caller's document 259.
    """
    if not offset:
        return message
    return re.sub(r"\bdocument (\d+)\b", lambda m: f"document {int(m.group(1)) + offset}", message)


def translate(error: BaseException, where: str, offset: int = 0) -> RerankError:
    """The RerankError for a tritonclient / network exception; `where` names the server."""
    if isinstance(error, RerankError):
        return error
    if isinstance(error, InferenceServerException):
        status = str(error.status()) if error.status() is not None else None
        message = renumber_documents(error.message() or str(error), offset)
        if status in _INVALID:
            return InvalidRequestError(message)
        if status in _UNAVAILABLE:
            return ServerUnavailableError(f"{where} is unavailable: {message}")
        if status in _TIMEOUT:
            return RerankTimeoutError(f"{where} did not answer in time: {message}")
        return RerankServerError(f"{where} failed the request ({status}): {message}", status)
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return RerankTimeoutError(f"{where} did not answer in time ({error!r})")
    if isinstance(error, OSError) or _is_aiohttp_connection_error(error):
        return ServerUnavailableError(f"cannot reach {where}: {error or type(error).__name__}")
    return RerankServerError(f"{where}: unexpected {type(error).__name__}: {error}")


def _is_aiohttp_connection_error(error: BaseException) -> bool:
    # aiohttp (tritonclient.http.aio) raises ServerDisconnectedError & co., which are not OSError.
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(error, aiohttp.ClientConnectionError)
