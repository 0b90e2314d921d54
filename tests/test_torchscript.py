"""RPC from inside TorchScript: torch.ops.torchrpc, typed stubs, ScriptModules
saved and loaded in fresh processes, and the scripted_ops library."""

import json
import os
import subprocess
import sys
import textwrap
from typing import Any, List

import pytest
import torch
from rpc_harness import assert_transport, free_port, run_workers

import scripted_ops
import torchrpc
from torchrpc.stubs import stub

add_stub = stub(scripted_ops.add)
sleep_stub = stub(scripted_ops.sleep_ms)


@torch.jit.script
def raises_value_error(x: int) -> int:
    if x > 0:
        raise ValueError("positive input")
    return x


@torch.jit.script
def call_any(to: str, name: str, x: torch.Tensor) -> torch.Tensor:
    args: List[Any] = [x, x]
    r = torch.ops.torchrpc.rpc_async(to, name, args).wait()
    assert isinstance(r, torch.Tensor)
    return r


@torch.jit.script
def call_typed(to: str, x: torch.Tensor) -> torch.Tensor:
    fut = add_stub.rpc_async(to, x, x)
    y = add_stub.rpc_sync(to, x, x)
    return add_stub.wait(fut) + y


@torch.jit.script
def call_raising(to: str) -> int:
    args: List[Any] = [1]
    r = torch.ops.torchrpc.rpc_sync(to, "__torch__.test_torchscript.raises_value_error", args)
    assert isinstance(r, int)
    return r


@torch.jit.script
def call_sleep(to: str, ms: int, timeout: float) -> int:
    return sleep_stub.rpc_sync(to, ms, timeout)


@torch.jit.script
def call_unknown(to: str) -> int:
    args: List[Any] = []
    r = torch.ops.torchrpc.rpc_sync(to, "no.such.function", args)
    assert isinstance(r, int)
    return r


def body_torchscript_calls(rank):
    torchrpc.register(raises_value_error)
    if rank != 0:
        return None
    x = torch.arange(3.0)
    out = {}
    out["any"] = call_any("w1", scripted_ops.mul.qualified_name, x)
    out["builtin"] = call_any("w1", "aten::mul.Tensor", x)
    out["typed"] = call_typed("w1", x)
    out["self"] = call_typed("w0", x)
    out["py_op"] = torch.ops.torchrpc.rpc_async("w1", scripted_ops.add.qualified_name, [x, x]).wait()
    out["py_op_sync"] = torch.ops.torchrpc.rpc_sync("w1", scripted_ops.worker_name.qualified_name, [])
    errors = {}
    for key, fn in [
        ("remote", lambda: call_raising("w1")),
        ("timeout", lambda: call_sleep("w1", 3000, 0.2)),
        ("unknown", lambda: call_unknown("w1")),
        ("bad_args", lambda: torch.ops.torchrpc.rpc_sync("w1", scripted_ops.add.qualified_name, [1])),
        ("bad_worker", lambda: call_typed("nobody", x)),
    ]:
        try:
            fn()
            errors[key] = None
        except Exception as e:
            errors[key] = (type(e), str(e))
    out["errors"] = errors
    return out


def test_calls_from_torchscript(transport):
    out = run_workers(body_torchscript_calls, 2, transport=transport)[0]
    x = torch.arange(3.0)
    assert torch.equal(out["any"], x * x)
    assert torch.equal(out["builtin"], x * x)
    assert torch.equal(out["typed"], 4 * x)
    assert torch.equal(out["self"], 4 * x)
    assert torch.equal(out["py_op"], 2 * x)
    assert out["py_op_sync"] == "w1"
    errors = out["errors"]
    # Inside the TorchScript interpreter an error surfaces as RuntimeError
    # (the interpreter re-wraps foreign exceptions) carrying the remote
    # class, message and worker.
    cls, msg = errors["remote"]
    assert issubclass(cls, RuntimeError)
    assert "ValueError" in msg and "positive input" in msg and "w1" in msg
    cls, msg = errors["timeout"]
    assert issubclass(cls, RuntimeError) and "timed out" in msg and "sleep_ms" in msg and "0.2" in msg
    cls, msg = errors["unknown"]
    assert issubclass(cls, RuntimeError) and "no.such.function" in msg and "w1" in msg
    cls, msg = errors["bad_args"]
    assert issubclass(cls, torchrpc.ArgumentError) and "add" in msg
    cls, msg = errors["bad_worker"]
    assert "nobody" in msg


def test_typed_stub_rejects_wrong_arguments_at_compile_time():
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor'"):

        @torch.jit.script
        def wrong(to: str) -> torch.Tensor:
            return add_stub.rpc_sync(to, "not a tensor", 3)


def test_typed_stub_returns_declared_type():
    assert add_stub.rpc_sync.schema.returns[0].type.annotation_str == "Tensor"
    assert sleep_stub.rpc_sync.schema.returns[0].type.annotation_str == "int"
    assert [a.name for a in add_stub.rpc_sync.schema.arguments] == ["to", "x", "y", "timeout"]


def body_scripted_ops(rank):
    if rank != 0:
        return None
    call = torchrpc.rpc_sync
    x = torch.arange(4.0)
    out = {
        "echo": call("w1", scripted_ops.echo, (x,)),
        "identity": call("w1", scripted_ops.identity, ([x, x[:2]],)),
        "matmul": call("w1", scripted_ops.matmul, (x.view(2, 2), x.view(2, 2))),
        "name": call("w1", scripted_ops.worker_name),
        "sleep": call("w1", scripted_ops.sleep_ms, (5,)),
    }
    call("w1", scripted_ops.param_put, ("w", x))
    call("w1", scripted_ops.param_add_, ("w", torch.ones(4)))
    out["param"] = call("w1", scripted_ops.param_get, ("w",))
    try:
        call("w1", scripted_ops.param_get, ("missing",))
    except Exception as e:
        out["missing"] = str(e)
    return out


def test_scripted_ops_remotely(transport):
    out = run_workers(body_scripted_ops, 2, transport=transport)[0]
    x = torch.arange(4.0)
    assert torch.equal(out["echo"], x)
    assert [t.tolist() for t in out["identity"]] == [x.tolist(), [0.0, 1.0]]
    assert torch.equal(out["matmul"], x.view(2, 2) @ x.view(2, 2))
    assert out["name"] == "w1"
    assert out["sleep"] == 5
    assert torch.equal(out["param"], x + 1)
    assert "missing" in out["missing"]


class Remote(torch.nn.Module):
    """A module whose forward calls a remote function; the worker is an attribute."""

    def __init__(self, to: str):
        super().__init__()
        self.to = to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = add_stub.rpc_sync(self.to, x, x)
        args: List[Any] = [y, x]
        z = torch.ops.torchrpc.rpc_sync(self.to, "__torch__.scripted_ops.mul", args, 10.0)
        assert isinstance(z, torch.Tensor)
        return z


def test_saved_module_calls_remote_functions_in_a_fresh_process(tmp_path, transport):
    path = tmp_path / "remote.pt"
    torch.jit.save(torch.jit.script(Remote("w1")), str(path))
    # Each worker is a bare interpreter: it imports torchrpc and nothing else,
    # and learns its transport from TORCHRPC_TRANSPORTS, as a launched job would.
    code = textwrap.dedent(
        f"""
        import json, os, torch, torchrpc
        rank = int(os.environ["RANK"])
        torchrpc.init_rpc(f"w{{rank}}")
        if rank == 0:
            m = torch.jit.load({str(path)!r})
            print("RESULT", m(torch.arange(3.0)).tolist())
            conns = torchrpc.debug_info()["connections"]
            print("USED", json.dumps({{p: c["transport"] for p, c in conns.items()}}))
        torchrpc.shutdown()
        """
    )
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE="2", TORCHRPC_TRANSPORTS=transport)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "RESULT [0.0, 2.0, 8.0]" in outs[0], outs[0]
    used = [json.loads(line[len("USED "):]) for line in outs[0].splitlines()
            if line.startswith("USED ")]
    assert len(used) == 1, outs[0]
    assert_transport(used, transport)
