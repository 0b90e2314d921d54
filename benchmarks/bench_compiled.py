"""One small model served five ways, against torch.distributed.rpc.

    python benchmarks/bench_compiled.py           # full run (~2 minutes, AOTInductor compile included)
    python benchmarks/bench_compiled.py --quick   # fewer calls

The model is a 2-layer MLP on a (8, 64) float32 input. Rank 1 serves it,
rank 0 measures, in one run of two processes:

  script module   a ScriptModule shipped by value (the first call carries
                  its archive, later ones its SHA-256 name only)
  exported (name) an ExportedProgram registered by name on the callee
  exported (ship) the same ExportedProgram shipped by value
  aoti            an AOTInductor package registered by name (served in C++)
  tensorpipe      torch.distributed.rpc, a Python UDF calling the eager module:
                  the anchor every ratio is taken against

Per way: rpc_sync p50 latency, rpc_async throughput with 32 calls in
flight, and for code shipped by value the first call (code and load) against
the p50 of later ones, with the bytes each sent. Medians throughout: the
machine is shared. Results go to benchmarks/results/compiled.json.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pair  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "compiled.json")
IN_FLIGHT = 32


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def example():
    torch.manual_seed(1)
    return torch.randn(8, 64)


_EAGER = None


def eager_forward(x):
    """The anchor's Python UDF: the eager module, built once per process."""
    global _EAGER
    if _EAGER is None:
        _EAGER = MLP().eval()
    with torch.no_grad():
        return _EAGER(x)


def _latencies(call, warmup, iters):
    for _ in range(warmup):
        call()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _throughput(start, n):
    """Calls/s with IN_FLIGHT calls outstanding; start() returns a future."""
    t0 = time.perf_counter()
    window = [start() for _ in range(IN_FLIGHT)]
    done = 0
    while done < n:
        window.pop(0).wait()
        done += 1
        if done + len(window) < n:
            window.append(start())
    for f in window:
        f.wait()
    return n / (time.perf_counter() - t0)


def _torchrpc_phase(rank, port, package, cfg):
    import torchrpc

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = MLP().eval()
    x = example()
    ep = torch.export.export(model, (x,))
    if rank == 1:
        torchrpc.register(ep, name="mlp_exported")
        torchrpc.register(package, name="mlp_aoti")
    torchrpc.init_rpc(f"w{rank}", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                      options=torchrpc.RpcOptions(accept_code=rank == 1))
    results = {}
    if rank == 0:
        want = eager_forward(x)
        script_module = torch.jit.script(MLP().eval())
        sent = lambda: torchrpc.debug_info()["traffic"]["w1"]["bytes_sent"]  # noqa: E731
        for label, func in (("script module", script_module), ("exported (ship)", ep)):
            before = sent()
            t0 = time.perf_counter()
            out = torchrpc.rpc_sync("w1", func, (x,))
            first_us = (time.perf_counter() - t0) * 1e6
            first_bytes = sent() - before
            assert torch.allclose(out, want, atol=1e-5), label
            before = sent()
            torchrpc.rpc_sync("w1", func, (x,))
            results[label] = {"first_us": first_us, "first_bytes": first_bytes,
                              "later_bytes": sent() - before}
        for label, func in (("script module", script_module), ("exported (name)", "mlp_exported"),
                            ("exported (ship)", ep), ("aoti", "mlp_aoti")):
            out = torchrpc.rpc_sync("w1", func, (x,))
            assert torch.allclose(out, want, atol=1e-4), label
            lat = _latencies(lambda: torchrpc.rpc_sync("w1", func, (x,)), cfg.warmup, cfg.iters)
            rate = _throughput(lambda: torchrpc.rpc_async("w1", func, (x,)), cfg.iters)
            results.setdefault(label, {}).update({"p50_us": statistics.median(lat), "calls_per_s": rate})
    torchrpc.shutdown()
    return results


def _tensorpipe_phase(rank, port, cfg):
    import torch.distributed.rpc as rpc

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2)
    results = {}
    if rank == 0:
        x = example()
        out = rpc.rpc_sync("w1", eager_forward, (x,))
        assert torch.allclose(out, eager_forward(x), atol=1e-5)
        lat = _latencies(lambda: rpc.rpc_sync("w1", eager_forward, (x,)), cfg.warmup, cfg.iters)
        rate = _throughput(lambda: rpc.rpc_async("w1", eager_forward, (x,)), cfg.iters)
        results["tensorpipe"] = {"p50_us": statistics.median(lat), "calls_per_s": rate}
    rpc.shutdown()
    return results


def _body(rank, ports, package, cfg):
    results = _torchrpc_phase(rank, ports[0], package, cfg)
    results.update(_tensorpipe_phase(rank, ports[1], cfg))
    return results


def compile_package(folder):
    from tqdm import tqdm

    with tqdm(total=1, desc="AOTInductor compile", file=sys.stderr) as bar:
        ep = torch.export.export(MLP().eval(), (example(),))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(folder, "mlp.pt2"))
        bar.update(1)
    return path


def print_report(r):
    tp = r["tensorpipe"]
    print(f"\n{'way':18}{'p50 us':>10}{'x TP':>8}{'calls/s':>10}{'x TP':>8}")
    for label in ("script module", "exported (name)", "exported (ship)", "aoti", "tensorpipe"):
        v = r[label]
        print(f"{label:18}{v['p50_us']:10.1f}{v['p50_us'] / tp['p50_us']:8.2f}"
              f"{v['calls_per_s']:10.0f}{v['calls_per_s'] / tp['calls_per_s']:8.2f}")
    print(f"\n{'shipped by value':18}{'first us':>10}{'later p50':>10}{'first B':>10}{'later B':>9}")
    for label in ("script module", "exported (ship)"):
        v = r[label]
        print(f"{label:18}{v['first_us']:10.0f}{v['p50_us']:10.1f}{v['first_bytes']:10d}{v['later_bytes']:9d}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=OUT)
    cfg = p.parse_args(argv)
    cfg.warmup, cfg.iters = (20, 200) if cfg.quick else (100, 2000)
    with tempfile.TemporaryDirectory() as folder:
        package = compile_package(folder)
        results = pair.run(_body, ([pair.free_port(), pair.free_port()], package, cfg), timeout=600)
    if results is None:
        return 1
    print_report(results)
    os.makedirs(os.path.dirname(cfg.out), exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
