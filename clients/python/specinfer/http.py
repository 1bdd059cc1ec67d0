"""JSON and server-sent-event requests over http.client, with errors mapped to ours.

Every socket operation has a timeout, and a connection that closes early (a server that
died) raises ServerError, so no call can wait forever.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from .errors import APIError, ServerError

# Raised by http.client / socket when the peer goes away or stays silent.
_CONNECTION_ERRORS = (OSError, http.client.HTTPException)


class Endpoint:
    """A server's base URL (e.g. http://127.0.0.1:8000/v1) plus how to talk to it."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = 120.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like http://HOST:PORT/v1, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)  # applies to every socket operation

    def _headers(self) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, method: str, path: str, body: Optional[Dict[str, Any]]) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connect(self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, self.prefix + path, body=data, headers=self._headers())
            response = conn.getresponse()
        except _CONNECTION_ERRORS as e:
            conn.close()
            raise ServerError(f"{method} {self.base_url}{path} failed: {_describe(e)}") from e
        if response.status >= 400:
            try:
                raise error_from_response(response.status, _read_all(response, f"{self.base_url}{path}"))
            finally:
                conn.close()
        return conn, response

    def get_json(self, path: str) -> Any:
        conn, response = self._open("GET", path, None)
        try:
            return _parse_json(_read_all(response, f"{self.base_url}{path}"), f"{self.base_url}{path}")
        finally:
            conn.close()

    def post_sse(self, path: str, body: Dict[str, Any]) -> Iterator[Any]:
        """Sends the request at once (so a refused one raises here), then yields each
        event's JSON payload until `data: [DONE]`; an error event raises APIError."""
        where = f"{self.base_url}{path}"
        conn, response = self._open("POST", path, body)
        return _payloads(conn, response, where)


def _payloads(conn: http.client.HTTPConnection, response: http.client.HTTPResponse, where: str) -> Iterator[Any]:
    try:
        for data in sse_events(_lines(response, where)):
            if data == "[DONE]":
                return
            payload = _parse_json(data.encode(), where)
            if isinstance(payload, dict) and "error" in payload:
                raise error_from_payload(payload, None)
            yield payload
        raise ServerError(f"the stream from {where} ended without [DONE] (did the server exit?)")
    finally:
        conn.close()


def status_of(url: str, timeout: float) -> Optional[int]:
    """The HTTP status of GET url, or None when nothing answers."""
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        response.read()
        return response.status
    except _CONNECTION_ERRORS:
        return None
    finally:
        conn.close()


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (multi-line data joined by newlines), per the
    WHATWG event-stream rules: comments (':') and other fields are skipped, a blank line
    ends an event."""
    data: List[str] = []
    for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def error_from_response(status: int, raw: bytes) -> APIError:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return error_from_payload(payload, status)
    text = raw.decode(errors="replace").strip() or http.client.responses.get(status, "")
    return APIError(text, status=status)


def error_from_payload(payload: Dict[str, Any], status: Optional[int]) -> APIError:
    error = payload["error"]
    if not isinstance(error, dict):
        return APIError(str(error), status=status)
    return APIError(
        str(error.get("message", "")),
        type=error.get("type"),
        param=error.get("param"),
        code=error.get("code"),
        status=status,
    )


def _lines(response: http.client.HTTPResponse, where: str) -> Iterator[str]:
    """Decoded lines without their line ending; ends at end of stream."""
    while True:
        try:
            raw = response.readline()
        except _CONNECTION_ERRORS as e:
            raise ServerError(f"reading the stream from {where} failed: {_describe(e)}") from e
        if not raw:
            return
        yield raw.decode().rstrip("\r\n")


def _read_all(response: http.client.HTTPResponse, where: str) -> bytes:
    try:
        return response.read()
    except _CONNECTION_ERRORS as e:
        raise ServerError(f"reading the response from {where} failed: {_describe(e)}") from e


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ServerError(f"{where} sent something that is not JSON: {raw[:200]!r}") from e


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "no answer within the timeout"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed mid-response (did the server exit?)"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering (did it exit?)"
    return f"{type(e).__name__}: {e}"
