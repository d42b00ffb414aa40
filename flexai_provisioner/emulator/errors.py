"""Exceptions of the emulator (self-contained: it stands in for someone else's cloud)."""

from __future__ import annotations

from typing import Any


class EmulatorError(RuntimeError):
    """The emulator cannot do its job on this machine (e.g. sshd is missing)."""


class ApiError(Exception):
    """An API error answered as ``{"error": {"code", "message", ...extra}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)
