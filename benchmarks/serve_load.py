"""Load test of fastmdl.serve.Engine: throughput and latency against answering
each request by itself.

    python benchmarks/serve_load.py [--clients 1 8 64 256] [--seconds 4] [--device cpu]
                                    [--size 32] [--width 1.0] [--out benchmarks/out]
    python benchmarks/serve_load.py --overhead [--clients 1 8 64] [--seconds 2]
                                    [--repeats 5] [--engine PATH ...]

The model is a pruned multi-domain ResNet-26 (D=4, each domain 25% of one
network's FLOPs; see pruned_model.py). Each client is a thread in a closed loop:
submit one image of a random domain, wait for its answer, repeat. The baseline
("one at a time") answers the same kind of requests one by one, model(x[None], d),
from one thread. Every engine answer in a warm-up round is checked against the
model's answer to that request alone. Latency is submit-to-answer on the client.

``--overhead`` measures the engine's own cost per request on a small network
(two 3x3 convs with BatchNorm/ReLU at 24x24, D=4, converted and pruned), where
that cost is most of the time (see :func:`overhead_main`):

  (a) one client, one request at a time: median(submit -> result) minus the
      median time of ``model(x[None], domain_tensor)`` under inference_mode on
      a thread set up like a runner's (one intra-op thread);
  (b) under load (closed-loop clients): runner time per request minus forward
      time per request, ``(span * workers - busy) / served``, with ``span``,
      ``busy`` (the runners' forward time) and ``served`` from the engine's
      stats(); and the same with ``busy`` replaced by the forward time each
      batch size takes by itself on a runner-like thread ("isolated");
  (c) under load, CPU: (process CPU time - the forward's CPU time) / served,
      which a shared machine's other processes do not inflate.

The same for a null model (one view of the input as logits: all the time is
the engine's and the clients'), unless ``--no-null``. The clients hold their
requests ready (image tensors in a list, int domains), and report requests/s
against one at a time on the main thread and on a 1-thread runner-like thread.
Tables: <out>/serve_overhead.md, every round: <out>/serve_overhead.json.

``--engine PATH`` (repeatable) loads ``Engine`` from a copy of serve.py instead
of fastmdl.serve, e.g. the committed one (``git show HEAD:fastmdl/serve.py >
/tmp/serve_before.py``), so two versions run interleaved in one session.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pruned_model import pruned_resnet26, set_masks  # noqa: E402

import fastmdl  # noqa: E402
from fastmdl._io import write_report  # noqa: E402
from fastmdl.serve import Engine  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_at_a_time(model, images, domains, device, seconds):
    lat = []
    i = 0
    start = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            model(images[i % len(images)][None].to(device), int(domains[i % len(domains)])).cpu()
            lat.append(time.perf_counter() - t0)
            i += 1
    wall = time.perf_counter() - start
    return {"throughput": i / wall, "p50_ms": 1e3 * percentile(lat, 0.5),
            "p99_ms": 1e3 * percentile(lat, 0.99), "requests": i}


def with_engine(engine, images, domains, clients, seconds):
    lat, count = [], [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(clients + 1)

    def client(k):
        mine = []
        i = k
        barrier.wait()
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            engine.submit(images[i % len(images)], int(domains[i % len(domains)])).result()
            mine.append(time.perf_counter() - t0)
            i += clients
        with lock:
            lat.extend(mine)
            count[0] += len(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"throughput": count[0] / wall, "p50_ms": 1e3 * percentile(lat, 0.5),
            "p99_ms": 1e3 * percentile(lat, 0.99), "requests": count[0]}


# -- --overhead: the engine's own cost per request ------------------------------------

def tiny_pruned(size: int = 24, width: int = 16, domains: int = 4, seed: int = 0):
    """A small pruned network: two 3x3 convs (BatchNorm, ReLU), global pooling and a
    linear head per domain, input 3 x size x size; each domain keeps half of every
    mask group, 70% of that shared (as pruned_resnet26)."""
    from torch import nn
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()
    model = fastmdl.convert(net, num_domains=domains, num_classes=[10] * domains,
                            input_size=(3, size, size))
    set_masks(model, 0.5, 0.7, seed)
    model.train()
    with torch.no_grad():  # per-domain BatchNorm statistics
        for _ in range(2):
            model(torch.randn(4 * domains, 3, size, size), torch.arange(4 * domains) % domains)
    return fastmdl.prune(model.eval())


def load_engine(path):
    """``Engine`` from fastmdl.serve (path None) or from a copy of serve.py at path."""
    if path is None:
        return Engine
    spec = importlib.util.spec_from_file_location(
        f"serve_copy_{abs(hash(path))}", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Engine


def in_runner_thread(fn, threads: int = 1):
    """fn() on a fresh thread with ``threads`` intra-op threads, as the engine's CPU
    runners run the model (a model off the main thread runs differently)."""
    box = {}

    def body():
        torch.set_num_threads(threads)
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def forward_medians(model, images, domains, sizes, reps: int, threads: int = 1):
    """{batch size: (median wall seconds, median CPU seconds)} of model(x, domain_tensor)
    on a runner-like thread, under inference_mode, the batch already stacked."""
    def run():
        out = {}
        with torch.inference_mode():
            for b in sizes:
                x = images[:b].contiguous()
                d = domains[:b].contiguous()
                for _ in range(3):
                    model(x, d)
                wall, cpu = [], []
                for _ in range(reps):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    model(x, d)
                    cpu.append(time.thread_time() - c0)
                    wall.append(time.perf_counter() - t0)
                out[b] = (statistics.median(wall), statistics.median(cpu))
        return out
    return in_runner_thread(run, threads)


def one_client_latencies(engine, images, domains, n: int):
    lat = []
    for i in range(n):
        x, d = images[i % len(images)], domains[i % len(domains)]
        t0 = time.perf_counter()
        engine.submit(x, d).result()
        lat.append(time.perf_counter() - t0)
    return lat


def _usage():
    """(process CPU seconds, context switches) so far, all threads together."""
    import resource
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_nvcsw + u.ru_nivcsw


def _busy(engine) -> float:
    """Seconds the engine's runners spent in forward passes so far."""
    st = engine.stats()
    return st["utilisation"] * st["served"] / st["throughput"] * engine.workers \
        if st["throughput"] else 0.0


def overhead_round(engine_cls, model, images, domains, args):
    """One round for one engine version: (a) one client and, for each client count, (b)."""
    row = {}
    with engine_cls(model, max_batch_size=args.max_batch_size,
                    max_delay_ms=args.max_delay_ms) as engine:
        one_client_latencies(engine, images, domains, 200)  # warm-up
        busy0 = _busy(engine)
        cpu0, sw0 = _usage()
        lat = one_client_latencies(engine, images, domains, args.one_client_requests)
        cpu1, sw1 = _usage()
        busy = _busy(engine) - busy0
    n = args.one_client_requests
    row["one_client"] = {"latency_us": 1e6 * statistics.median(lat), "requests": n,
                         "mean_latency_us": 1e6 * statistics.fmean(lat),
                         # the forward as it ran in the engine: slower than back to back
                         # alone, its thread having slept between requests
                         "engine_forward_us": 1e6 * busy / n,
                         "overhead_vs_engine_forward_us": 1e6 * (statistics.fmean(lat) - busy / n),
                         "cpu_us_per_request": 1e6 * (cpu1 - cpu0) / n,
                         "switches_per_request": (sw1 - sw0) / n}
    for c in args.clients:
        with engine_cls(model, max_batch_size=args.max_batch_size,
                        max_delay_ms=args.max_delay_ms) as engine:
            workers = engine.workers
            cpu0, sw0 = _usage()
            r = with_engine(engine, images, domains, c, args.seconds)
            cpu1, sw1 = _usage()
            st = engine.stats()
        span = st["served"] / st["throughput"]
        busy = st["utilisation"] * span * workers
        r.update({"served": st["served"], "span_s": span, "busy_s": busy, "workers": workers,
                  "batch_sizes": {int(k): v for k, v in st["batch_sizes"].items()},
                  "cpu_s": cpu1 - cpu0, "cores_used": (cpu1 - cpu0) / span,
                  "switches_per_request": (sw1 - sw0) / st["served"],
                  "forward_us_per_request": 1e6 * busy / st["served"],
                  "overhead_us": 1e6 * (span * workers - busy) / st["served"]})
        row[f"{c} clients"] = r
    return row


class NullModel(torch.nn.Module):
    """A model that does (almost) nothing: one view of each request's pixels as its
    10 logits. Served by the engine, every microsecond is the engine's own (and
    the clients')."""

    input_size = (3, 24, 24)
    num_domains = 4

    def __init__(self, size: int = 24):
        super().__init__()
        self.input_size = (3, size, size)
        self.w = torch.nn.Parameter(torch.zeros(()))  # the engine reads dtype and device

    def forward(self, x, domain):
        return x[:, 0, 0, :10]


def overhead_main(args) -> int:
    """The engine's own cost per request on a small network, against the model's,
    for each engine version given, in interleaved rounds (the machine is shared).

    (a) one client: median(submit -> result) - median(model(x[None], d)) on a
        runner-like thread; also CPU: process CPU per request - the forward's CPU.
    (b) load: (span * workers - busy) / served, busy the runners' forward time as
        the engine records it (stats()["utilisation"]); "isolated": busy replaced by
        the sum over batches of the forward time of that batch size alone.
    (c) load, CPU: (process CPU time - the forward's CPU time for every batch run,
        measured alone) / served: what every thread (engine and clients) spent per
        request outside the model. Unlike (a) and (b) it does not count time lost to
        other processes on a shared machine, nor time no thread could run (waiting
        for the GIL or a wake-up).
    The same for NullModel (unless --no-null): the engine's cost with no model."""
    g = torch.Generator().manual_seed(1)
    # The clients hold their requests ready (a list of image tensors, int domains):
    # indexing a tensor per request would add tensor operations of the client's own.
    images = list(torch.randn(512, 3, args.size, args.size, generator=g).unbind(0))
    domains = torch.randint(0, 4, (512,), generator=g).tolist()
    stacked, domain_tensor = torch.stack(images), torch.tensor(domains)
    models = {"tiny": tiny_pruned(args.size)}
    if not args.no_null:
        models["null"] = NullModel(args.size)
    versions = {(p or "fastmdl.serve"): load_engine(p) for p in (args.engine or [None])}

    for name, cls in versions.items():  # every answer checked against the model alone
        for model in models.values():
            with cls(model, max_batch_size=args.max_batch_size,
                     max_delay_ms=args.max_delay_ms) as engine:
                futures = [engine.submit(images[i], domains[i]) for i in range(128)]
                with torch.inference_mode():
                    for i, f in enumerate(futures):
                        want = model(images[i][None], domains[i])[0]
                        torch.testing.assert_close(f.result(), want, rtol=1e-4, atol=1e-4)

    rounds = {(m, v): [] for m in models for v in versions}
    base, base1 = [], []
    tiny = models["tiny"]
    for k in range(args.repeats):
        base.append(one_at_a_time(tiny, images, domains, "cpu", min(args.seconds, 2.0)))
        base1.append(in_runner_thread(lambda: one_at_a_time(
            tiny, images, domains, "cpu", min(args.seconds, 2.0))))
        for mname, model in models.items():
            for vname, cls in (versions.items() if k % 2 == 0 else reversed(versions.items())):
                r = overhead_round(cls, model, images, domains, args)
                # The model alone, batch of 1, right after: (a) compares to it.
                fwd = forward_medians(model, stacked, domain_tensor, [1],
                                      max(50, args.one_client_requests // 4))[1]
                oc = r["one_client"]
                oc.update({"forward_us": 1e6 * fwd[0], "forward_cpu_us": 1e6 * fwd[1],
                           "overhead_us": oc["latency_us"] - 1e6 * fwd[0],
                           "overhead_cpu_us": oc["cpu_us_per_request"] - 1e6 * fwd[1]})
                rounds[(mname, vname)].append(r)
                print(f"round {k + 1}/{args.repeats} {mname} model, {vname}: " + ", ".join(
                    f"{key} {v['overhead_us']:.0f} us" for key, v in r.items()), flush=True)

    # Each model's forward time, alone, for every batch size the engines ran with it.
    iso = {}
    for mname, model in models.items():
        sizes = sorted({b for (m, _), rs in rounds.items() if m == mname for r in rs
                        for key, v in r.items() if key != "one_client"
                        for b in v["batch_sizes"]} | {1, 8, 16, 32, 64})
        # The least of three passes' medians: a burst from another process on a shared
        # machine must not set the figure that every round is compared with.
        passes = [forward_medians(model, stacked, domain_tensor, sizes, args.forward_reps)
                  for _ in range(3)]
        iso[mname] = {b: min((p[b] for p in passes), key=lambda t: t[0]) for b in sizes}
    for (mname, _), rs in rounds.items():
        for r in rs:
            for key, v in r.items():
                if key == "one_client":
                    continue
                wall = sum(n * iso[mname][b][0] for b, n in v["batch_sizes"].items())
                cpu = sum(n * iso[mname][b][1] for b, n in v["batch_sizes"].items())
                v["overhead_isolated_us"] = 1e6 * (v["span_s"] * v["workers"] - wall) / v["served"]
                v["overhead_cpu_us"] = 1e6 * (v["cpu_s"] - cpu) / v["served"]

    med = statistics.median
    base_tp = med(b["throughput"] for b in base)
    base1_tp = med(b["throughput"] for b in base1)
    stamp = datetime.date.today().isoformat()
    cpu_name = f"CPU, {torch.get_num_threads()} threads"

    def mm(vals, fmt="{:.0f}"):
        vals = list(vals)
        return f"{fmt.format(med(vals))} [{fmt.format(min(vals))}-{fmt.format(max(vals))}]"

    lines = [f"fastmdl.serve.Engine, own cost per request: tiny pruned net (two 3x3 convs, "
             f"{args.size}x{args.size}, D=4, backend {tiny.backend}) and a null model; "
             f"{cpu_name}; torch {torch.__version__}; {stamp}; max_batch_size "
             f"{args.max_batch_size}, max_delay_ms {args.max_delay_ms}; {args.seconds:g} s per "
             f"load row; median [min-max] of {args.repeats} interleaved rounds", "",
             f"Tiny net one at a time, model(x[None], d): {base_tp:.0f} requests/s on the main "
             f"thread ({torch.get_num_threads()} intra-op threads), {base1_tp:.0f} on a "
             f"runner-like thread (1 intra-op thread). The tiny net alone on a runner-like "
             f"thread, wall (CPU) us per batch: " + ", ".join(
                 f"{b}: {1e6 * iso['tiny'][b][0]:.0f} ({1e6 * iso['tiny'][b][1]:.0f})"
                 for b in (1, 8, 16, 32, 64)), "",
             "(a) one client, one request at a time (us):", "",
             "| model | engine | submit->result | model alone, batch 1 | **overhead (a)** | "
             "forward in the engine (mean) | mean submit->result - it | "
             "CPU/request | forward CPU | overhead, CPU | switches/request |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (mname, vname), rs in rounds.items():
        oc = [r["one_client"] for r in rs]
        lines.append(f"| {mname} | {vname} | " + " | ".join(
            (f"**{mm(o[k] for o in oc)}**" if k == "overhead_us" else mm(o[k] for o in oc))
            for k in ("latency_us", "forward_us", "overhead_us", "engine_forward_us",
                      "overhead_vs_engine_forward_us", "cpu_us_per_request",
                      "forward_cpu_us", "overhead_cpu_us")) +
            f" | {mm((o['switches_per_request'] for o in oc), '{:.1f}')} |")
    lines += ["", "(b), (c) closed-loop clients (overheads in us per request; 'vs one at a "
              "time': the tiny net's, on the main thread; on a 1-thread runner-like thread):",
              "", "| model | engine | clients | requests/s | vs one at a time (main; 1 thread) "
              "| p50 ms | forward us/req (busy) | **overhead (b)** | (b), isolated forward | "
              "overhead (c), CPU | cores used | switches/req |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (mname, vname), rs in rounds.items():
        for c in args.clients:
            vs = [r[f"{c} clients"] for r in rs]
            tp = med(v["throughput"] for v in vs)
            ratio = f"{tp / base_tp:.2f}x; {tp / base1_tp:.2f}x" if mname == "tiny" else ""
            lines.append(
                f"| {mname} | {vname} | {c} | {mm(v['throughput'] for v in vs)} | {ratio} | "
                f"{med(v['p50_ms'] for v in vs):.2f} | "
                f"{mm(v['forward_us_per_request'] for v in vs)} | "
                f"**{mm(v['overhead_us'] for v in vs)}** | "
                f"{mm(v['overhead_isolated_us'] for v in vs)} | "
                f"{mm(v['overhead_cpu_us'] for v in vs)} | "
                f"{mm((v['cores_used'] for v in vs), '{:.2f}')} | "
                f"{mm((v['switches_per_request'] for v in vs), '{:.1f}')} |")
    text = "\n".join(lines)
    print(text)
    write_report(args.out, "serve_overhead", text, {
        "args": vars(args), "date": stamp, "device": cpu_name, "one_at_a_time": base,
        "one_at_a_time_1_thread": base1,
        "forward_alone_s": {m: {str(k): v for k, v in t.items()} for m, t in iso.items()},
        "rounds": {f"{m} | {v}": rs for (m, v), rs in rounds.items()}}, json_default=str)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=None,
                    help="client counts (default 1 8 64 256; with --overhead 1 8 64)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="seconds per row (default 4; with --overhead 2)")
    ap.add_argument("--overhead", action="store_true",
                    help="measure the engine's own cost per request on a small network")
    ap.add_argument("--repeats", type=int, default=5, help="--overhead: interleaved rounds")
    ap.add_argument("--one-client-requests", type=int, default=2000,
                    help="--overhead: requests per round for (a)")
    ap.add_argument("--forward-reps", type=int, default=30,
                    help="--overhead: timed passes per batch size for the isolated forward")
    ap.add_argument("--no-null", action="store_true",
                    help="--overhead: skip the null model (the engine's cost alone)")
    ap.add_argument("--engine", action="append", default=None, metavar="PATH",
                    help="--overhead: Engine from this copy of serve.py (repeatable; "
                         "default fastmdl.serve)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None, help="default 32; with --overhead 24")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--backend", default=None, help="force the op backend (default: auto)")
    ap.add_argument("--out",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    if args.overhead:
        if args.device != "cpu":
            ap.error("--overhead measures the CPU engine (--device cpu)")
        args.clients = args.clients or [1, 8, 64]
        args.seconds = args.seconds if args.seconds is not None else 2.0
        args.size = 24 if args.size is None else args.size
        return overhead_main(args)
    args.clients = args.clients or [1, 8, 64, 256]
    args.seconds = args.seconds if args.seconds is not None else 4.0
    args.size = 32 if args.size is None else args.size

    _, _, pruned = pruned_resnet26(4, 0.5, 0.7, args.size, args.width)
    pruned = pruned.to(args.device)
    if args.backend:
        pruned.backend = args.backend
    g = torch.Generator().manual_seed(1)
    images = torch.randn(512, 3, args.size, args.size, generator=g)
    domains = torch.randint(0, 4, (512,), generator=g)

    rows = {"one at a time": one_at_a_time(pruned, images, domains, args.device, args.seconds)}
    with Engine(pruned, device=args.device, max_batch_size=args.max_batch_size,
                max_delay_ms=args.max_delay_ms) as engine:
        futures = [engine.submit(images[i], int(domains[i])) for i in range(64)]
        with torch.inference_mode():
            for i, f in enumerate(futures):
                want = pruned(images[i][None].to(args.device), int(domains[i]))[0].cpu()
                torch.testing.assert_close(f.result(), want, rtol=1e-4, atol=1e-4)
        for c in args.clients:
            rows[f"engine, {c} clients"] = with_engine(engine, images, domains, c, args.seconds)
        hist = engine.stats()["batch_sizes"]

    base = rows["one at a time"]["throughput"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    stamp = datetime.date.today().isoformat()
    lines = [f"fastmdl.serve.Engine on a pruned ResNet-26 (width {args.width}, "
             f"{args.size}x{args.size}, D=4, backend {pruned.backend}); {device}; "
             f"torch {torch.__version__}; {stamp}; max_batch_size {args.max_batch_size}, "
             f"max_delay_ms {args.max_delay_ms}; {args.seconds:g} s per row", "",
             "| mode | requests/s | vs one at a time | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['throughput']:.0f} | {r['throughput'] / base:.2f}x | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    text = "\n".join(lines)
    print(text)
    write_report(args.out, "serve_load", text, {
        "args": vars(args), "date": stamp, "device": device, "rows": rows,
        "batch_sizes": {str(k): v for k, v in hist.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
