"""The one error shape every answer uses: ``{"statusCode": <code>, "errors": [...]}``."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONBody(Response):
    """A JSON answer serialized by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """An answer that is not a success; ``extra`` adds keys beside ``statusCode`` and ``errors``."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message or status)
        self.status = status
        self.errors = errors if errors is not None else [{"message": message}]
        self.headers = headers
        self.extra = extra or {}

    def response(self) -> JSONBody:
        return error_response(self.status, self.errors, headers=self.headers, extra=self.extra)


def error_response(
    status: int,
    errors: list[dict[str, Any]],
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONBody:
    return JSONBody({"statusCode": status, "errors": errors, **(extra or {})}, status, headers=headers)


UNAUTHORIZED = "Unauthorized"
UNEXPECTED = "Unexpected error"
