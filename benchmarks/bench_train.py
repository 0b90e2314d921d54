"""One distributed training step: torchrpc (torchrpc.autograd, torchrpc.optim)
vs torch.distributed.rpc (TensorPipe) + torch.distributed.autograd +
torch.distributed.optim.DistributedOptimizer, on the same two local processes.

    python benchmarks/bench_train.py                 # full run
    python benchmarks/bench_train.py --quick         # smoke run (seconds)
    python benchmarks/bench_train.py --steps 200 --warmup 20

A step, timed on the driver ("w0"), is what a training loop does:

    with dist_autograd.context() as ctx:     # (ctx exit releases it on every worker)
        loss = mse(model(x), target)         # forward; part of it on "w1" over RPC
        dist_autograd.backward(ctx, [loss])  # gradients flow back to w1 over RPC
        opt.step(ctx)                        # DistributedOptimizer(SGD): both owners step

Cases:
  tiny: Linear(4, 4) on w1 (made with remote(), called through
        `rref.rpc_sync().forward(x)`), batch 2: RPC overhead dominates.
  mlp:  4 layers Linear(1024, 1024), batch 64: layers 1-2 on w0 (RRef(p) to
        its own parameters), 3-4 on w1: compute and 4 MiB parameter tensors.

Both backends run the same steps from the same seeds on the same data, so
their parameters afterwards must agree ("params" column: a check that
torchrpc trains, not only that it is fast).

The setup is bench_rpc.py's (its Backend adapters, Config timeouts, port and
percentile helpers): two spawned processes run one phase per backend in turn,
rank 0 measures, rank 1 serves. torch.distributed.rpc can use RRefs (which
DistributedOptimizer needs) only under a process's first init_rpc of it, so
each backend runs once (default order: torchrpc, then TensorPipe). The
torchrpc phase is skipped, and said so, where torchrpc.autograd or
torchrpc.optim does not exist yet. Prints p50 per step (and its parts) with
the ratio torchrpc/torch, and writes JSON (--out).
"""

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from bench_rpc import BACKENDS, CALLEE, _percentile, free_ports, run_workers
from bench_rpc import Config as RpcConfig

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train.json")
SUBJECT, ANCHOR = "torchrpc-tcp", "tensorpipe"  # bench_rpc.BACKENDS names
LR = 0.01
PARTS = ("step", "forward", "backward", "opt_step", "ctx_exit")

# The RPC module of the phase running in this process (torchrpc or
# torch.distributed.rpc); set on both ranks when a phase starts.
_RPC = None


@dataclasses.dataclass
class Config:
    steps: int = 100
    warmup: int = 10
    timeout: float = 600.0  # the whole run
    rpc: RpcConfig = dataclasses.field(default_factory=RpcConfig)


def dist_modules(kind: str):
    """(dist_autograd module, DistributedOptimizer class) of a backend."""
    if kind == "torchrpc":
        import torchrpc.autograd as dist_autograd
        from torchrpc.optim import DistributedOptimizer
    else:
        import torch.distributed.autograd as dist_autograd
        from torch.distributed.optim import DistributedOptimizer
    return dist_autograd, DistributedOptimizer


def torchrpc_missing() -> List[str]:
    return [m for m in ("torchrpc.autograd", "torchrpc.optim")
            if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------------------
# Models. Module level: both processes import them; w1 constructs the stages.


def _param_summary(module: nn.Module) -> torch.Tensor:
    """(sum, norm) of every parameter, in float64: compared across backends."""
    return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().norm()])
                        for p in module.parameters()])


class Stage(nn.Module):
    """A model part living on w1."""

    def __init__(self, seed: int, widths: List[int]):
        super().__init__()
        torch.manual_seed(seed)
        layers: List[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.seq = nn.Sequential(*layers)

    def forward(self, x):
        return self.seq(x)

    def parameter_rrefs(self):
        return [_RPC.RRef(p) for p in self.parameters()]

    def param_summary(self):
        return _param_summary(self)


class TinyStage(Stage):
    def __init__(self):
        super().__init__(1, [4, 4])


class MLPTail(Stage):  # layers 3-4
    def __init__(self):
        super().__init__(2, [1024, 1024, 1024])


class DistModel:
    """The driver's view: an optional local head, then the stage on w1."""

    def __init__(self, stage_cls, head: nn.Module = None):
        self.head = head
        self.stage = _RPC.remote(CALLEE, stage_cls)

    def forward(self, x):
        if self.head is not None:
            x = self.head(x)
        return self.stage.rpc_sync().forward(x)

    def parameter_rrefs(self):
        local = [] if self.head is None else [_RPC.RRef(p) for p in self.head.parameters()]
        return local + self.stage.rpc_sync().parameter_rrefs()

    def param_summary(self):
        remote = self.stage.rpc_sync().param_summary()
        return remote if self.head is None else torch.cat([_param_summary(self.head), remote])


def make_tiny():
    g = torch.Generator().manual_seed(10)
    return DistModel(TinyStage), torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)


def make_mlp():
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 1024, generator=g)
    return DistModel(MLPTail, head), x, torch.randn(64, 1024, generator=g)


CASES = {
    "tiny": ("Linear(4,4) on w1, batch 2", make_tiny),
    "mlp": ("4 x Linear(1024,1024), 2 on w0 + 2 on w1, batch 64", make_mlp),
}


def case_train(kind: str, make, cfg: Config):
    """Times warmup + steps training steps; returns ({part: p50/min ms}, param summary)."""
    dist_autograd, DistributedOptimizer = dist_modules(kind)
    model, x, target = make()
    opt = DistributedOptimizer(optim.SGD, model.parameter_rrefs(), lr=LR)
    clock = time.perf_counter_ns

    def step():
        t0 = clock()
        with dist_autograd.context() as context_id:
            loss = F.mse_loss(model.forward(x), target)
            t1 = clock()
            dist_autograd.backward(context_id, [loss])
            t2 = clock()
            opt.step(context_id)
            t3 = clock()
        t4 = clock()
        return (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)

    for _ in range(cfg.warmup):
        step()
    gc.collect()
    samples = [step() for _ in range(cfg.steps)]
    values = {}
    for i, part in enumerate(PARTS):
        ms = sorted(s[i] / 1e6 for s in samples)
        values[f"{part}_p50_ms"] = _percentile(ms, 0.50)
        if part == "step":
            values["step_min_ms"] = ms[0]
            values["step_p90_ms"] = _percentile(ms, 0.90)
    summary = model.param_summary()
    del model, opt
    gc.collect()
    return values, summary


# ---------------------------------------------------------------------------
# The two processes (the shape of bench_rpc.py's, with these cases)


def _run_phase(rank, backend_name, port, cfg: Config, cases, results, done):
    global _RPC
    b = BACKENDS[backend_name]()
    b.init(rank, port, cfg.rpc)
    _RPC = b.rpc
    try:
        if rank == 0:
            for name in cases:
                t0 = time.monotonic()
                try:
                    values, summary = case_train(b.kind, CASES[name][1], cfg)
                    results.put(("case", backend_name, name, "ok", values, summary, ""))
                except Exception:
                    results.put(("case", backend_name, name, "error", {}, None,
                                 traceback.format_exc()))
                print(f"  [{backend_name}] {name}: {time.monotonic() - t0:.1f} s",
                      file=sys.stderr, flush=True)
        elif not done.wait(cfg.timeout):
            raise TimeoutError(f"rank 1: phase {backend_name} did not finish in time")
    finally:
        if rank == 0:
            done.set()
        gc.collect()  # drop RRefs before the graceful shutdown counts them
        b.shutdown(cfg.rpc)
        _RPC = None


def _worker(rank, plan, cfg: Config, cases, results, events):
    torch.set_num_threads(1)
    for (backend_name, port), done in zip(plan, events):
        try:
            _run_phase(rank, backend_name, port, cfg, cases, results, done)
        except BaseException:
            results.put(("phase", backend_name, rank, traceback.format_exc()))
            done.set()
    results.put(("exit", rank))


def run(cfg: Config, order: List[str], cases: List[str]) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    events = [ctx.Event() for _ in order]
    plan = list(zip(order, free_ports(len(order))))
    report = {"cases": {b: {} for b in order}, "errors": []}
    timeout_error = f"did not finish within {cfg.timeout:.0f} s"

    def handle(msg):
        if msg[0] == "case":
            _, backend, name, status, values, summary, detail = msg
            report["cases"][backend][name] = {"status": status, "values": values,
                                              "summary": summary, "detail": detail}
            if status == "error":
                report["errors"].append(f"{backend}/{name} failed:\n{detail}")
                print(detail, file=sys.stderr, flush=True)
        elif msg[0] == "phase":
            _, backend, rank, detail = msg
            report["errors"].append(f"phase {backend} failed on rank {rank}:\n{detail}")
            print(f"  [{backend}] phase FAILED on rank {rank}:\n{detail}",
                  file=sys.stderr, flush=True)
            # The peer may now wait for it forever: give the run 30 s more at most.
            return (30.0, timeout_error)
        return None

    run_workers(ctx, _worker, (plan, cfg, cases, results, events), results, "bench-train",
                cfg.timeout, handle, report["errors"], timeout_error=timeout_error,
                died_error="{name} died (exit code {code})", terminate=False)
    return report


# ---------------------------------------------------------------------------
# Report


def rows_of(report: dict, cases: List[str]) -> List[dict]:
    rows = []
    for name in cases:
        s = report["cases"].get(SUBJECT, {}).get(name, {})
        a = report["cases"].get(ANCHOR, {}).get(name, {})
        agree = None
        if s.get("summary") is not None and a.get("summary") is not None:
            agree = bool(torch.allclose(s["summary"], a["summary"], rtol=1e-3, atol=1e-4))
        for part in PARTS:
            key = f"{part}_p50_ms"
            sv, av = s.get("values", {}).get(key), a.get("values", {}).get(key)
            rows.append({"case": name, "metric": key, SUBJECT: sv, ANCHOR: av,
                         "ratio": sv / av if sv is not None and av else None,
                         "params_agree": agree if part == "step" else None})
    return rows


def print_table(rows: List[dict]):
    def fmt(v):
        return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.3f}")

    head = ["case", "metric", "torchrpc", "torch", "ratio torchrpc/torch", "params"]
    lines = []
    for r in rows:
        agree = {True: "agree", False: "DIFFER", None: ""}[r["params_agree"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append([r["case"], r["metric"], fmt(r[SUBJECT]), fmt(r[ANCHOR]), ratio, agree])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    line_fmt = "  ".join(("{:<%d}" if i < 2 or i == 5 else "{:>%d}") % w
                         for i, w in enumerate(widths))
    print(line_fmt.format(*head))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(line_fmt.format(*line))
    print("p50 milliseconds per training step (lower is better); step = forward + backward + "
          "opt_step + ctx_exit.\ntorch = torch.distributed.rpc (TensorPipe, default options) "
          "+ torch.distributed.autograd + torch.distributed.optim.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 100)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10)")
    ap.add_argument("--quick", action="store_true", help="10 steps after 3 warm-up steps")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: tiny,mlp")
    ap.add_argument("--order", default=f"{SUBJECT},{ANCHOR}",
                    help="backends in the order their phases run, each at most once")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' for none)")
    args = ap.parse_args(argv)

    cfg = Config(timeout=args.timeout)
    if args.quick:
        cfg.steps, cfg.warmup = 10, 3
    if args.steps is not None:
        cfg.steps = args.steps
    if args.warmup is not None:
        cfg.warmup = args.warmup
    cfg.rpc.phase_timeout = args.timeout
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r} (choose from {', '.join(CASES)})")
    order = [b.strip() for b in args.order.split(",") if b.strip()]
    for b in order:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if len(set(order)) != len(order):
        ap.error("each backend runs at most once (torch.distributed.rpc's RRefs work only "
                 "under a process's first init_rpc)")
    skipped = {}
    missing = torchrpc_missing()
    if SUBJECT in order and missing:
        skipped[SUBJECT] = f"{', '.join(missing)} not available yet"
        order.remove(SUBJECT)

    print(f"bench_train: {cfg.steps} steps after {cfg.warmup} warm-up, backends {order}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr, flush=True)
    for b, why in skipped.items():
        print(f"  [{b}] skipped: {why}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    report = run(cfg, order, cases) if order else {"cases": {}, "errors": []}
    elapsed = time.monotonic() - t0
    rows = rows_of(report, cases)
    print()
    print_table(rows)
    for b, why in skipped.items():
        print(f"{b}: skipped ({why})")
    print(f"\nelapsed {elapsed:.1f} s")
    errors = list(report["errors"])
    errors += [f"params differ between backends: {r['case']}"
               for r in rows if r["params_agree"] is False]

    if args.out:
        doc = {
            "benchmark": "train",
            "subject": SUBJECT, "anchor": ANCHOR, "order": order, "skipped": skipped,
            "config": {"steps": cfg.steps, "warmup": cfg.warmup, "lr": LR, "cases": cases},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "cpus": os.cpu_count()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(elapsed, 1),
            "rows": rows,
            "raw": {b: {n: {k: v for k, v in c.items() if k != "summary"}
                        for n, c in cs.items()} for b, cs in report["cases"].items()},
            "errors": errors,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.out}")
    if errors:
        print("\nFAILED:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
