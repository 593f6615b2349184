"""fastmdl.server against clients and models that misbehave, over real HTTP on
loopback: clients that disconnect or stall mid-body, bytes that are not HTTP,
booleans for pixels, an engine whose thread died. Every socket has a timeout."""

import json
import logging
import socket
import time

import pytest
import torch
from torch import nn

from fastmdl.serve import Engine
from test_serve import Gate
from test_server import TIMEOUT, LiveServer, call, predict_binary
from test_server import web  # noqa: F401 (a fixture)

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def live(web):
    server = LiveServer(web, Engine(Gate(), max_delay_ms=0), body_timeout_s=TIMEOUT)
    yield server
    server.close()


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_response(sock):
    """(status, parsed JSON body) of one HTTP/1.x response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        body += chunk
    assert headers["content-type"].startswith("application/json"), (lines, body[:200])
    return int(lines[0].split()[1]), json.loads(body)


def metrics(port):
    status, _, payload = call(port, "GET", "/metrics")
    assert status == 200
    return payload


def wait_for(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_serves(live):
    status, _, payload = predict_binary(live.port, torch.ones(Gate.input_size), 1)
    assert status == 200 and payload["logits"] == [49.0], payload


PARTIAL = (b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
           b"Content-Length: 5000\r\n\r\n" + b'{"domain": 0, "image": [[[0.5, 0.5')


def test_clients_that_disconnect_mid_body_are_counted_and_logged_in_one_line(live, caplog):
    caplog.set_level(logging.INFO)
    n = 50
    before = metrics(live.port)
    for _ in range(n):
        with connect(live.port) as sock:
            sock.sendall(PARTIAL)
    wait_for(lambda: metrics(live.port)["client_disconnects"] == before["client_disconnects"] + n,
             f"{n} client disconnects in /metrics")
    after = metrics(live.port)
    assert after["http_requests"].get("500", 0) == before["http_requests"].get("500", 0)
    gone = [r for r in caplog.records if "disconnected before the body" in r.getMessage()]
    assert len(gone) == n
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in gone)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in caplog.text
    _, _, text = call(live.port, "GET", "/metrics?format=prometheus")
    assert f"fastmdl_http_client_disconnects_total {after['client_disconnects']}" in text
    assert_serves(live)


def test_a_body_that_does_not_arrive_in_time_gets_408(web):
    live = LiveServer(web, Engine(Gate(), max_delay_ms=0), body_timeout_s=0.5)
    try:
        with connect(live.port) as sock:
            sock.sendall(PARTIAL)  # then nothing more
            status, payload = read_response(sock)
        assert status == 408 and "body_timeout_s=0.5" in payload["error"], payload
        assert metrics(live.port)["http_requests"]["408"] == 1
        assert_serves(live)
    finally:
        live.close()


@pytest.mark.parametrize("raw, words", [
    (b"GARBAGE\r\n\r\n", "Invalid method"),
    (b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
     "Got more than 8190 bytes"),
    (b"GET /health HTTP/9.9 junk\r\n\r\n", "malformed HTTP request"),
], ids=["bad request line", "100 KB header", "bad version"])
def test_malformed_http_gets_a_json_400(live, caplog, raw, words):
    caplog.set_level(logging.INFO)
    before = metrics(live.port)["http_requests"].get("400", 0)
    with connect(live.port) as sock:
        sock.sendall(raw)
        status, payload = read_response(sock)
    assert status == 400 and set(payload) == {"error"}, payload
    assert payload["error"].startswith("malformed HTTP request: ") and words in payload["error"]
    assert len(payload["error"]) < 400  # a line, not the client's 100 KB back
    assert metrics(live.port)["http_requests"]["400"] == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert_serves(live)


def test_a_body_that_does_not_decode_gets_a_json_400(live):
    with connect(live.port) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nContent-Encoding: gzip\r\nContent-Length: 20\r\n"
                     b"\r\n" + b"\x1f\x8b" + b"x" * 18)
        status, payload = read_response(sock)
    assert status == 400 and "could not be read" in payload["error"], payload
    assert "content-encoding" in payload["error"]
    assert_serves(live)


def test_a_plain_app_runner_still_serves_the_app(web):
    # make_app's app under aiohttp's own runner: everything but malformed HTTP is JSON.
    live = LiveServer(web, Engine(Gate(), max_delay_ms=0), plain=True)
    try:
        assert_serves(live)
        with connect(live.port) as sock:
            sock.sendall(b"GARBAGE\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.")
    finally:
        live.close()


def test_boolean_pixels_are_refused_whatever_the_encoding_and_true_elsewhere_is_not(live):
    image = [[[0.5] * 4] * 4] * 3
    bad = [[[0.5] * 4] * 4, [[0.5] * 4, [0.5, True, 0.5, 0.5], [0.5] * 4, [0.5] * 4],
           [[0.5] * 4] * 4]
    for body in (json.dumps({"domain": 0, "image": bad}).encode(),
                 json.dumps({"domain": 0, "image": bad}).encode("utf-16")):
        status, _, payload = call(live.port, "POST", "/v1/predict", body, JSON)
        assert status == 400, payload
        assert '"image[1][1][1]" must be a number, got a boolean true' in payload["error"]
    # "true" outside the image (another field, a string) does not refuse the request.
    status, _, payload = call(live.port, "POST", "/v1/predict",
                              {"domain": 1, "image": image, "debug": True, "note": "false"})
    assert status == 200 and payload["logits"] == [25.0], payload


class Exits(nn.Module):
    """Raises SystemExit (not an Exception): the engine's runner thread stops."""

    input_size = (3, 4, 4)
    num_domains = 3

    def forward(self, x, domain):
        raise SystemExit("the model exited")


def test_an_engine_whose_thread_died_answers_503_and_health_says_so(web, caplog):
    live = LiveServer(web, Engine(Exits(), max_delay_ms=0))
    try:
        x = torch.ones(Exits.input_size)
        status, _, payload = predict_binary(live.port, x, 0)
        assert status == 503 and "SystemExit: the model exited" in payload["error"], payload
        wait_for(lambda: live.engine.failure is not None, "the engine to record its failure")
        status, _, payload = predict_binary(live.port, x, 0)
        assert status == 503 and "died of SystemExit" in payload["error"], payload
        status, _, payload = call(live.port, "GET", "/health")
        assert status == 503 and payload["status"] == "failed"
        assert "SystemExit" in payload["error"]
    finally:
        live.close()


def test_body_timeout_must_be_a_positive_finite_number(web):
    from fastmdl.server import make_app

    with Engine(Gate()) as engine:
        for bad in (0, -1.0, float("inf"), float("nan"), True, "30"):
            with pytest.raises(ValueError, match="body_timeout_s"):
                make_app(engine, body_timeout_s=bad)
