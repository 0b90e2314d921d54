"""Compiled functions beyond registered TorchScript functions, across processes:
exported programs and AOTInductor packages registered by name, and
ScriptFunctions, ScriptModules and ExportedPrograms shipped by value."""

import os
import sys
import time

import pytest
import torch
from worlds import World

import torchrpc
import torchrpc.compiled
import torchrpc.stubs
from torchrpc import messages

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODULE = "shipped_code"  # tests/programs/shipped_code.py, imported by callers only


def _shipped_code():
    sys.path.insert(0, os.path.join(HERE, "programs"))
    import shipped_code

    return shipped_code


def _bytes_to(name):
    return torchrpc.debug_info()["traffic"][name]["bytes_sent"]


def _imported(module):
    return module in sys.modules


# -- code shipped by value ---------------------------------------------------------


def ship_and_call(kind, to, n):
    """On the caller: calls `kind` of shipped code n times on `to`; returns the
    bytes each call sent, the archive size, and whether results matched."""
    sc = _shipped_code()
    x = torch.randn(2, 8)
    if kind == "function":
        obj, args, local = sc.scale_add, (x, 3.0), sc.scale_add(x, 3.0)
    elif kind == "module":
        obj = sc.scripted_module()
        args, local = (x,), obj(x)
    else:
        obj = sc.exported_program()
        y = torch.randn(2, 4)
        args, local = (x, y), obj.module()(x, y)
    sizes, same = [], True
    for _ in range(n):
        before = _bytes_to(to)
        out = torchrpc.rpc_sync(to, obj, args)
        sizes.append(_bytes_to(to) - before)
        if kind == "exported":
            same &= set(out) == {"sum", "pair"} and isinstance(out["pair"], tuple)
            same &= torch.allclose(out["sum"], local["sum"]) and torch.allclose(out["pair"][1], local["pair"][1])
        else:
            same &= torch.allclose(out, local)
    archive = torchrpc.compiled.shipped(obj).code[2].numel()
    return sizes, archive, bool(same)


def ship_async_and_remote(to):
    sc = _shipped_code()
    x = torch.randn(3, 8)
    module = sc.scripted_module()
    futs = [torchrpc.rpc_async(to, module, (x,)) for _ in range(10)]
    ok = all(torch.allclose(f.wait(), module(x)) for f in futs)
    rref = torchrpc.remote(to, sc.scale_add, (x, 2.0))
    ok = ok and torch.allclose(rref.to_here(), x * 2.0 + 1.0)
    # An exported program's input spec is checked before anything is sent.
    ep = sc.exported_program()
    before = _bytes_to(to)
    try:
        torchrpc.rpc_sync(to, ep, (torch.randn(3, 8), torch.randn(2, 4)))
        refused = None
    except torchrpc.ArgumentError as e:
        refused = str(e)
    return ok, refused, _bytes_to(to) - before


def call_refused(to):
    """What a worker without accept_code answers to shipped code: a module
    (refused by the callee) and a function it never imported (refused here,
    whether called by rpc_sync, rpc_async or remote)."""
    sc = _shipped_code()
    x = torch.randn(2, 8)
    calls = [
        lambda: torchrpc.rpc_sync(to, sc.scripted_module(), (x,)),
        lambda: torchrpc.rpc_sync(to, sc.scale_add, (x, 2.0)),
        lambda: torchrpc.rpc_async(to, sc.scale_add, (x, 2.0)).wait(),
        lambda: torchrpc.remote(to, sc.scale_add, (x, 2.0)).to_here(),
    ]
    refused = []
    for call in calls:
        try:
            call()
            refused.append(None)
        except torchrpc.CodeRefusedError as e:
            refused.append(str(e))
    return refused


def code_cache_state():
    return _imported(SHIPPED_MODULE), torchrpc.debug_info()["code_cache"]


def test_code_shipped_by_value_carries_the_archive_once():
    # w1 accepts code, w2 does not.
    with World(3, options=[{}, {"accept_code": True}, {}]) as world:
        for kind in ("function", "module", "exported"):
            sizes, archive, same = world.do(0, ship_and_call, kind, "w1", 100, timeout=120)
            assert same, kind
            assert sizes[0] > archive, (kind, sizes[0], archive)
            # Every later call carries the code's name alone: far less than the archive.
            assert max(sizes[1:]) < min(archive, 2048), (kind, archive, sorted(sizes[1:])[-3:])
        ok, refused, sent = world.do(0, ship_async_and_remote, "w1")
        assert ok
        assert refused and "argument 'x' as a torch.float32 tensor of shape (2, 8)" in refused
        assert sent == 0
        imported, cache = world.do(1, code_cache_state)
        assert not imported, "the callee imported the shipped module"
        assert cache["entries"] == 3 and cache["loads"] == 3, cache
        module, *function = world.do(0, call_refused, "w2")
        assert module and "accept_code" in module and "nothing was loaded" in module
        for refused in function:
            assert refused and "RpcOptions(accept_code=True)" in refused, function
            assert "'w2'" in refused and "scale_add" in refused, refused
        assert world.do(2, code_cache_state)[1]["loads"] == 0


def fill_cache_then_call(to):
    """With a cache of 2 on the callee, three functions alternate: evicted
    code is sent again transparently."""
    cu = torch.jit.CompilationUnit(
        "def a(x: Tensor) -> Tensor:\n    return x + 1\n"
        "def b(x: Tensor) -> Tensor:\n    return x + 2\n"
        "def c(x: Tensor) -> Tensor:\n    return x + 3\n")
    x = torch.zeros(2)
    fns = [cu.a, cu.b, cu.c]
    results = [torchrpc.rpc_sync(to, f, (x,))[0].item() for _ in range(3) for f in fns]
    return results


def test_evicted_code_is_sent_again():
    with World(2, options=[{}, {"accept_code": True, "code_cache_size": 2}]) as world:
        assert world.do(0, fill_cache_then_call, "w1") == [1.0, 2.0, 3.0] * 3
        _, cache = world.do(1, code_cache_state)
        assert cache["entries"] == 2 and cache["loads"] >= 4, cache


def send_bad_archives(to_rank, address):
    """A member sends WITH_CODE frames whose archives are corrupt; returns
    each reply's (type, message), then checks the worker still serves."""
    from torchrpc.testing import authenticated_socket, read_frame

    state = torchrpc.api._current()
    job_id, secret = state.credentials
    sc = _shipped_code()
    good = torchrpc.compiled.shipped(sc.scripted_module())
    good_id, _, archive = good.code
    exported = torchrpc.compiled.shipped(sc.exported_program())
    truncated = archive[: archive.numel() // 2].clone()
    flipped = archive.clone()
    flipped[len(flipped) // 2] ^= 0xFF
    garbage = torch.randint(0, 255, (4096,), dtype=torch.uint8)
    exp_truncated = exported.code[2][:-100].clone()
    cases = {
        "truncated_same_id": (good_id, "script", truncated),
        "flipped_same_id": (good_id, "script", flipped),
        "truncated_own_id": (None, "script", truncated),
        "garbage_script": (None, "script", garbage),
        "garbage_export": (None, "export", garbage),
        "truncated_export": (None, "export", exp_truncated),
        "unknown_kind": (None, "pickle", garbage),
    }
    replies = {}
    peer = state.workers[to_rank]
    with authenticated_socket(address, 0, to_rank, secret, job_id) as s:
        for i, (name, (code_id, kind, data)) in enumerate(cases.items()):
            code_id = code_id or torchrpc._C.code_id(data)
            call = messages.ScriptCall(qualified_name=code_id, args=(torch.ones(2, 8),), is_async=False)
            m = messages.WithCode(id=i + 1, code_id=code_id, kind=kind, archive=data, wrapped=call)
            s.sendall(m.encode())
            reply = read_frame(s)
            replies[name] = (reply.TYPE.name, reply.fields.get("error_type", ""),
                             reply.fields.get("message", ""))
    still = torchrpc.rpc_sync(peer.name, torch.add, (torch.ones(1), 1))
    return replies, still.item()


def test_corrupted_code_archives_are_refused_clearly():
    # The raw client sends no heartbeats: w1 must not give it up as silent
    # while it loads a large bad archive on a loaded machine.
    with World(2, options=[{}, {"accept_code": True, "peer_timeout": 15.0}], transport="tcp") as world:
        replies, still = world.do(0, send_bad_archives, 1, world.info[1]["address"], timeout=120)
        assert still == 2.0 and world.alive(1)
        for name, (kind, error_type, message) in replies.items():
            assert kind == "EXCEPTION", (name, kind)
            assert error_type == "torchrpc.ArgumentError", (name, error_type, message)
        assert "does not match its name" in replies["truncated_same_id"][2]
        assert "does not match its name" in replies["flipped_same_id"][2]
        assert "not a loadable TorchScript archive" in replies["truncated_own_id"][2]
        assert "not a loadable TorchScript archive" in replies["garbage_script"][2]
        assert "does not load" in replies["garbage_export"][2]
        assert "does not load" in replies["truncated_export"][2]
        assert "unknown kind" in replies["unknown_kind"][2]
        _, cache = world.do(1, code_cache_state)
        assert cache["entries"] == 0


# -- exported programs registered by name --------------------------------------------


def register_exported():
    sc = _shipped_code()
    torchrpc.register(sc.exported_program(), name="two_heads")


def call_exported_by_name(to):
    sc = _shipped_code()
    local = sc.exported_program().module()
    x, y = torch.randn(2, 8), torch.randn(2, 4)
    out = torchrpc.rpc_sync(to, "two_heads", (x, y))
    want = local(x, y)
    equal = torch.allclose(out["sum"], want["sum"]) and torch.allclose(out["pair"][0], want["pair"][0])
    errors = {}
    for label, args in {"wrong_type": (x, 3), "wrong_shape": (torch.randn(3, 8), y),
                        "wrong_dtype": (x.double(), y), "too_few": (x,)}.items():
        try:
            torchrpc.rpc_sync(to, "two_heads", args)
            errors[label] = None
        except torchrpc.ArgumentError as e:
            errors[label] = str(e)
    # From TorchScript, through a typed stub built from the remote schema.
    schema = torchrpc.api._schema_for(torchrpc.api._current(), 1, "two_heads")
    stub = torchrpc.stubs.stub(None, qualified_name="two_heads", schema=schema)

    @torch.jit.script
    def from_script(to: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = stub.rpc_sync(to, x, y)
        s = out["sum"]
        assert isinstance(s, torch.Tensor)
        return s

    scripted = torch.allclose(from_script(to, x, y), want["sum"])
    return equal, errors, scripted


def test_exported_program_registered_by_name():
    with World(2) as world:
        world.do(1, register_exported, timeout=120)
        equal, errors, scripted = world.do(0, call_exported_by_name, "w1", timeout=120)
        assert equal and scripted
        # Checked before sending, from the schema the callee gave.
        assert "Expected a value of type 'Tensor' for argument 'y'" in errors["wrong_type"]
        assert "as a torch.float32 tensor of shape (2, 8), got torch.float32 (3, 8)" in errors["wrong_shape"]
        assert "got torch.float64" in errors["wrong_dtype"]
        assert "takes 2 arguments" in errors["too_few"] or "y" in errors["too_few"]


# -- AOTInductor packages ------------------------------------------------------------


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory):
    """A small model compiled with AOTInductor (takes ~30 s on 2 cores)."""
    sc = _shipped_code()
    ep = sc.exported_program()
    path = str(tmp_path_factory.mktemp("aoti") / "two_heads.pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return path


def register_package(path):
    torchrpc.register(path, name="two_heads_aoti")


def hog_the_gil(seconds_per_switch):
    """Starts a thread that keeps the GIL for `seconds_per_switch` at a time."""
    import threading

    sys.setswitchinterval(seconds_per_switch)
    stop = threading.Event()
    globals()["_hog_stop"] = stop

    def spin():
        while not stop.is_set():
            pass

    threading.Thread(target=spin, daemon=True).start()
    return True


def release_the_gil():
    globals()["_hog_stop"].set()
    sys.setswitchinterval(0.005)
    return True


def time_calls(to, name, n):
    sc = _shipped_code()
    local = sc.exported_program().module()
    x, y = torch.randn(2, 8), torch.randn(2, 4)
    took, same = [], True
    for _ in range(n):
        t0 = time.monotonic()
        out = torchrpc.rpc_sync(to, name, (x, y), timeout=30)
        took.append(time.monotonic() - t0)
        want = local(x, y)
        same &= torch.allclose(out["sum"], want["sum"], atol=1e-5)
        same &= torch.allclose(out["pair"][1], want["pair"][1], atol=1e-5)
    try:
        torchrpc.rpc_sync(to, name, (torch.randn(5, 8), y))
        bad_shape = None
    except torchrpc.ArgumentError as e:
        bad_shape = str(e)
    return sorted(took)[len(took) // 2], max(took), bool(same), bad_shape


def test_aoti_package_runs_without_the_gil(aoti_package):
    with World(2) as world:
        world.do(1, register_package, aoti_package, timeout=120)
        world.do(1, register_exported, timeout=120)
        median, _, same, bad_shape = world.do(0, time_calls, "w1", "two_heads_aoti", 20)
        assert same
        assert bad_shape and "rejected its inputs" in bad_shape
        # The callee's Python now keeps the GIL for 3 s at a time.
        world.send(1, hog_the_gil, 3.0)
        time.sleep(0.5)
        median, slowest, same, _ = world.do(0, time_calls, "w1", "two_heads_aoti", 20, timeout=120)
        assert same and slowest < 1.0, f"an AOTInductor call waited for the GIL: {slowest:.2f} s"
        # The exported program needs the GIL: its call waits (this is what the
        # check above would see if the package's path took the GIL).
        _, gil_slowest, _, _ = world.do(0, time_calls, "w1", "two_heads", 2, timeout=120)
        assert gil_slowest > 1.0, gil_slowest
        world.do(1, release_the_gil, timeout=30)


# -- typed RRefs in TorchScript ---------------------------------------------------------


def typed_remote_roundtrip(to):
    import scripted_ops

    stub = torchrpc.stubs.stub(scripted_ops.add)

    @torch.jit.script
    def remote_sum(to: str, x: torch.Tensor) -> torch.Tensor:
        r = stub.remote(to, x, x)
        y = r.to_here()  # a Tensor, no cast
        return y + 1

    x = torch.ones(3)
    return torch.equal(remote_sum(to, x), x + x + 1)


def test_typed_rref_view_compiles_and_runs():
    with World(2) as world:
        assert world.do(0, typed_remote_roundtrip, "w1", timeout=120)


def test_typed_rref_view_rejects_wrong_types_at_compile_time():
    import scripted_ops

    stub = torchrpc.stubs.stub(scripted_ops.add)

    def wrong_result(to: str, x: torch.Tensor) -> int:
        r = stub.remote(to, x, x)
        y: int = r.to_here()
        return y

    def wrong_argument(to: str, x: torch.Tensor) -> torch.Tensor:
        return stub.remote(to, x, "not a tensor").to_here()

    for fn in (wrong_result, wrong_argument):
        with pytest.raises(RuntimeError) as err:
            torch.jit.script(fn)
        assert "Tensor" in str(err.value)
