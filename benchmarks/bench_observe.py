"""What seeing inside costs: the small-call rpc_sync p50 with metrics off,
with metrics on (the default), under torch.profiler, and with remote
profiling, in one run of two processes.

    python benchmarks/bench_observe.py           # 4 rounds of 3,000 calls per mode
    python benchmarks/bench_observe.py --quick

Metrics can only be switched at init_rpc, so each round starts RPC twice,
metrics off then on, or on then off in every other round, which evens out
drift and warm-up on a shared machine. Every figure is a median; the table gives each mode's ratio
to "metrics off" from the same run. Results: benchmarks/results/observe.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pair  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "observe.json")
MODES = ("metrics off", "metrics on", "torch.profiler", "remote profiling")


@torch.jit.script
def small(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def _p50(iters):
    import torchrpc

    x = torch.ones(4)
    for _ in range(200):
        torchrpc.rpc_sync("w1", small, (x,))
    took = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torchrpc.rpc_sync("w1", small, (x,))
        took.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(took)


def _round(rank, port, metrics, iters, results):
    import torchrpc

    torchrpc.init_rpc(f"w{rank}", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                      options=torchrpc.RpcOptions(metrics=metrics))
    if rank == 0:
        if not metrics:
            results["metrics off"].append(_p50(iters))
        else:
            results["metrics on"].append(_p50(iters))
            with torch.profiler.profile():
                results["torch.profiler"].append(_p50(iters))
            with torchrpc.profile():
                results["remote profiling"].append(_p50(iters))
    torchrpc.shutdown()


def _body(rank, ports, rounds, iters):
    torch.set_num_threads(1)
    results = {m: [] for m in MODES}
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)  # neither always goes first
        for i, metrics in enumerate(order):
            _round(rank, ports[2 * r + i], metrics, iters, results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    rounds, iters = (2, 1000) if a.quick else (4, 3000)
    runs = pair.run(_body, ([pair.free_port() for _ in range(2 * rounds)], rounds, iters), timeout=900)
    if runs is None:
        return 1
    medians = {m: statistics.median(v) for m, v in runs.items()}
    base = medians["metrics off"]
    print(f"\n{'mode':20}{'p50 us':>10}{'x off':>8}   per round")
    for m in MODES:
        print(f"{m:20}{medians[m]:10.1f}{medians[m] / base:8.3f}   {[round(v, 1) for v in runs[m]]}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"rounds": runs, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
