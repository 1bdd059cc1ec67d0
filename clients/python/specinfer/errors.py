"""Exceptions raised by the client."""

from __future__ import annotations

from typing import Optional


class SpecInferError(Exception):
    """Base class of everything this package raises on purpose."""


class APIError(SpecInferError):
    """The server answered with an OpenAI-shaped error: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        message: str,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
        status: Optional[int] = None,
    ):
        super().__init__(message)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.status = status

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        status = f"{self.status} " if self.status else ""
        return f"{status}{self.type or 'error'}: {self.message}{where}"


class ServerError(SpecInferError):
    """The server could not be started or reached, timed out, or went away mid-request."""
