import torch, time, sys, itertools, random
torch.set_num_threads(2)
P = torch.ops.mkldnn._convolution_pointwise; R = torch.ops.mkldnn._reorder_convolution_weight
def med(f, n=60):
    for _ in range(10): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts)//2] * 1e6
rows_opts = [(3, 32), (3, 16), (3, 8), (8, 32)]
ch = [4, 8, 16, 32, 64]
res = []
for (n, h), cin, cout in itertools.product(rows_opts, ch, ch):
    x = torch.randn(n, cin, h, h).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 1, 1); b = torch.randn(cout)
    wp = R(w.contiguous(memory_format=torch.channels_last), [0,0], [1,1], [1,1], 1, [n, cin, h, h])
    rows = x.permute(0,2,3,1).reshape(-1, cin); wt = w.view(cout, cin).t()
    a = min(med(lambda: torch.addmm(b, rows, wt)) for _ in range(2))
    o = min(med(lambda: P(x, wp, b, [0,0], [1,1], [1,1], 1, "none", [], "")) for _ in range(2))
    res.append((n*h*h, cin, cout, a, o))
    print(f"rows {n*h*h:5d} cin {cin:3d} cout {cout:3d}  blas {a:6.1f}  onednn {o:6.1f}  {'BLAS' if a < o else 'oneDNN'}", flush=True)
