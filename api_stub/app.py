"""The receiver application: routes plus handlers that keep every answer in the contract's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from api_stub.errors import UNEXPECTED, ApiError, JSONBody, error_response
from api_stub.routes import router
from worker.config import configure_logging
from worker.tasks import keep_freed_memory, tune_garbage_collector

log = logging.getLogger(__name__)


async def _api_error(_request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(_request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, HTTPException)
    messages = {404: "Not found", 405: "Method not allowed"}
    message = messages.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, [{"message": message}], headers=dict(exc.headers or {}))


async def _invalid_request(_request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": ".".join(str(part) for part in error["loc"][1:]), "message": error["msg"]}
        for error in exc.errors()
    ]
    return error_response(422, errors)


async def _unexpected(_request: Request, exc: Exception) -> JSONBody:
    log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
    return error_response(500, [{"message": UNEXPECTED}])


def create_app() -> FastAPI:
    app = FastAPI(
        title="clientela",
        summary="Customer master-data batch ingestion",
        version="0.1.0",
        default_response_class=JSONBody,
    )
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
    return app


def served_app() -> FastAPI:
    """The app as each process of `clientela serve` runs it: with its logging, and its memory and garbage
    collector tuned for large bodies once the app is built."""
    configure_logging()
    app = create_app()
    keep_freed_memory()
    tune_garbage_collector()
    return app
