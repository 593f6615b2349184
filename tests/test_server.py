"""fastmdl.server: real HTTP on loopback, against an in-process app and a
``python -m fastmdl serve`` subprocess. Every request has a timeout and every
fixture shuts its server and engine down, so a broken server fails, never hangs."""

import asyncio
import http.client
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

import fastmdl
from fastmdl import cli
from fastmdl.serve import Engine
from models import TinyResNet
from test_serve import Gate

TIMEOUT = 30  # seconds, for any one request
SHAPE = (3, 8, 8)
NUM_CLASSES = [5, 2, 7]
MAX_BODY = 32 * 1024  # a JSON image of SHAPE is about 4 KiB


@pytest.fixture(scope="module")
def web():
    return pytest.importorskip("aiohttp.web")


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    m = fastmdl.convert(TinyResNet(), 3, NUM_CLASSES, input_size=SHAPE)
    g = torch.Generator().manual_seed(0)
    for group in m.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.4
    m.train()
    with torch.no_grad():
        m(torch.randn(12, *SHAPE), torch.arange(12) % 3)
    return fastmdl.prune(m.eval())


class LiveServer:
    """An app from make_app on 127.0.0.1:<free port>, its event loop on a thread,
    run as ``fastmdl serve`` runs it (make_runner), or with ``plain=True`` under
    aiohttp's own AppRunner."""

    def __init__(self, web, engine, plain=False, **kwargs):
        from fastmdl.server import make_app, make_runner

        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            runner = web.AppRunner if plain else make_runner
            self.runner = runner(make_app(engine, **kwargs), access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            return self.runner.addresses[0][1]

        try:
            self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(TIMEOUT)
        except BaseException:
            self.close()
            raise

    def close(self):
        if hasattr(self, "runner"):
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()
        self.engine.close()


@pytest.fixture(scope="module")
def server(web, pruned):
    live = LiveServer(web, Engine(pruned, max_batch_size=16, max_delay_ms=2),
                      max_body_bytes=MAX_BODY)
    yield live
    live.close()


def call(port, method, path, body=None, headers=None, chunked=False):
    """(status, headers, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            data = body
            body = (data[i:i + 4096] for i in range(0, len(data), 4096))
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        raw = resp.read()
        kind = resp.getheader("Content-Type", "")
        payload = json.loads(raw) if kind.startswith("application/json") else raw.decode()
        return resp.status, resp, payload
    finally:
        conn.close()


def image(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def expected(pruned, x, d):
    with torch.no_grad():
        return pruned(x[None], d)[0][:NUM_CLASSES[d]]


def predict_json(port, x, d):
    return call(port, "POST", "/v1/predict", {"domain": d, "image": x.tolist()})


def predict_binary(port, x, d):
    return call(port, "POST", f"/v1/predict?domain={d}",
                x.numpy().astype("<f4").tobytes(),
                {"Content-Type": "application/octet-stream"})


def check_answer(pruned, x, d, status, payload):
    assert status == 200, payload
    assert payload["domain"] == d and len(payload["logits"]) == NUM_CLASSES[d]
    got = torch.tensor(payload["logits"])
    torch.testing.assert_close(got, expected(pruned, x, d), rtol=1e-5, atol=1e-5)
    assert payload["class"] == int(got.argmax())


def assert_still_serving(server, pruned, seed=99):
    x = image(seed)
    status, _, payload = predict_json(server.port, x, 2)
    check_answer(pruned, x, 2, status, payload)


# ------------------------------------------------------------------ predictions


@pytest.mark.parametrize("d", [0, 1, 2])
def test_json_prediction_is_the_models_output(server, pruned, d):
    x = image(d)
    status, _, payload = predict_json(server.port, x, d)
    check_answer(pruned, x, d, status, payload)


@pytest.mark.parametrize("d", [0, 1, 2])
def test_binary_prediction_is_the_models_output(server, pruned, d):
    x = image(10 + d)
    status, _, payload = predict_binary(server.port, x, d)
    check_answer(pruned, x, d, status, payload)


def test_concurrent_requests_each_get_their_own_answer(server, pruned):
    results, lock = [], threading.Lock()

    def client(seed):
        for i in range(6):
            x, d = image(1000 * seed + i), (seed + i) % 3
            send = predict_binary if i % 2 else predict_json
            status, _, payload = send(server.port, x, d)
            with lock:
                results.append((x, d, status, payload))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * TIMEOUT)
    assert len(results) == 48
    for x, d, status, payload in results:
        check_answer(pruned, x, d, status, payload)


# ------------------------------------------------------------------ images of other sizes


def predict_sized(port, x, d, binary):
    """A prediction for an image of any size: binary bodies name it in the query."""
    if not binary:
        return predict_json(port, x, d)
    return call(port, "POST", f"/v1/predict?domain={d}&height={x.shape[1]}&width={x.shape[2]}",
                x.numpy().astype("<f4").tobytes(), {"Content-Type": "application/octet-stream"})


def test_one_server_answers_images_of_several_sizes(web, pruned):
    # The default body limit: room for a JSON image of the model's size + 1 MiB.
    live = LiveServer(web, Engine(pruned, max_batch_size=16, max_delay_ms=2))
    results, lock = [], threading.Lock()

    def client(seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(4):
            size = (24, 32)[(seed + i) % 2]
            x, d = torch.randn(3, size, size, generator=g), (seed + i) % 3
            status, _, payload = predict_sized(live.port, x, d, binary=bool(i % 2))
            with lock:
                results.append((x, d, status, payload))

    try:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * TIMEOUT)
        assert len(results) == 16
        assert {tuple(x.shape) for x, *_ in results} == {(3, 24, 24), (3, 32, 32)}
        for x, d, status, payload in results:
            check_answer(pruned, x, d, status, payload)
        # The model's own size still needs no height and width.
        x = image(77)
        status, _, payload = predict_binary(live.port, x, 1)
        check_answer(pruned, x, 1, status, payload)
        status, _, payload = predict_json(live.port, torch.randn(2, 24, 24), 0)
        assert status == 422 and '"image" must have 3 channels, got 2' in payload["error"]
    finally:
        live.close()


def test_an_engine_with_an_explicit_input_shape_refuses_other_sizes(web, pruned):
    live = LiveServer(web, Engine(pruned, input_shape=SHAPE, max_delay_ms=1))
    try:
        x = image(5)
        status, _, payload = predict_json(live.port, x, 0)
        check_answer(pruned, x, 0, status, payload)
        for binary in (False, True):
            status, _, payload = predict_sized(live.port, torch.randn(3, 24, 24), 0, binary)
            assert status == 422, payload
            assert "must have shape (C, H, W) = (3, 8, 8), got (3, 24, 24)" in payload["error"]
        status, _, payload = call(live.port, "GET", "/health")
        assert payload["fixed_input_shape"] is True and payload["input_shape"] == list(SHAPE)
    finally:
        live.close()


# ------------------------------------------------------------------ bad requests


def _json(obj):
    return json.dumps(obj).encode()


GOOD = image(7).tolist()
NAN_IMAGE = image(8)
NAN_IMAGE[1, 2, 3] = float("nan")
INF_IMAGE = image(9)
INF_IMAGE[0, 0, 5] = -float("inf")
HUGE = image(10).tolist()
HUGE[2][3][4] = 1e39  # a finite JSON number, infinite as float32
JSON = {"Content-Type": "application/json"}
BINARY = {"Content-Type": "application/octet-stream"}
BAD = {
    # name: (method, path, body, headers, status, words in the error)
    "malformed json": ("POST", "/v1/predict", b'{"domain": 1, "image": [', JSON, 400,
                       "not valid JSON"),
    "not utf-8": ("POST", "/v1/predict", b'\xff\xfe\xfa{', JSON, 400, "not valid JSON"),
    "not an object": ("POST", "/v1/predict", b"[1, 2]", JSON, 400, "JSON object"),
    "missing domain": ("POST", "/v1/predict", _json({"image": GOOD}), JSON, 400,
                       '"domain" is missing'),
    "string domain": ("POST", "/v1/predict", _json({"domain": "1", "image": GOOD}), JSON, 400,
                      '"domain" must be an int'),
    "float domain": ("POST", "/v1/predict", _json({"domain": 1.0, "image": GOOD}), JSON, 400,
                     '"domain" must be an int'),
    "bool domain": ("POST", "/v1/predict", _json({"domain": True, "image": GOOD}), JSON, 400,
                    '"domain" must be an int'),
    "missing image": ("POST", "/v1/predict", _json({"domain": 0}), JSON, 400,
                      '"image" is missing'),
    "image not a list": ("POST", "/v1/predict", _json({"domain": 0, "image": "cat.png"}), JSON,
                         400, '"image" must be a nested list'),
    "string pixel": ("POST", "/v1/predict",
                     _json({"domain": 0, "image": [[["0.5"] * 8] * 8] * 3}), JSON, 400,
                     '"image[0][0][0]" must be a number'),
    "boolean pixel": ("POST", "/v1/predict",
                      _json({"domain": 0, "image": [[[0.5] * 8] * 8,
                                                    [[0.5] * 3 + [True] + [0.5] * 4]
                                                    + [[0.5] * 8] * 7,
                                                    [[0.5] * 8] * 8]}),
                      JSON, 400, '"image[1][0][3]" must be a number, got a boolean true'),
    "false pixel": ("POST", "/v1/predict",
                    _json({"domain": 0, "image": [[[False] * 8] * 8] * 3}), JSON, 400,
                    '"image[0][0][0]" must be a number, got a boolean false'),
    "wrong channels": ("POST", "/v1/predict",
                       _json({"domain": 0, "image": image(1)[:2].tolist()}), JSON, 422,
                       '"image" must have 3 channels, got 2'),
    "empty rows": ("POST", "/v1/predict", _json({"domain": 0, "image": [[[]] * 8] * 3}), JSON,
                   422, "with C = 3 channels and any H, W >= 1, got (3, 8, 0)"),
    "flat image": ("POST", "/v1/predict",
                   _json({"domain": 0, "image": image(1).flatten().tolist()}), JSON, 422,
                   "got (192,)"),
    "ragged image": ("POST", "/v1/predict",
                     _json({"domain": 0, "image": [[[0.0] * 8] * 8, [[0.0] * 8] * 7,
                                                   [[0.0] * 8] * 8]}), JSON, 422, "ragged"),
    "domain too large": ("POST", "/v1/predict", _json({"domain": 3, "image": GOOD}), JSON, 422,
                         "out of range"),
    "negative domain": ("POST", "/v1/predict", _json({"domain": -1, "image": GOOD}), JSON, 422,
                        "out of range"),
    "nan pixel": ("POST", "/v1/predict",
                  json.dumps({"domain": 0, "image": NAN_IMAGE.tolist()}).encode(), JSON, 422,
                  "non-finite"),
    "infinite pixel": ("POST", "/v1/predict",
                       json.dumps({"domain": 0, "image": INF_IMAGE.tolist()}).encode(), JSON, 422,
                       "non-finite"),
    "pixel too large for float32": ("POST", "/v1/predict", _json({"domain": 0, "image": HUGE}),
                                    JSON, 422, "non-finite"),
    "binary nan": ("POST", "/v1/predict?domain=0", NAN_IMAGE.numpy().astype("<f4").tobytes(),
                   BINARY, 422, "non-finite"),
    "binary wrong length": ("POST", "/v1/predict?domain=0", b"\0" * 100, BINARY, 422,
                            "must be 768 bytes"),
    "binary wrong size": ("POST", "/v1/predict?domain=0&height=24&width=24",
                          image(2).numpy().tobytes(), BINARY, 422,
                          "must be 6912 bytes (little-endian float32 of shape (C, H, W) = "
                          "(3, 24, 24)"),
    "binary zero height": ("POST", "/v1/predict?domain=0&height=0", image(2).numpy().tobytes(),
                           BINARY, 400, 'query parameter "height" must be a positive int'),
    "binary string width": ("POST", "/v1/predict?domain=0&width=w", image(2).numpy().tobytes(),
                            BINARY, 400, 'query parameter "width" must be a positive int'),
    "binary no domain": ("POST", "/v1/predict", image(2).numpy().tobytes(), BINARY, 400,
                         'query parameter "domain" is missing'),
    "binary string domain": ("POST", "/v1/predict?domain=cat", image(2).numpy().tobytes(),
                             BINARY, 400, 'query parameter "domain" must be an int'),
    "binary domain out of range": ("POST", "/v1/predict?domain=9", image(2).numpy().tobytes(),
                                   BINARY, 422, "out of range"),
    "oversized": ("POST", "/v1/predict", b"0" * (4 * MAX_BODY), JSON, 413, "max_body_bytes"),
    "wrong method": ("GET", "/v1/predict", None, {}, 405, "use POST"),
    "wrong method on health": ("POST", "/health", b"{}", JSON, 405, "not allowed"),
    "unknown path": ("GET", "/v2/predict", None, {}, 404, "no endpoint"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_a_4xx_and_the_server_keeps_serving(server, pruned, name):
    method, path, body, headers, want, words = BAD[name]
    status, resp, payload = call(server.port, method, path, body, headers)
    assert status == want, payload
    assert resp.getheader("Content-Type").startswith("application/json")
    assert isinstance(payload, dict) and set(payload) == {"error"}
    assert words in payload["error"], payload["error"]
    if want == 405:
        assert resp.getheader("Allow")
    assert_still_serving(server, pruned)


def test_oversized_chunked_body_gets_413(server, pruned):
    # No Content-Length: aiohttp's client_max_size stops the read.
    body = _json({"domain": 0, "image": [GOOD] * 20})
    assert len(body) > MAX_BODY
    status, _, payload = call(server.port, "POST", "/v1/predict", body, JSON, chunked=True)
    assert status == 413 and "max_body_bytes" in payload["error"]
    assert_still_serving(server, pruned)


def test_overloaded_engine_gets_503_and_a_failing_model_500(web):
    model = Gate()
    engine = Engine(model, max_batch_size=1, max_delay_ms=0, max_queue=1)
    live = LiveServer(web, engine)
    x = torch.ones(Gate.input_size)
    answers, threads = {}, []
    try:
        model.open.clear()

        def client(i):
            answers[i] = predict_binary(live.port, x, 0)

        # Requests block in the gated model, in the engine's hand-off and in its
        # queue, until the queue is full and the next one is refused at once.
        for i in range(20):
            t = threading.Thread(target=client, args=(i,))
            t.start()
            threads.append(t)
            t.join(0.3)
            if answers:
                break
        assert answers, "no request was refused while the model was blocked"
        for status, resp, payload in list(answers.values()):
            assert status == 503 and "overloaded" in payload["error"], payload
            assert resp.getheader("Retry-After") == "1"
    finally:
        model.open.set()
        for t in threads:
            t.join(TIMEOUT)
    try:
        # Every accepted request is answered once the model moves again.
        statuses = [answers[j][0] for j in range(len(threads))]
        assert set(statuses) == {200, 503} and statuses[0] == 200
        assert answers[0][2]["logits"] == [48.0]  # Gate: the sum of the pixels + domain
        status, _, payload = predict_binary(live.port, x, 2)  # Gate fails domain 2
        assert status == 500 and "domain 2 is broken" in payload["error"]
        status, _, payload = predict_binary(live.port, x, 1)
        assert status == 200 and payload["logits"] == [49.0]
    finally:
        live.close()


def test_json_without_content_type_is_read_as_json(server, pruned):
    x = image(42)
    status, _, payload = call(server.port, "POST", "/v1/predict",
                              _json({"domain": 1, "image": x.tolist()}))
    check_answer(pruned, x, 1, status, payload)


# ------------------------------------------------------------------ health and metrics


def test_health(server):
    status, _, payload = call(server.port, "GET", "/health")
    assert status == 200 and payload["status"] == "ok"
    assert payload["num_domains"] == 3 and payload["num_classes"] == NUM_CLASSES
    assert payload["input_shape"] == list(SHAPE) and payload["max_body_bytes"] == MAX_BODY
    assert payload["channels"] == 3 and payload["fixed_input_shape"] is False


def _prometheus_value(text, sample):
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def test_metrics_json_and_prometheus_move_with_requests(server, pruned):
    status, _, before = call(server.port, "GET", "/metrics")
    assert status == 200
    for key in ("served", "failed", "queued", "throughput", "latency_ms", "batch_sizes",
                "http_requests"):
        assert key in before
    for seed in range(3):
        x = image(500 + seed)
        status, _, payload = predict_json(server.port, x, 1)
        check_answer(pruned, x, 1, status, payload)
    call(server.port, "POST", "/v1/predict", b"{", JSON)
    status, _, after = call(server.port, "GET", "/metrics")
    assert after["served"] >= before["served"] + 3
    codes_before, codes_after = before["http_requests"], after["http_requests"]
    assert codes_after["200"] >= codes_before.get("200", 0) + 4  # 3 predictions + 1 /metrics
    assert codes_after["400"] == codes_before.get("400", 0) + 1
    assert after["latency_ms"]["p50"] is not None and after["throughput"] > 0

    for path, headers in (("/metrics", {"Accept": "text/plain"}),
                          ("/metrics?format=prometheus", {})):
        status, resp, text = call(server.port, "GET", path, headers=headers)
        assert status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        for line in text.splitlines():
            assert line.startswith("# ") or re.fullmatch(
                r'[a-z_]+(\{[a-z]+="[^"]*"\})? \S+', line), line
        assert _prometheus_value(text, "fastmdl_requests_served_total") >= after["served"]
        assert _prometheus_value(text, 'fastmdl_http_requests_total{code="400"}') \
            == codes_after["400"]
        assert _prometheus_value(text, 'fastmdl_latency_seconds{quantile="0.5"}') > 0


def test_make_app_arguments(web, pruned):
    from fastmdl.server import make_app

    with pytest.raises(TypeError, match="fastmdl.serve.Engine"):
        make_app(pruned)
    with Engine(pruned) as engine:
        with pytest.raises(ValueError, match="max_body_bytes"):
            make_app(engine, max_body_bytes=0)
        assert make_app(engine) is not None  # the default limit: default_max_body_bytes

    class NoInputSize(torch.nn.Module):
        num_domains = 2

        def forward(self, x, domain):
            return x.mean((1, 2, 3))[:, None]

    with Engine(NoInputSize()) as engine:
        with pytest.raises(ValueError, match=r"engine must know its input shape"):
            make_app(engine)
    from fastmdl.server import default_max_body_bytes
    assert default_max_body_bytes(SHAPE) > 32 * math.prod(SHAPE)


# ------------------------------------------------------------------ the command line


def _read_line(stream, timeout):
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return None


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_fastmdl_serve_end_to_end(web, pruned, tmp_path, stop):
    path = tmp_path / "model.fmdl"
    fastmdl.save(pruned, path)
    log = open(tmp_path / "stderr.txt", "w+")  # a file: a full pipe could stall the server
    proc = subprocess.Popen([sys.executable, "-m", "fastmdl", "serve", str(path), "--port", "0",
                             "--max-delay-ms", "1"],
                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path)
    try:
        line = _read_line(proc.stdout, 120)
        assert line, f"no start-up line; stderr: {(tmp_path / 'stderr.txt').read_text()}"
        match = re.fullmatch(rf"fastmdl: serving {re.escape(str(path))} on "
                             rf"http://127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        port = int(match.group(1))
        for d in range(3):
            x = image(300 + d)
            status, _, payload = predict_json(port, x, d)
            check_answer(pruned, x, d, status, payload)
        status, _, payload = call(port, "POST", "/v1/predict", b"nonsense", JSON)
        assert status == 400
        assert call(port, "GET", "/health")[0] == 200
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=60)
        err = (tmp_path / "stderr.txt").read_text()
        assert proc.returncode == 0, err
        assert out == "" and "Traceback" not in err  # the start-up line was the only one
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
        log.close()


def test_fastmdl_serve_missing_or_bad_model_file(tmp_path, capsys):
    pytest.importorskip("aiohttp")
    garbage = tmp_path / "garbage.fmdl"
    garbage.write_bytes(b"not a model")
    for path in (tmp_path / "missing.fmdl", garbage):
        assert cli.main(["serve", str(path), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastmdl serve: error:") and str(path) in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_fastmdl_serve_without_aiohttp(tmp_path, capsys, monkeypatch):
    for name in ("aiohttp", "aiohttp.web"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["serve", str(tmp_path / "model.fmdl")]) == 2
    err = capsys.readouterr().err
    assert "pip install aiohttp" in err and err.count("\n") == 1


def test_import_fastmdl_does_not_need_aiohttp():
    code = ("import sys; sys.modules['aiohttp'] = None; import fastmdl, fastmdl.server, "
            "fastmdl.cli; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
