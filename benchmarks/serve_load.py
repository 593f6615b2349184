"""Load test of fastmdl.serve.Engine: throughput and latency against answering
each request by itself.

    python benchmarks/serve_load.py [--clients 1 8 64 256] [--seconds 4] [--device cpu]
                                    [--size 32] [--width 1.0] [--out benchmarks/out]

The model is a pruned multi-domain ResNet-26 (D=4, each domain 25% of one
network's FLOPs; see pruned_model.py). Each client is a thread in a closed loop:
submit one image of a random domain, wait for its answer, repeat. The baseline
("one at a time") answers the same kind of requests one by one, model(x[None], d),
from one thread. Every engine answer in a warm-up round is checked against the
model's answer to that request alone. Latency is submit-to-answer on the client.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import write_atomic  # noqa: E402
from pruned_model import pruned_resnet26  # noqa: E402

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--backend", default=None, help="force the op backend (default: auto)")
    ap.add_argument("--out",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)

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
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "serve_load.md"), text + "\n")
    write_atomic(os.path.join(args.out, "serve_load.json"), json.dumps(
        {"args": vars(args), "date": stamp, "device": device, "rows": rows,
         "batch_sizes": {str(k): v for k, v in hist.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
