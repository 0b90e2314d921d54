"""Workers calling each other over real loopback sockets, in real processes."""

import os
import signal
import threading
import time
from typing import List

import pytest
import torch
from rpc_harness import assert_transport, run_workers, transports_used

import torchrpc


@torch.jit.script
def add(x: torch.Tensor, y: torch.Tensor, alpha: int = 1) -> torch.Tensor:
    return x + alpha * y


@torch.jit.script
def concat(xs: List[torch.Tensor], sep: str) -> str:
    return sep.join([str(x.numel()) for x in xs])


@torch.jit.script
def fail_with(kind: str) -> int:
    if kind == "value":
        raise ValueError("bad value")
    if kind == "runtime":
        return torch.ones(2).view(3).numel()  # a failing op
    return 0


class AppError(Exception):
    """A user exception class importable on both sides."""


def raise_app_error(msg):
    raise AppError(msg)


def raise_local_class():
    class Hidden(Exception):
        pass

    raise Hidden("not importable on the caller")


def slow_echo(x, seconds):
    time.sleep(seconds)
    return x


def udf_scale(t, k=2):
    return {"scaled": t * k, "same": t}


def _register():
    torchrpc.register(add)
    torchrpc.register(concat)
    torchrpc.register(fail_with)


# -- bodies (run in worker processes) ---------------------------------------


def body_every_form(rank):
    _register()
    if rank != 0:
        return None
    x, y = torch.arange(4.0), torch.ones(4)
    out = {}
    out["fn"] = torchrpc.rpc_sync("w1", add, (x, y))
    out["kwargs"] = torchrpc.rpc_sync(1, add, (x,), {"y": y, "alpha": 3})
    info = torchrpc.get_worker_info("w1")
    out["by_name"] = torchrpc.rpc_sync(info, add.qualified_name, (x, y))
    out["list_arg"] = torchrpc.rpc_sync("w1", concat, ([x, y[:2]], "-"))
    out["builtin"] = torchrpc.rpc_sync("w1", torch.add, (x, 10))
    out["overload"] = torchrpc.rpc_sync("w1", torch.ops.aten.mul.Tensor, (x, x))
    out["udf"] = torchrpc.rpc_sync("w1", udf_scale, (x,), {"k": 3})
    out["self"] = torchrpc.rpc_sync("w0", add, (x, y))
    fut = torchrpc.rpc_async("w1", add, (x, y))
    out["async_then"] = fut.then(lambda f: f.value() * 2).wait()
    out["udf_async"] = torchrpc.rpc_async("w1", len, ([1, 2, 3],)).wait()
    out["info"] = (torchrpc.get_worker_info(), info)
    return out


def body_errors(rank):
    _register()
    if rank != 0:
        return None
    errors = {}

    def catch(key, fn):
        try:
            fn()
            errors[key] = None
        except Exception as e:
            errors[key] = (type(e), str(e))

    x = torch.ones(2)
    catch("wrong_type", lambda: torchrpc.rpc_sync("w1", add, (x, "no")))
    catch("too_many", lambda: torchrpc.rpc_sync("w1", add, (x, x, 1, 2)))
    catch("bad_kwarg", lambda: torchrpc.rpc_sync("w1", add, (x, x), {"beta": 1}))
    catch("by_name_wrong", lambda: torchrpc.rpc_sync("w1", add.qualified_name, ("a",)))
    catch("unknown", lambda: torchrpc.rpc_sync("w1", "no.such.fn", (1,)))
    catch("value", lambda: torchrpc.rpc_sync("w1", fail_with, ("value",)))
    catch("runtime", lambda: torchrpc.rpc_sync("w1", fail_with, ("runtime",)))
    catch("async_value", lambda: torchrpc.rpc_async("w1", fail_with, ("value",)).wait())
    catch("app", lambda: torchrpc.rpc_sync("w1", raise_app_error, ("boom",)))
    catch("hidden", lambda: torchrpc.rpc_sync("w1", raise_local_class))
    catch("udf_refused", lambda: torchrpc.rpc_sync("w2", len, ([1],)))
    # Skip the caller's check: the callee itself must refuse, without unpickling.
    state = torchrpc.api._current()
    pickled, tensors = torchrpc.python_udf.dumps((len, ([1],), {}))
    catch("callee_refused", lambda: state.agent.python_call(2, "len", pickled, tensors, 5.0, True))
    catch("bad_dest", lambda: torchrpc.rpc_sync("w9", add, (x, x)))
    catch("bad_builtin_args", lambda: torchrpc.rpc_sync("w1", torch.add, ("a", [])))
    return errors


def body_timeout(rank):
    if rank != 0:
        return None
    t0 = time.monotonic()
    with pytest.raises(torchrpc.RpcTimeoutError) as info:
        torchrpc.rpc_sync("w1", slow_echo, (1, 2.0), timeout=0.3)
    elapsed = time.monotonic() - t0
    fut = torchrpc.rpc_async("w1", slow_echo, (2, 2.0), timeout=0.2)
    with pytest.raises(TimeoutError):
        fut.wait()
    # The late replies arrive and are dropped; the connection keeps working.
    time.sleep(2.2)
    after = torchrpc.rpc_sync("w1", slow_echo, (3, 0.0), timeout=0)
    return elapsed, str(info.value), after


def body_peer_killed(rank):
    if rank == 1:
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        time.sleep(30)
        return None
    futs = [torchrpc.rpc_async("w1", slow_echo, (i, 20.0), timeout=60) for i in range(4)]
    time.sleep(0.2)
    t0 = time.monotonic()
    kinds = []
    for f in futs:
        try:
            f.wait()
            kinds.append(None)
        except Exception as e:
            kinds.append((type(e).__name__, str(e)))
    waited = time.monotonic() - t0
    with pytest.raises(torchrpc.PeerLostError):
        torchrpc.rpc_sync("w1", add, (torch.ones(1), torch.ones(1)))
    return kinds, waited


def body_all_to_all(rank):
    _register()
    n = 4
    futs = []
    for peer in range(n):
        for i in range(64):
            x = torch.full((3,), float(rank * 1000 + i))
            futs.append((x, torchrpc.rpc_async(peer, add, (x, torch.ones(3)), {"alpha": peer})))
    bad = 0
    for idx, (x, f) in enumerate(futs):
        peer = idx // 64
        if not torch.equal(f.wait(), x + peer):
            bad += 1
    return bad, len(futs)


def body_graceful(rank):
    _register()
    if rank == 1:
        futs = [torchrpc.rpc_async("w0", slow_echo, (i, 0.01)) for i in range(30)]
        used = transports_used()  # before shutdown() forgets the connection
        torchrpc.shutdown()  # must wait for every pending call
        results = [f.wait() for f in futs]
        with pytest.raises(torchrpc.RpcShutdownError):
            torchrpc.rpc_sync("w0", add, (torch.ones(1), torch.ones(1)))
        return results, used
    return None


def body_not_graceful(rank):
    # w0 hosts the rendezvous store: it must not leave while w1 still reads it
    # in init_rpc. w1 touches the store no more after its add.
    store = torchrpc.api._current().store
    store.add("initialized", 1)
    while rank == 0 and store.add("initialized", 0) < 2:
        time.sleep(0.01)
    t0 = time.monotonic()
    torchrpc.shutdown(graceful=False)
    took = time.monotonic() - t0
    with pytest.raises(torchrpc.RpcShutdownError):
        torchrpc.rpc_sync("w0", add, (torch.ones(1), torch.ones(1)))
    return took


# -- tests --------------------------------------------------------------------


def test_calls_in_every_form(transport):
    out = run_workers(body_every_form, 2, options={"python_udf": True}, transport=transport)[0]
    x, y = torch.arange(4.0), torch.ones(4)
    assert torch.equal(out["fn"], x + y)
    assert torch.equal(out["kwargs"], x + 3 * y)
    assert torch.equal(out["by_name"], x + y)
    assert out["list_arg"] == "4-2"
    assert torch.equal(out["builtin"], x + 10)
    assert torch.equal(out["overload"], x * x)
    assert torch.equal(out["udf"]["scaled"], x * 3) and torch.equal(out["udf"]["same"], x)
    assert torch.equal(out["self"], x + y)
    assert torch.equal(out["async_then"], (x + y) * 2)
    assert out["udf_async"] == 3
    me, peer = out["info"]
    assert (me.name, me.id, peer.name, peer.id) == ("w0", 0, "w1", 1)


def test_errors_name_what_went_wrong(transport):
    opts = [{"python_udf": True}, {"python_udf": True}, {"python_udf": False}]
    errors = run_workers(body_errors, 3, options=opts, transport=transport)[0]
    for key in ("wrong_type", "too_many", "bad_kwarg", "by_name_wrong"):
        cls, msg = errors[key]
        assert issubclass(cls, torchrpc.ArgumentError) and issubclass(cls, TypeError), key
        assert "add" in msg and "w1" in msg, msg
    assert "Tensor" in errors["wrong_type"][1] and "y" in errors["wrong_type"][1]
    cls, msg = errors["unknown"]
    assert issubclass(cls, torchrpc.FunctionNotFoundError) and "no.such.fn" in msg and "w1" in msg
    cls, msg = errors["value"]
    assert cls is ValueError and "bad value" in msg and "w1" in msg and "fail_with" in msg
    assert "Remote traceback" in msg
    cls, msg = errors["runtime"]
    assert cls is RuntimeError and "fail_with" in msg and "shape" in msg
    assert errors["async_value"][0] is ValueError
    assert errors["app"][0] is AppError and "boom" in errors["app"][1]
    cls, msg = errors["hidden"]
    assert cls is torchrpc.RemoteError and "not importable" in msg
    for key in ("udf_refused", "callee_refused"):
        cls, msg = errors[key]
        assert cls is torchrpc.PythonCallDisabledError, key
        assert "w2" in msg and "python_udf" in msg
    assert issubclass(errors["bad_dest"][0], ValueError)
    assert issubclass(errors["bad_builtin_args"][0], torchrpc.ArgumentError)


def test_timeouts_raise_and_late_replies_are_dropped(transport):
    elapsed, msg, after = run_workers(body_timeout, 2, options={"python_udf": True},
                                      transport=transport)[0]
    assert 0.25 < elapsed < 1.5
    assert "slow_echo" in msg and "w1" in msg and "0.3" in msg
    assert after == 3


def test_killed_peer_fails_pending_calls_fast(transport):
    kinds, waited = run_workers(
        body_peer_killed, 2, options={"python_udf": True}, graceful=[False, False], may_die=(1,),
        transport=transport,
    )[0]
    assert waited < 3.0, waited
    for kind in kinds:
        assert kind is not None and kind[0] == "PeerLostError"
        assert "w1" in kind[1]


def test_four_workers_all_to_all(transport):
    for bad, total in run_workers(body_all_to_all, 4, timeout=120, transport=transport):
        assert (bad, total) == (0, 4 * 64)


def test_graceful_shutdown_waits_for_pending_calls(transport):
    results, used = run_workers(body_graceful, 2, options={"python_udf": True},
                                transport=transport)[1]
    assert results == list(range(30))
    assert_transport([used], transport)


def test_non_graceful_shutdown_is_immediate(transport):
    for took in run_workers(body_not_graceful, 2, graceful=False, transport=transport):
        assert took < 1.0


def body_never_runs(rank):
    return "ran"


def test_duplicate_names_are_rejected():
    import multiprocessing as mp

    from rpc_harness import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    q = ctx.Queue()
    procs = [ctx.Process(target=_init_as, args=("same", r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    assert all("duplicate worker name 'same'" in g for g in got), got
    assert all("is not unique" in g for g in got), got  # torch's words


def _init_as(name, rank, port, q):
    try:
        torchrpc.init_rpc(name, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                          options=torchrpc.RpcOptions(init_timeout=20))
        q.put("initialized")
    except Exception as e:
        q.put(f"{type(e).__name__}: {e}")
    q.close()
    q.join_thread()
    os._exit(0)


def test_calls_before_init_fail_clearly():
    # torch's words first ("^RPC has not been initialized"), then torchrpc's advice.
    with pytest.raises(torchrpc.RpcShutdownError, match="^RPC has not been initialized.*init_rpc"):
        torchrpc.rpc_sync("w1", add, (torch.ones(1), torch.ones(1)))
    with pytest.raises(RuntimeError, match="^Current RPC agent is not set! Did you initialize"):
        torchrpc.RRef(torch.ones(1))


def test_invalid_names_and_ranks():
    with pytest.raises(ValueError, match="invalid worker name"):
        torchrpc.init_rpc("bad name!", rank=0, world_size=1, init_method="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="rank"):
        torchrpc.init_rpc("ok", rank=3, world_size=2, init_method="tcp://127.0.0.1:1")
