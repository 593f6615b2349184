"""``fastmdl serve``: a saved pruned model over HTTP, on :mod:`aiohttp`.

Requests are handed one by one to a :class:`fastmdl.serve.Engine`, which batches
whatever arrives together into one pass of the model, so many concurrent clients
cost about what one batch costs. aiohttp is an optional dependency
(``pip install aiohttp``); it is imported only when a server is built.

Endpoints
---------

``POST /v1/predict``
    One image and its domain id; the answer holds only that domain's logits::

        curl -s localhost:8000/v1/predict -H 'Content-Type: application/json' \\
             -d '{"domain": 1, "image": [[[0.1, 0.2, ...], ...], ...]}'
        {"domain": 1, "logits": [0.53, -1.2], "class": 0}

    The JSON ``image`` is a nested list of numbers of shape (C, H, W): C the
    model's input channels, H and W any size >= 1 (the model's ``input_size``, which
    ``/health`` reports, is the size it was trained at; a size the model cannot run,
    e.g. smaller than a kernel, is answered 500 with the model's error). Requests
    of one size are batched together. The image may instead be sent as raw
    little-endian float32 bytes in C order, with the domain in the query string,
    and its height and width too when they are not the model's ``input_size``::

        curl -s 'localhost:8000/v1/predict?domain=1&height=32&width=32' \\
             -H 'Content-Type: application/octet-stream' --data-binary @image.f32

    An image of any size is accepted as long as its body is within
    ``max_body_bytes`` (by default room for the model's ``input_size`` as JSON,
    plus 1 MiB; raise it with ``--max-body-mb``, or :func:`make_app`'s
    ``max_body_bytes``). An engine built with an explicit ``input_shape`` accepts
    that shape only.

    Errors carry ``{"error": "<what is wrong and what was expected>"}``: 400 for a
    body that is not the expected JSON or a field of the wrong type (a boolean
    pixel included), 422 for a well-formed request the model cannot take (image
    not (C, H, W) or of another channel count, which the error names; domain out
    of range; NaN or infinite pixels), 413 for a body over
    ``max_body_bytes``, 408 for a body that does not arrive within
    ``body_timeout_s``, 503 with ``Retry-After`` when the engine's queue is full or
    it is shutting down (503 without it once the engine has failed), 500 when the
    model itself fails. Unknown paths answer 404 and wrong methods 405, also in
    JSON; so do requests aiohttp cannot parse (a bad request line, a header line
    over 8190 bytes: 400) when the app runs under :func:`make_runner`, as
    ``fastmdl serve`` does. A client that disconnects before its body has arrived
    gets no answer: it is counted in ``/metrics`` as ``client_disconnects`` and
    logged in one line at INFO.

``GET /health``
    ``{"status": "ok", "num_domains": 3, "num_classes": [5, 2, 7], "input_shape":
    [3, 8, 8], "channels": 3, "fixed_input_shape": false, ...}``: ``input_shape``
    is the model's nominal input size; images of other sizes are accepted unless
    ``fixed_input_shape``. ``curl -s localhost:8000/health``. Once the engine has
    failed (a thread of it died), 503 ``{"status": "failed", "error": ...}``.

``GET /metrics``
    The engine's :meth:`~fastmdl.serve.Engine.stats` (throughput, latency
    percentiles, the batch-size histogram), counts of HTTP answers by status and
    of client disconnects, as JSON; in the Prometheus text format with
    ``Accept: text/plain`` or ``?format=prometheus``:
    ``curl -s 'localhost:8000/metrics?format=prometheus'``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import math
import signal
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .serve import Engine, EngineClosed, EngineFailed, Overloaded

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

__all__ = ["make_app", "make_runner", "serve", "default_max_body_bytes", "require_aiohttp",
           "INSTALL_HINT", "DEFAULT_BODY_TIMEOUT_S"]

# fastmdl is not on PyPI, so its [serve] extra is only reachable from a checkout.
INSTALL_HINT = "pip install aiohttp (or pip install '.[serve]' in fastmdl's checkout)"
PREDICT, HEALTH, METRICS = "/v1/predict", "/health", "/metrics"
_ENDPOINTS = f"POST {PREDICT}, GET {HEALTH}, GET {METRICS}"
# Decoding a large JSON image takes milliseconds of pure Python; beyond this size
# it runs on a worker thread so the event loop keeps accepting other requests.
_OFFLOAD_BYTES = 1 << 16
_RETRY_AFTER_S = "1"
# Time a client has to send a request's body once its headers are in: enough for a
# 3x224x224 image as JSON (~5 MB) over a 1.5 Mbit/s link. A slower client (or one
# that stopped sending) gets 408 instead of holding a connection and handler forever.
DEFAULT_BODY_TIMEOUT_S = 30.0
_log = logging.getLogger("fastmdl.server")
# Each app of make_app -> its counts of answers by status (weak: apps come and go).
_STATUS_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_dumps = functools.partial(json.dumps, allow_nan=False)  # strict JSON: never NaN/Infinity


def require_aiohttp():
    """aiohttp.web, or an ImportError that says how to get it."""
    try:
        import aiohttp  # noqa: F401
        from aiohttp import web
    except ImportError as e:
        raise ImportError(f"the fastmdl HTTP server needs aiohttp: {INSTALL_HINT}") from e
    return web


def default_max_body_bytes(input_shape: Sequence[int]) -> int:
    """The body limit :func:`make_app` uses by default: room for one image of
    ``input_shape`` written as JSON (up to 32 characters per value), plus 1 MiB."""
    return 32 * math.prod(input_shape) + (1 << 20)


class _Reject(Exception):
    """A request answered with an error status, never an internal failure;
    ``close``: the connection is closed after the answer."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None,
                 close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.close = close


class _ClientGone(Exception):
    """The client disconnected before its request body had arrived."""


def make_app(engine: Engine, *, max_body_bytes: Optional[int] = None,
             body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> "web.Application":
    """An :class:`aiohttp.web.Application` that answers predictions through ``engine``.

    Args:
        engine: a running :class:`fastmdl.serve.Engine`; the caller owns it (the app
            never closes it) and must keep it open while the app serves.
        max_body_bytes: the largest request body accepted, larger ones get 413
            (default :func:`default_max_body_bytes` of the engine's nominal input
            shape; raise it to serve images much larger than that).
        body_timeout_s: seconds a request's body may take to arrive, counted from
            when the handler starts reading it; a slower one gets 408 and its
            connection is not kept alive (default :data:`DEFAULT_BODY_TIMEOUT_S`).

    The endpoints are described in this module's docstring: images of any H, W
    with the engine's channels are accepted, or only ``engine.input_shape`` when
    the engine was built with it (``engine.fixed_shape``). Run the app with
    :func:`make_runner` to have requests aiohttp cannot parse answered in JSON too.
    Raises ValueError for an engine with no nominal input shape (a model without
    ``input_size``, and no ``input_shape``): the server needs its channels.
    """
    web = require_aiohttp()
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be a fastmdl.serve.Engine, got {type(engine).__name__}")
    if engine.input_shape is None:
        raise ValueError("engine must know its input shape: its model has no input_size; "
                         "build the Engine with input_shape=(C, H, W)")
    shape = tuple(engine.input_shape)
    channels, fixed = shape[0], engine.fixed_shape
    # What "image" must be, for the error messages.
    expected = (f"(C, H, W) = {shape}" if fixed
                else f"(C, H, W) with C = {channels} channels and any H, W >= 1")
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(shape)
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) \
            or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) \
            or not 0 < body_timeout_s < math.inf:
        raise ValueError(f"body_timeout_s must be a finite number > 0, got {body_timeout_s!r}")
    num_domains = engine.num_domains
    classes = getattr(engine.model, "num_classes", None)
    num_classes = [int(k) for k in classes] if classes is not None else None
    binary_bytes = 4 * math.prod(shape)  # at the nominal shape
    binary_form = (f"{binary_bytes} bytes of little-endian float32 (shape {shape}"
                   + (")" if fixed else "; another H, W with ?height=H&width=W)"))
    domains = f"an int in [0, {num_domains})"
    json_form = (f'{{"domain": <int in [0, {num_domains})>, "image": <nested list of numbers '
                 f'of shape {expected}>}}')
    status_counts: collections.Counter = collections.Counter()
    disconnects = [0]  # clients gone before their body arrived: never answered
    started = time.time()

    def reply(payload: Any, status: int = 200, headers: Optional[Dict[str, str]] = None):
        return web.json_response(payload, status=status, headers=headers, dumps=_dumps)

    @web.middleware
    async def errors_as_json(request, handler):
        # Every answer, aiohttp's own 404/405/413 included, is JSON and counted.
        try:
            response = await handler(request)
        except _Reject as e:
            response = reply({"error": e.message}, e.status, e.headers)
            if e.close:
                response.force_close()
        except _ClientGone:
            # Nobody to answer: one line and a count, not a 500 and its traceback.
            disconnects[0] += 1
            _log.info("fastmdl.server: client %s disconnected before the body of %s %s "
                      "arrived (Content-Length: %s)", request.remote, request.method,
                      request.path, request.content_length)
            return web.Response(status=400)  # aiohttp drops it: the connection is gone
        except web.HTTPException as e:
            if e.status < 400:
                status_counts[e.status] += 1
                raise
            response = reply({"error": _http_error_message(e, request)}, e.status,
                             _kept_headers(e))
        except Exception as e:
            _log.exception("fastmdl.server: %s %s failed", request.method, request.path)
            response = reply({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        status_counts[response.status] += 1
        return response

    def _http_error_message(e, request) -> str:
        if e.status == 404:
            return f"no endpoint at {request.path}; the endpoints are {_ENDPOINTS}"
        if e.status == 405:
            allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
            return f"method {request.method} is not allowed on {request.path}; use {allowed}"
        if e.status == 413:
            return (f"request body is larger than max_body_bytes={max_body_bytes} bytes; send "
                    f"one image (as binary: {binary_form})")
        return e.reason if not e.text or e.text.startswith(f"{e.status}:") else e.text

    async def read_body(request) -> bytes:
        # Refuse on the declared length before reading anything; aiohttp's
        # client_max_size still guards chunked bodies with no declared length.
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_body_bytes,
                                                actual_size=request.content_length)
        try:
            return await asyncio.wait_for(request.read(), body_timeout_s)
        except asyncio.TimeoutError:
            raise _Reject(408, f"the request body did not arrive within body_timeout_s="
                               f"{body_timeout_s:g} seconds", close=True) from None
        except ConnectionError:  # aiohttp's "Connection lost"
            raise _ClientGone() from None
        except web.RequestPayloadError as e:  # e.g. not the gzip its Content-Encoding says
            if request.transport is None or request.transport.is_closing():
                raise _ClientGone() from None
            raise _Reject(400, f"the request body could not be read: {_one_line(str(e))}",
                          close=True) from None

    def refuse_booleans(body: bytes, image: list) -> None:
        # torch.tensor reads true/false as 1.0/0.0; JSON booleans are not pixels.
        # A scan of the bytes (at C speed) spares the walk of the image the usual
        # body, which holds no boolean at all.
        if not _may_hold_booleans(body):
            return
        found = _first_boolean(image)
        if found is not None:
            where, value = found
            raise _Reject(400, f'"{where}" must be a number, got a boolean {_short(value)}; '
                               f'"image" is a nested list of numbers of shape {expected}')

    def decode_json(body: bytes) -> Tuple[torch.Tensor, int]:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            where = f" ({e.msg} at line {e.lineno} column {e.colno})" \
                if isinstance(e, json.JSONDecodeError) else ""
            raise _Reject(400, f"body is not valid JSON{where}: send {json_form} with "
                               f"Content-Type: application/json, or the image as "
                               f"{binary_form} with Content-Type: application/octet-stream "
                               f"and ?domain=K")
        if not isinstance(data, dict):
            raise _Reject(400, f"body must be a JSON object {json_form}, "
                               f"got {_json_type(data)}")
        if "domain" not in data:
            raise _Reject(400, f'"domain" is missing: expected {domains}')
        domain = data["domain"]
        if type(domain) is not int:
            raise _Reject(400, f'"domain" must be {domains}, got {_json_type(domain)} '
                               f'{_short(domain)}')
        if "image" not in data:
            raise _Reject(400, f'"image" is missing: expected a nested list of numbers of '
                               f'shape {expected}')
        image = data["image"]
        if not isinstance(image, list):
            raise _Reject(400, f'"image" must be a nested list of numbers of shape {expected}, '
                               f'got {_json_type(image)}')
        refuse_booleans(body, image)
        try:
            x = torch.tensor(image, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise _image_problem(image, expected, e) from None
        return x, domain

    def decode_binary(request, body: bytes) -> Tuple[torch.Tensor, int]:
        raw = request.query.get("domain")
        if raw is None:
            raise _Reject(400, f'query parameter "domain" is missing: with Content-Type: '
                               f'application/octet-stream send ?domain=K, K {domains}')
        try:
            domain = int(raw, 10)
        except ValueError:
            raise _Reject(400, f'query parameter "domain" must be {domains}, '
                               f'got {_short(raw)}') from None
        # The image's size: the model's own unless the query says otherwise.
        size = (channels, query_size(request, "height", shape[1]),
                query_size(request, "width", shape[2]))
        want = 4 * math.prod(size)
        if len(body) != want:
            sizes = "" if fixed else f"; H and W from ?height=H&width=W, default {shape[1:]}"
            raise _Reject(422, f"binary body must be {want} bytes (little-endian float32 "
                               f"of shape (C, H, W) = {size}, C order{sizes}), "
                               f"got {len(body)} bytes")
        # "<f4" reads little-endian on any host; astype copies into a writable array.
        x = torch.from_numpy(np.frombuffer(body, dtype="<f4").astype(np.float32)).reshape(size)
        return x, domain

    def query_size(request, name: str, default: int) -> int:
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            value = 0
        if value < 1:
            raise _Reject(400, f'query parameter "{name}" must be a positive int, '
                               f'got {_short(raw)}')
        return value

    def check_shape(x: torch.Tensor) -> None:
        got = tuple(x.shape)
        if len(got) == 3 and got[0] != channels:  # the likeliest mistake: say it plainly
            raise _Reject(422, f'"image" must have {channels} channels, got {got[0]} '
                               f'(its shape is {got}; expected {expected})')
        if not engine.accepts(got):
            raise _Reject(422, f'"image" must have shape {expected}, got {got}')

    def decode(request, body: bytes) -> Tuple[torch.Tensor, int]:
        # Binary only when declared: aiohttp reports a missing Content-Type as
        # octet-stream, and a client that names no type most likely sent JSON.
        if "Content-Type" in request.headers \
                and request.content_type == "application/octet-stream":
            x, domain = decode_binary(request, body)
        else:  # application/json, or whatever curl -d claims: the body decides
            x, domain = decode_json(body)
        if not 0 <= domain < num_domains:
            raise _Reject(422, f'"domain" {domain} is out of range: expected {domains}')
        check_shape(x)
        x = x.to(engine.dtype)
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise _Reject(422, f'"image" holds {bad} non-finite value(s) (NaN or +-Infinity, or '
                               f'too large for {str(engine.dtype).removeprefix("torch.")}); '
                               f'every pixel must be a finite number')
        return x, domain

    async def predict(request):
        body = await read_body(request)
        if len(body) > _OFFLOAD_BYTES:
            x, domain = await asyncio.get_running_loop().run_in_executor(
                None, decode, request, body)
        else:
            x, domain = decode(request, body)
        try:
            future = engine.submit(x, domain)
        except Overloaded as e:
            raise _Reject(503, f"server overloaded ({e}); retry later",
                          {"Retry-After": _RETRY_AFTER_S}) from None
        except EngineFailed as e:
            raise _Reject(503, f"server cannot serve: {e}") from None
        except EngineClosed:
            raise _Reject(503, "server is shutting down; retry later",
                          {"Retry-After": _RETRY_AFTER_S}) from None
        try:
            row = await asyncio.wrap_future(future)
        except EngineFailed as e:
            raise _Reject(503, f"server cannot serve: {e}") from None
        except Exception as e:  # decode() checked all Engine.submit checks: the model failed
            _log.error("fastmdl.server: the model failed: %s: %s", type(e).__name__, e)
            raise _Reject(500, f"the model failed on this request: {type(e).__name__}: {e}") \
                from None
        logits = row.reshape(-1)
        if num_classes is not None:
            logits = logits[:num_classes[domain]]
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise _Reject(500, f"the model produced non-finite logits for domain {domain}")
        return reply({"domain": domain, "logits": logits.tolist(),
                      "class": int(torch.argmax(logits))})

    async def health(request):
        failure = engine.failure
        if failure is not None:
            return reply({"status": "failed", "error": failure}, 503)
        return reply({"status": "ok", "num_domains": num_domains, "num_classes": num_classes,
                      "input_shape": list(shape), "channels": channels,
                      "fixed_input_shape": fixed, "dtype": str(engine.dtype),
                      "device": str(engine.device), "max_batch_size": engine.max_batch_size,
                      "max_body_bytes": max_body_bytes})

    def metrics_snapshot() -> dict:
        return {**engine.stats(), "uptime_s": time.time() - started,
                "http_requests": {str(k): v for k, v in sorted(status_counts.items())},
                "client_disconnects": disconnects[0]}

    async def metrics(request):
        fmt = request.query.get("format")
        accept = request.headers.get("Accept", "")
        prometheus = fmt == "prometheus" or (
            fmt is None and "text/plain" in accept and "application/json" not in accept)
        snapshot = metrics_snapshot()
        if not prometheus:
            return reply(snapshot)
        return web.Response(body=_prometheus(snapshot).encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors_as_json])
    # For make_runner: where aiohttp's own answers to unparsable requests are counted.
    _STATUS_COUNTS[app] = status_counts
    app.router.add_post(PREDICT, predict)
    app.router.add_get(HEALTH, health)
    app.router.add_get(METRICS, metrics)
    return app


def make_runner(app: "web.Application", **kwargs) -> "web.AppRunner":
    """An :class:`aiohttp.web.AppRunner` for ``app`` (from :func:`make_app`) that
    also answers the requests aiohttp cannot parse (a bad request line, a header
    line over 8190 bytes, ...) in JSON, ``{"error": "malformed HTTP request: ..."}``
    with aiohttp's status (400), where a plain ``AppRunner`` answers in text. Each
    is counted in ``/metrics`` by status and logged in one line at INFO. The
    keyword arguments go to ``AppRunner``."""
    return _json_error_runner()(app, **kwargs)


@functools.lru_cache(maxsize=None)
def _json_error_runner():
    """The runner class behind :func:`make_runner`, made on first use (aiohttp is
    optional). aiohttp answers a request it cannot parse from its connection
    handler (``RequestHandler.handle_error``), before any middleware, and neither
    ``AppRunner`` nor ``Application`` has a setting for that class: this runner
    turns the server it builds into one whose connection handlers answer in JSON."""
    web = require_aiohttp()
    from aiohttp.web_protocol import RequestHandler

    class JsonErrorProtocol(RequestHandler):
        __slots__ = ("fastmdl_counts",)

        def handle_error(self, request, status=500, exc=None, message=None):
            if request.writer.output_size > 0:  # as aiohttp: too late for an answer
                raise ConnectionError("Response is sent already, cannot send another "
                                      "response with the error message")
            if status >= 500:
                _log.error("fastmdl.server: internal error on a request from %s",
                           request.remote, exc_info=exc)
                text = f"internal error ({status})"
            else:
                detail = getattr(exc, "message", None) or message or str(exc or status)
                text = "malformed HTTP request: " + _one_line(str(detail))
                _log.info("fastmdl.server: %s from %s", text, request.remote)
            counts = getattr(self, "fastmdl_counts", None)
            if counts is not None:
                counts[status] += 1
            response = web.json_response({"error": text}, status=status, dumps=_dumps)
            response.force_close()
            return response

    class JsonErrorServer(web.Server):
        fastmdl_counts = None

        def __call__(self):
            try:  # what web.Server.__call__ does, with the subclass
                protocol = JsonErrorProtocol(self, loop=self._loop, **self._kwargs)
            except (AttributeError, TypeError):  # another aiohttp: its own handler
                return super().__call__()
            protocol.fastmdl_counts = self.fastmdl_counts
            return protocol

    class JsonErrorRunner(web.AppRunner):
        async def _make_server(self):
            server = await super()._make_server()
            server.__class__ = JsonErrorServer  # same state, our protocol factory
            server.fastmdl_counts = _STATUS_COUNTS.get(self.app)
            return server

    return JsonErrorRunner


def _one_line(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def _may_hold_booleans(body: bytes) -> bool:
    """Whether the JSON ``body`` has a ``true`` or ``false`` anywhere (also in a
    string: a cheap over-approximation). json.loads also reads UTF-16 and UTF-32
    bodies: those are scanned decoded."""
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        body = body.decode(encoding, "replace").encode()
    return b"true" in body or b"false" in body


def _first_boolean(image: list) -> Optional[Tuple[str, bool]]:
    """(where, value) of a boolean in the nested list ``image``, or None."""
    stack: List[Tuple[str, list]] = [("image", image)]
    while stack:
        where, values = stack.pop()
        for i, v in enumerate(values):
            if type(v) is bool:
                return f"{where}[{i}]", v
        stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(values)))
                     if isinstance(v, list))
    return None


def _kept_headers(e) -> Dict[str, str]:
    return {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an int", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 40) -> str:
    text = json.dumps(v)
    return text if len(text) <= n else text[:n] + "..."


def _image_problem(image: list, expected: str, error: Exception) -> _Reject:
    """Why torch could not read ``image``: the first value that is not a number
    (400), else the first place where it is ragged (422). ``expected`` says what
    shape the image must have."""
    stack: List[Tuple[str, Any]] = [("image", image)]
    seen_shape: Dict[int, Tuple[str, int]] = {}
    while stack:
        where, v = stack.pop()
        depth = where.count("[")
        if isinstance(v, list):
            if depth in seen_shape and seen_shape[depth][1] != len(v):
                other, n = seen_shape[depth]
                return _Reject(422, f'"image" must have shape {expected}, but it is '
                                    f'ragged: {where} has {len(v)} entries and {other} has {n}')
            seen_shape.setdefault(depth, (where, len(v)))
            stack.extend((f"{where}[{i}]", u) for i, u in reversed(list(enumerate(v))))
        elif type(v) not in (int, float):
            return _Reject(400, f'"{where}" must be a number, got {_json_type(v)} {_short(v)}; '
                                f'"image" is a nested list of numbers of shape {expected}')
    return _Reject(422, f'"image" cannot be read as float32 of shape {expected}: {error}')


def _prometheus(m: dict) -> str:
    """``m`` (from the /metrics handler) in the Prometheus text exposition format."""
    lines: List[str] = []

    def family(name: str, kind: str, help_text: str, samples):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            if value is None:
                continue
            label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{name}{label_text} {_number(value)}")

    family("fastmdl_requests_served_total", "counter", "Requests the engine answered.",
           [((), m["served"])])
    family("fastmdl_requests_failed_total", "counter",
           "Requests the engine failed (refused input or a model error).", [((), m["failed"])])
    family("fastmdl_queue_length", "gauge", "Accepted requests not yet batched.",
           [((), m["queued"])])
    family("fastmdl_throughput_requests_per_second", "gauge",
           "Requests answered per second, from the first request to the last answer.",
           [((), m["throughput"])])
    lat = m["latency_ms"]
    family("fastmdl_latency_seconds", "gauge",
           "Submit-to-answer latency percentiles over the last 100k requests.",
           [((("quantile", "0.5"),), None if lat["p50"] is None else lat["p50"] / 1e3),
            ((("quantile", "0.99"),), None if lat["p99"] is None else lat["p99"] / 1e3)])
    family("fastmdl_batches_total", "counter", "Batches run, by number of requests in them.",
           [((("size", str(k)),), v) for k, v in m["batch_sizes"].items()])
    family("fastmdl_http_requests_total", "counter", "HTTP requests answered, by status code.",
           [((("code", k),), v) for k, v in m["http_requests"].items()])
    family("fastmdl_http_client_disconnects_total", "counter",
           "Clients that disconnected before their request body arrived (not answered).",
           [((), m["client_disconnects"])])
    family("fastmdl_uptime_seconds", "gauge", "Seconds since the server started.",
           [((), m["uptime_s"])])
    return "\n".join(lines) + "\n"


def _number(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("NaN" if v != v else ("+Inf" if v > 0 else "-Inf"))
    return str(int(v))


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, *,
          device: Optional[str] = None, max_batch_size: int = 64, max_delay_ms: float = 2.0,
          max_queue: int = 4096, max_body_bytes: Optional[int] = None,
          body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
    """Serve the model saved at ``model_path`` (by :func:`fastmdl.save`) on
    ``http://host:port`` until SIGINT or SIGTERM.

    ``port=0`` lets the OS pick a free port. Once the socket listens, one line
    ``fastmdl: serving <model_path> on http://HOST:PORT`` (the real port) is printed
    to stdout. On the way out the server stops accepting connections, answers every
    request already accepted, then closes the engine.

    The remaining arguments go to :class:`fastmdl.serve.Engine` (``device`` default:
    CPU) and :func:`make_app`; the app runs under :func:`make_runner`. Raises
    ``ImportError`` without aiohttp, ``OSError`` or ``ValueError`` for a missing or
    invalid model file, a bad device or a port that cannot be bound.
    """
    from .serialize import load

    web = require_aiohttp()
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device {device!r} is not a device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} is not available: no CUDA device here")
    model = load(model_path)
    engine = Engine(model, device=device, max_batch_size=max_batch_size,
                    max_delay_ms=max_delay_ms, max_queue=max_queue)
    try:
        app = make_app(engine, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
        asyncio.run(_run(web, app, model_path, host, port))
    finally:
        engine.close()


async def _run(web, app, model_path: str, host: str, port: int) -> None:
    runner = make_runner(app, access_log=None, shutdown_timeout=30.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        # Printed only once the handlers are in place: whoever reads this line may
        # send SIGINT at once and must get the graceful shutdown.
        print(f"fastmdl: serving {model_path} on http://{shown}:{bound_port}", flush=True)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
    finally:
        # Stops listening, then waits for in-flight handlers; the engine they wait
        # on is closed only after this, by serve().
        await runner.cleanup()
    print("fastmdl: stopped", file=sys.stderr, flush=True)
