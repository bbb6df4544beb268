"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loom.errors import CompatibilityError, IntegrityError, LoomError, NotFoundError, RefError

log = logging.getLogger("loom.serve")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def server_error(message: str, code: str, exc: BaseException) -> APIError:
    """A 500 that tells the client a request id to quote and nothing of the server's internals
    (exception text, paths): the full detail goes to the server log under the same id."""
    request_id = f"req_{uuid.uuid4().hex[:16]}"
    log.error("request %s failed (%s)", request_id, code, exc_info=exc)
    return APIError(
        500,
        f"{message} (request id {request_id})",
        "server_error",
        code,
        headers={"X-Request-Id": request_id},
    )


def from_loom(exc: LoomError, param: str | None = None) -> APIError:
    """A library error as an API error: unknown refs are 404, a damaged store the server's 500,
    everything else the caller's 400."""
    if isinstance(exc, IntegrityError):  # not the caller's fault, and retrying will not help
        return server_error(
            "the server's model store is damaged: an operator should run 'loom store verify' on it "
            "and republish or restore what it reports",
            "store_damaged",
            exc,
        )
    if isinstance(exc, NotFoundError | RefError):
        return APIError(404, str(exc), "invalid_request_error", "model_not_found", param or "model")
    if isinstance(exc, CompatibilityError):
        return APIError(400, str(exc), "invalid_request_error", "incompatible_adapter", param or "model")
    return APIError(400, str(exc), "invalid_request_error", None, param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LoomError)
    async def _loom(_: Request, exc: LoomError) -> JSONResponse:
        return from_loom(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = []
        for part in (
            first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ())
        ):
            if not (isinstance(part, int) or str(part).isidentifier()):
                break  # pydantic's union-member tags ("constrained-str") are not parameter names
            loc.append(str(part))
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid value"))
        if first.get("type") == "extra_forbidden":
            msg = f"unsupported parameter {param!r}; remove it (see GET /info for what this server supports)"
        elif param:
            msg = f"{param}: {msg}"
        return APIError(400, msg, "invalid_request_error", str(first.get("type")), param).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers) if exc.headers else None
        return APIError(exc.status_code, str(exc.detail), type_, None, None, headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return server_error(
            "internal server error; the server log has the details under this request id",
            "internal_error",
            exc,
        ).response()
