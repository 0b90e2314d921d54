"""torch's own RPC test suite, run on TensorPipe and on torchrpc.

    python benchmarks/torch_suite.py                 # every selected method, both backends (long)
    python benchmarks/torch_suite.py -k rref_proxy   # methods whose name contains a pattern
    python benchmarks/torch_suite.py --only test_rref_str --backend torchrpc
    python benchmarks/torch_suite.py --list          # the selection and what it leaves out, why

Runs the public-API methods of RpcTest
(torch.testing._internal.distributed.rpc.rpc_test) twice: with torch's
TensorPipe fixture, and with torchrpc behind torch.distributed.rpc's public
names (see torch_suite_classes.py). Both use torch's TCP init mode
(RPC_INIT_WITH_TCP=1): torchrpc rendezvouses over tcp:// or env:// only, and
one mode for both keeps the columns comparable. Each method spawns its 4
workers afresh, as in torch's CI. Prints a table (test, TensorPipe, torchrpc)
with totals; writes benchmarks/results/torch_suite.json (a run narrowed by
-k/--only/--backend writes torch_suite_partial.json instead). What the
workers print goes to benchmarks/results/torch_suite.log.
"""

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import platform
import re
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BACKENDS = {"tensorpipe": "TensorPipeRpcTest", "torchrpc": "TorchrpcRpcTest"}

# -- which methods: the selection rule -------------------------------------------
#
# "Public-API methods": the methods of RpcTest whose code uses only public
# torch.distributed.rpc names. A method's code is its body and decorators,
# the RpcTestCommon helpers it calls through self, and the module-level
# functions and classes of rpc_test it names, transitively (what runs on the
# callee counts too). A method is left out when that code touches
#   - a private name of torch.distributed.rpc or a submodule (rpc._x,
#     rpc.api._x, rpc.internal, rpc.backend_registry, rpc.constants,
#     rpc._get_current_rpc_agent, rpc._set_rpc_timeout, ...), imports a
#     submodule for its internals, or patches them with unittest.mock;
#   - the agent internals rpc_test imports (PRIVATE_IMPORTS), among them the
#     dist_utils helpers that poll RRef-context debug counters;
#   - private RRef methods (_get_type, _get_future, _get_profiling_future);
#   - torch.distributed.autograd, the legacy RPC profiler (_profile), or CUDA.
# Faulty agents have suites of their own, not in RpcTest. RPCExecMode is
# allowed: tests use it only to pick which public call a helper makes
# (rpc_sync, rpc_async or remote).

PRIVATE_IMPORTS = {
    "_get_debug_info", "_rref_context_get_debug_info", "_thread_local_var", "_use_rpc_pickler",
    "_wait_all", "_build_rpc_profiling_key", "_internal_rpc_pickler", "PythonUDF", "_profile",
    "StubRpcAgent", "wait_until_pending_futures_and_users_flushed",
    "wait_until_owners_and_forks_on_rank", "get_num_owners_and_forks", "dist_autograd",
    "skip_if_lt_x_gpu",
}
PRIVATE_RPC_MODULES = {"internal", "backend_registry", "constants"}
PRIVATE_RREF_METHODS = {"_get_type", "_get_future", "_get_profiling_future"}
# The test classes themselves: a method reaches its helpers through self.
_SUITE_CLASSES = {"RpcTest", "RpcTestCommon"}


def _dotted(node):
    """'rpc.api._x' for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id] + parts[::-1])


def _private_rpc_use(dotted):
    """The private part of a dotted name under torch.distributed.rpc, or None."""
    for prefix in ("torch.distributed.rpc.", "rpc."):
        if dotted.startswith(prefix):
            for part in dotted[len(prefix):].split("."):
                dunder = part.startswith("__")
                if part in PRIVATE_RPC_MODULES or (part.startswith("_") and not dunder):
                    return f"rpc.{dotted[len(prefix):]}"
    if dotted.startswith("torch.distributed.autograd"):
        return "torch.distributed.autograd"
    if dotted.startswith("torch.cuda"):
        return "CUDA"
    return None


def _reasons(node):
    """Why `node`'s own code (not what it calls) is not public-API."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            dotted = _dotted(n)
            private = dotted and _private_rpc_use(dotted)
            if private:
                found.add(private)
            if n.attr in PRIVATE_RREF_METHODS:
                found.add(f"RRef.{n.attr}")
            if n.attr == "cuda":
                found.add("CUDA")
            if dotted and dotted.startswith("mock.patch"):
                found.add("mock.patch")
        elif isinstance(n, ast.Name) and n.id in PRIVATE_IMPORTS:
            found.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
            found.update(f"import {m}" for m in modules if m.startswith("torch.distributed.rpc."))
    # rpc.backend_registry.register_backend says no more than rpc.backend_registry
    return {r for r in found if not any(r.startswith(s + ".") for s in found)}


def _source_tree(module):
    """The parsed source of `module`, found without importing it: a worker
    must not import torch's test module before torch_suite_classes redirects."""
    with open(importlib.util.find_spec(module).origin) as f:
        return ast.parse(f.read())


def selection():
    """(selected method names in source order, {left-out name: sorted reasons})."""
    tree = _source_tree("torch.testing._internal.distributed.rpc.rpc_test")
    top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    suite_methods = {
        m.name: m
        for cls in _SUITE_CLASSES
        for m in top[cls].body
        if isinstance(m, ast.FunctionDef)
    }
    tests = [m.name for m in top["RpcTest"].body
             if isinstance(m, ast.FunctionDef) and m.name.startswith("test_")]
    selected, left_out = [], {}
    for name in tests:
        reasons, seen, todo = set(), {name}, [suite_methods[name]]
        while todo:
            node = todo.pop()
            reasons |= _reasons(node)
            for n in ast.walk(node):
                dotted = _dotted(n) if isinstance(n, ast.Attribute) else None
                if dotted and dotted.startswith("self.") and n.attr in suite_methods:
                    callee, target = n.attr, suite_methods[n.attr]
                elif isinstance(n, ast.Name) and n.id in top and n.id not in _SUITE_CLASSES:
                    callee, target = n.id, top[n.id]
                else:
                    continue
                if callee not in seen:
                    seen.add(callee)
                    todo.append(target)
        if reasons:
            left_out[name] = sorted(reasons)
        else:
            selected.append(name)
    return selected, left_out


# -- running ----------------------------------------------------------------------


class _Outcomes(unittest.TestResult):
    """test name -> (outcome, seconds, first line of the cause, full text)."""

    def __init__(self):
        super().__init__()
        self.outcomes = {}
        self._t0 = 0.0

    def startTest(self, test):
        super().startTest(test)
        self._t0 = time.monotonic()

    def _record(self, test, outcome, text=""):
        name = test.id().split(".")[-1]
        self.outcomes[name] = (outcome, round(time.monotonic() - self._t0, 2), _cause(text), text)

    def addSuccess(self, test):
        self._record(test, "pass")

    def addFailure(self, test, err):
        self._record(test, "FAIL", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        self._record(test, "FAIL", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        self._record(test, "skip", reason)


def _cause(text):
    """One line saying why a method failed: the first worker's exception
    (MultiProcessTestCase reports each failed worker's traceback), else the
    parent's own (a timeout)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "exited with error code" in line:
            block = []
            for later in lines[i + 1:]:
                if "exited with error code" in later:
                    break
                block.append(later)
            exc = [ln for ln in block if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
            if exc:
                return exc[-1][:300]
    return (lines[-1] if lines else "")[:300]


@contextlib.contextmanager
def _output_to(log_path):
    """Sends this process's stdout/stderr (and so the workers', which inherit
    them) to `log_path`; yields a stream on the terminal's stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            terminal.close()


def run_backend(backend, names, log_path, terminal):
    import torch_suite_classes
    from tqdm import tqdm

    cls = torch_suite_classes.suite(BACKENDS[backend])
    result = _Outcomes()
    bar = tqdm(names, desc=f"{backend:>10}", file=terminal, unit="test", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name[5:40])
        with open(log_path, "a") as log:
            log.write(f"\n===== {backend} {name} =====\n")
        cls(name).run(result)
        if result.outcomes.get(name, ("",))[0] == "FAIL":
            bar.write(f"  {backend} FAIL {name}: {result.outcomes[name][2]}", file=terminal)
    return result.outcomes


# -- reporting --------------------------------------------------------------------


def table(names, results, backends):
    width = max([len(n) for n in names] + [4])
    head = f"{'test':<{width}}  " + "  ".join(f"{b:>10}" for b in backends)
    lines = [head, "-" * len(head)]
    for name in names:
        cells = [results[b].get(name, ("-",))[0] for b in backends]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>10}" for c in cells))
    lines.append("-" * len(head))
    for outcome in ("pass", "FAIL", "skip"):
        counts = [sum(1 for n in names if results[b].get(n, ("",))[0] == outcome) for b in backends]
        lines.append(f"{outcome:<{width}}  " + "  ".join(f"{c:>10}" for c in counts))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", dest="pattern", help="only methods whose name contains this")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="only this method (repeatable)")
    p.add_argument("--backend", choices=["both", *BACKENDS], default="both")
    p.add_argument("--timeout", type=int, default=120,
                   help="seconds one method may take before its workers are killed")
    p.add_argument("--list", action="store_true", help="print the selection and exit")
    args = p.parse_args()

    selected, left_out = selection()
    if args.list:
        print(f"selected ({len(selected)}):")
        print("\n".join(f"  {n}" for n in selected))
        print(f"left out ({len(left_out)}):")
        print("\n".join(f"  {n}: {', '.join(r)}" for n, r in left_out.items()))
        return 0
    names = list(selected)
    for only in args.only:
        if only not in selected:
            why = left_out.get(only)
            left = f" (left out: {', '.join(why)})" if why else ""
            p.error(f"{only} is not a selected method{left}")
    if args.only:
        names = [n for n in names if n in args.only]
    if args.pattern:
        names = [n for n in names if args.pattern in n]
    if not names:
        p.error("no selected method matches")
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    partial = len(names) != len(selected) or len(backends) != len(BACKENDS)

    # Read by torch's common_distributed at import; RPC_INIT_WITH_TCP by the
    # fixtures and by the tests that skip under TCP init.
    os.environ["DISTRIBUTED_TESTS_DEFAULT_TIMEOUT"] = str(args.timeout)
    os.environ["RPC_INIT_WITH_TCP"] = "1"
    os.makedirs(RESULTS, exist_ok=True)
    log_path = os.path.join(RESULTS, "torch_suite.log")
    open(log_path, "w").close()

    import torch

    results = {}
    started = time.monotonic()
    with _output_to(log_path) as terminal:
        for backend in backends:
            results[backend] = run_backend(backend, names, log_path, terminal)
    elapsed = time.monotonic() - started

    print(table(names, results, backends))
    failures = {b: {n: r[2] for n, r in results[b].items() if r[0] == "FAIL"} for b in backends}
    for b in backends:
        if failures[b]:
            print(f"\n{b} failures:")
            print("\n".join(f"  {n}: {cause}" for n, cause in failures[b].items()))
    totals = {b: {o: sum(1 for r in results[b].values() if r[0] == o)
                  for o in ("pass", "FAIL", "skip")}
              for b in backends}
    summary = {
        "what": "torch.testing._internal.distributed.rpc.rpc_test.RpcTest, public-API methods",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "init": "RPC_INIT_WITH_TCP=1",
        "filter": {"k": args.pattern, "only": args.only, "backend": args.backend},
        "seconds": round(elapsed, 1),
        "selected": len(selected),
        "ran": len(names),
        "totals": totals,
        "results": {n: {b: {"outcome": results[b][n][0], "seconds": results[b][n][1],
                            "cause": results[b][n][2]}
                         for b in backends if n in results[b]} for n in names},
        "left_out": left_out,
        "failure_text": {b: {n: r[3][-4000:] for n, r in results[b].items() if r[0] == "FAIL"}
                         for b in backends},
    }
    out = os.path.join(RESULTS, "torch_suite_partial.json" if partial else "torch_suite.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{len(names)} methods in {elapsed:.0f} s; "
          + "; ".join(f"{b} {t['pass']}/{len(names)} pass" for b, t in totals.items())
          + f"\nwrote {os.path.relpath(out)}; worker output in {os.path.relpath(log_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
