"""Programs written for torch.distributed.rpc, run on torchrpc with only the
import changed (`import torchrpc as rpc`) and TORCHRPC_PYTHON_UDF=1 set.

Each multi-process program runs once (a module fixture) and several tests
check parts of what it returns; expected behaviour is torch's own, as its
RPC test suite (torch/testing/_internal/distributed/rpc/rpc_test.py) checks it.
"""

import inspect
import io
import os
import pickle
import re
import sys
import threading
import time
import warnings
from typing import Any, List

import pytest
import torch
from rpc_harness import free_port, report_from_child, spawn_and_collect
from torch import Tensor
from torch.futures import Future

import torchrpc as rpc
from torchrpc import python_udf


# -- launching: torch's way of starting workers ---------------------------------


def _child(body, rank, world_size, port, threads, slow_init_rank, queue):
    def run():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHRPC_PYTHON_UDF="1")
        if rank == slow_init_rank:
            _delay_end_of_rendezvous(1.0)
        options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=threads, rpc_timeout=30)
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size,
                     rpc_backend_options=options)
        result = body(rank)
        rpc.shutdown(graceful=True, timeout=60)
        return result

    report_from_child(rank, queue, run)


def _delay_end_of_rendezvous(seconds):
    """This worker learns the other workers `seconds` late, while its peers,
    done with init_rpc, may already be calling it."""
    from torchrpc import rendezvous

    exchange = rendezvous.exchange

    def slow_exchange(*args, **kwargs):
        infos = exchange(*args, **kwargs)
        time.sleep(seconds)
        return infos

    rendezvous.exchange = slow_exchange


def launch(body, world_size=3, threads=None, slow_init_rank=None, timeout=120):
    """[body(rank) for each rank]: each rank starts as a torch program would,
    init_rpc(f"worker{rank}", rank=, world_size=, rpc_backend_options=
    TensorPipeRpcBackendOptions(...)) with env:// rendezvous. threads: per-rank
    num_worker_threads (default 4)."""
    port = free_port()
    threads = threads or [4] * world_size
    return spawn_and_collect(
        _child, lambda r: (body, r, world_size, port, threads[r], slow_init_rank),
        world_size, timeout, label="worker",
    )


class Checks(dict):
    """key -> ("ok", value) or (exception class name, message, is RuntimeError,
    is ValueError): every check runs, whatever the others do."""

    def run(self, key, fn):
        try:
            self[key] = ("ok", fn())
        except Exception as e:
            self[key] = (type(e).__name__, str(e), isinstance(e, RuntimeError),
                         isinstance(e, ValueError))

    def ok(self, key):
        outcome = self[key]
        assert outcome[0] == "ok", f"{key}: {outcome}"
        return outcome[1]


# -- functions the programs call (module level: pickled by reference) -----------


def identity(x):
    return x


def whoami():
    return rpc.get_worker_info().name


def fetch(rref):
    return rref.to_here()


def pass_on(rref, to):
    """A user forwards an RRef it received to another worker."""
    return rpc.rpc_sync(to, fetch, args=(rref,))


def check_rref_confirmed(rref):
    return rref.confirmed_by_owner()


@torch.jit.script
def script_rref_confirmed(rref: torch.classes.torchrpc.RRef) -> bool:
    return rref.confirmed_by_owner()


def slow_add(x, y, seconds):
    time.sleep(seconds)
    return x + y


class Counter:
    def __init__(self, v):
        self.v = v

    def add(self, k):
        self.v += k
        return self.v


class CustomException(Exception):
    """Its constructor takes more than a message, so the caller cannot
    rebuild it from one (torch's test has the same)."""

    def __init__(self, flag, msg):
        self.flag = flag
        super().__init__(msg)


def custom_raise():
    raise CustomException(True, "foo")


def raise_value_error():
    raise ValueError("Expected error from the callee")


def forget(name):
    """Removes a module-level function on this worker only: callers still
    have it, and pickle it by reference."""
    delattr(sys.modules[__name__], name)


def forgotten():
    return "ran"


_stderr = []
_released = threading.Event()


def blocked():
    return _released.wait(30)


def release():
    _released.set()


def capture_stderr():
    _stderr.append(sys.stderr)
    sys.stderr = io.StringIO()


def captured_stderr():
    text = sys.stderr.getvalue()
    sys.stderr = _stderr.pop()
    return text


@rpc.functions.async_execution
def async_raise():
    raise ValueError("Expected error")


@rpc.functions.async_execution
def async_wrong_type():
    return torch.zeros(2, 2)


# -- a torch program: init, worker infos, RRefs, proxies, futures, errors -------


def torch_program(rank):
    if rank != 0:
        return None
    c = Checks()
    t = torch.arange(4.0)
    # First thing: a self-owned RRef, through a user, to a third worker that
    # is still finishing init_rpc (slow_init_rank=2).
    local = rpc.RRef(t)
    c.run("rref_str_owner", lambda: str(local))  # this worker's first id
    c.run("forward_to_third", lambda: rpc.rpc_sync("worker1", pass_on, args=(local, "worker2")))

    options = rpc.api._current().options
    c.run("options", lambda: (options.num_worker_threads, options.rpc_timeout, options.python_udf))
    me, peer = rpc.get_worker_info(), rpc.get_worker_info("worker1")
    c.run("infos", lambda: (me.name, me.id, peer.name, peer.id,
                            rpc.rpc_sync(peer, identity, args=(me,)) == me))
    c.run("by_rank", lambda: rpc.rpc_sync(2, whoami))

    box = rpc.remote("worker1", Counter, args=(1,))
    c.run("rref_local", lambda: (local.owner() == me, local.owner_name(), local.is_owner(),
                                 local.local_value().tolist(), local.to_here(timeout=5).tolist()))
    c.run("rref_remote", lambda: (box.owner() == peer, box.owner_name(), box.is_owner(),
                                  box.to_here(timeout=5).v))
    c.run("proxy_object", lambda: (box.rpc_sync().add(2), box.rpc_async().add(3).wait(),
                                   box.remote().add(4).to_here()))
    c.run("proxy_future_type", lambda: type(box.rpc_async().add(0)).__name__)
    on_w2 = rpc.remote("worker2", torch.add, args=(torch.ones(2, 2), 1))
    c.run("proxy_tensor", lambda: (tuple(on_w2.rpc_sync().size()),
                                   on_w2.rpc_async().add(1).wait().tolist(),
                                   on_w2.remote().view(4).to_here().tolist()))
    c.run("rref_python_containers", lambda: (
        [x.v for x in rpc.rpc_sync("worker1", fetch, args=(rpc.RRef([Counter(5), Counter(6)]),))],
        rpc.RRef([]).local_value()))

    futs = [rpc.rpc_async("worker1", torch.add, args=(t, i)) for i in range(3)]
    futs.append(rpc.rpc_async("worker2", slow_add, args=(t, 1, 0.05)))
    c.run("wait_all", lambda: [v.tolist() for v in torch.futures.wait_all(futs)])
    # torch's test_wait_all_exit_early_python: the first failed call ends
    # wait_all, while another call is still running.
    slow = rpc.rpc_async("worker1", blocked)
    c.run("wait_all_failed", lambda: torch.futures.wait_all(
        [slow, rpc.rpc_async("worker1", raise_value_error)]))
    c.run("wait_all_slow_still_running", lambda: slow.done())
    rpc.rpc_sync("worker1", release)
    c.run("wait_all_slow_finished", lambda: slow.wait())
    c.run("then", lambda: rpc.rpc_async("worker1", torch.add, args=(t, 1))
          .then(lambda f: f.value() + 1).wait().tolist())
    c.run("then_python", lambda: rpc.rpc_async("worker1", slow_add, args=(t, 1, 0.0))
          .then(lambda f: f.value() + 1).wait().tolist())

    # A callback that waits for another RPC (torch's test_callback_with_ret).
    # The first call is slow, so the callback runs when its reply arrives, not
    # at once in then(); the inner timeout turns a hang into an error.
    def callback(f):
        return rpc.rpc_async("worker1", torch.add, args=(f.wait(), 1), timeout=2).wait() + 1

    c.run("then_waits_for_rpc", lambda: rpc.rpc_async("worker1", slow_add, args=(t, 1, 0.3))
          .then(callback).wait().tolist())

    # torch's test_user_rrefs_confirmed: a user RRef received as an argument
    # (a fork from worker0 of a value on worker2) is confirmed when the call runs.
    on_w2_again = rpc.remote("worker2", torch.add, args=(torch.zeros(2, 2), 1))
    c.run("confirmed_rpc_arg", lambda: rpc.rpc_sync("worker1", check_rref_confirmed,
                                                    args=(on_w2_again,)))
    c.run("confirmed_remote_arg", lambda: rpc.remote("worker1", check_rref_confirmed,
                                                     args=(on_w2_again,)).to_here())
    c.run("confirmed_script_arg", lambda: rpc.rpc_sync("worker1", script_rref_confirmed,
                                                       args=(on_w2_again,)))

    # Errors, as torch raises them.
    one = torch.ones(1)
    for how in ("rpc_sync", "rpc_async", "remote"):
        call = getattr(rpc, how)
        for key, to in (("name", "worker9"), ("rank", 3), ("negative", -1), ("float", 0.5)):
            c.run(f"bad_{key}_{how}", lambda call=call, to=to: call(to, torch.add, args=(one, 1)))
    c.run("bad_worker_info", lambda: rpc.get_worker_info("WorkerUnknown"))
    c.run("missing_sync", lambda: box.rpc_sync().non_exist())
    c.run("missing_async", lambda: box.rpc_async().non_exist().wait())
    c.run("missing_remote", lambda: box.remote().non_exist())
    c.run("missing_remote_self", lambda: rpc.RRef(Counter(1)).remote().non_exist())
    c.run("pickle_rref", lambda: pickle.dumps(local))
    c.run("torch_save_rref", lambda: torch.save(rpc.RRef(35), io.BytesIO()))
    c.run("async_raise", lambda: rpc.rpc_sync("worker1", async_raise))
    c.run("async_wrong_type", lambda: rpc.rpc_async("worker1", async_wrong_type).wait())
    c.run("async_wrong_type_remote", lambda: rpc.remote("worker1", async_wrong_type).to_here())

    # torch's words and formats, where torch programs and tests match on them.
    user = rpc.remote("worker1", torch.add, args=(t, 1))
    c.run("rref_str_user", lambda: str(user))
    c.run("local_value_user", lambda: user.local_value())
    c.run("worker_info_repr", lambda: repr(rpc.get_worker_info("worker1")))
    c.run("rpc_timeout", rpc.get_rpc_timeout)
    c.run("reinit", lambda: rpc.init_rpc("worker0", rank=0, world_size=3,
                                         rpc_backend_options=rpc.TensorPipeRpcBackendOptions()))
    rpc.rpc_sync("worker1", forget, args=("forgotten",))
    c.run("not_on_callee", lambda: rpc.rpc_sync("worker1", forgotten))
    c.run("after_not_on_callee", lambda: rpc.rpc_sync("worker1", whoami))
    c.run("custom_exception", lambda: rpc.rpc_sync("worker1", custom_raise))
    rpc.rpc_sync("worker2", capture_stderr)
    c.run("raise_value", lambda: rpc.rpc_sync("worker2", raise_value_error))
    c.run("callee_stderr", lambda: rpc.rpc_sync("worker2", captured_stderr))
    return dict(c)


@pytest.fixture(scope="module")
def program():
    return Checks(launch(torch_program, 3, slow_init_rank=2)[0])


def test_init_with_tensorpipe_options_and_env_opt_in(program):
    assert program.ok("options") == (4, 30.0, True)
    assert program.ok("infos") == ("worker0", 0, "worker1", 1, True)
    assert program.ok("by_rank") == "worker2"


def test_self_owned_rref_through_a_user_to_a_worker_still_initializing(program):
    assert program.ok("forward_to_third").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_rref_api(program):
    assert program.ok("rref_local") == (True, "worker0", True, [0.0, 1.0, 2.0, 3.0],
                                        [0.0, 1.0, 2.0, 3.0])
    assert program.ok("rref_remote") == (True, "worker1", False, 1)
    assert program.ok("proxy_object") == (3, 6, 10)
    assert program.ok("proxy_future_type") == "Future"
    assert program.ok("proxy_tensor") == ((2, 2), [[3.0, 3.0], [3.0, 3.0]], [2.0] * 4)
    assert program.ok("rref_python_containers") == ([5, 6], [])


def test_futures(program):
    assert program.ok("wait_all") == [[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0],
                                      [2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0]]
    assert program.ok("then") == [2.0, 3.0, 4.0, 5.0]
    assert program.ok("then_python") == [2.0, 3.0, 4.0, 5.0]


def test_wait_all_ends_at_the_first_failed_python_call(program):
    cls, msg = program["wait_all_failed"][:2]
    assert cls == "ValueError" and "Expected error from the callee" in msg, (cls, msg)
    assert program.ok("wait_all_slow_still_running") is False
    assert program.ok("wait_all_slow_finished") is True


def test_then_callback_may_wait_for_another_rpc(program):
    assert program.ok("then_waits_for_rpc") == [3.0, 4.0, 5.0, 6.0]


def test_received_user_rrefs_are_confirmed(program):
    assert program.ok("confirmed_rpc_arg") is True
    assert program.ok("confirmed_remote_arg") is True
    assert program.ok("confirmed_script_arg") is True


def test_invalid_destinations_raise_runtime_error(program):
    for how in ("rpc_sync", "rpc_async", "remote"):
        for key in ("name", "rank", "negative"):
            cls, msg, is_runtime, _ = program[f"bad_{key}_{how}"]
            assert is_runtime, (how, key, cls, msg)
        # torch: a rank that is not an int is a ValueError
        cls, msg, _, is_value = program[f"bad_float_{how}"]
        assert is_value, (how, cls, msg)
    cls, msg, is_runtime, _ = program["bad_worker_info"]
    assert is_runtime and "could not find destination" in msg, (cls, msg)


def test_proxy_for_missing_attribute_raises_attribute_error(program):
    # remote(): from the call itself, on a user and on the owner, as in torch
    for key in ("missing_sync", "missing_async", "missing_remote", "missing_remote_self"):
        cls, msg = program[key][:2]
        assert cls == "AttributeError" and "has no attribute 'non_exist'" in msg, (key, cls, msg)


def test_rrefs_and_worker_infos_print_as_in_torch(program):
    assert program.ok("rref_str_owner") == "OwnerRRef(GloballyUniqueId(created_on=0, local_id=0))"
    user = re.fullmatch(r"UserRRef\(RRefId = GloballyUniqueId\(created_on=0, local_id=(\d+)\), "
                        r"ForkId = GloballyUniqueId\(created_on=0, local_id=(\d+)\)\)",
                        program.ok("rref_str_user"))
    assert user, program.ok("rref_str_user")
    rref_id, fork_id = int(user[1]), int(user[2])
    assert fork_id == rref_id + 1  # one counter, the RRef's id first
    assert program.ok("worker_info_repr") == "WorkerInfo(id=1, name=worker1)"
    cls, msg, is_runtime, _ = program["local_value_user"]
    assert is_runtime and msg == (
        f"For UserRRef(rref_id=GloballyUniqueId(created_on=0, local_id={rref_id}), "
        f"fork_id=GloballyUniqueId(created_on=0, local_id={fork_id})), can't call localValue() "
        f"on user WorkerInfo(id=0, name=worker0). Call it on owner WorkerInfo(id=1, name=worker1)"
    ), msg


def test_errors_carry_torch_words(program):
    assert program.ok("rpc_timeout") == 30.0
    cls, msg, is_runtime, _ = program["reinit"]
    assert is_runtime and "is already initialized" in msg, (cls, msg)
    # A function the callee cannot import: a RuntimeError naming it and the
    # callee, with torch's phrase; the callee goes on serving.
    cls, msg, is_runtime, _ = program["not_on_callee"]
    assert cls == "FunctionNotFoundError" and is_runtime, (cls, msg)
    assert "RPC pickler does not serialize function code" in msg, msg
    assert "forgotten" in msg and "worker1" in msg, msg
    assert program.ok("after_not_on_callee") == "worker1"
    # An exception the caller cannot rebuild from its message.
    cls, msg, is_runtime, _ = program["custom_exception"]
    assert cls == "RemoteError" and is_runtime, (cls, msg)
    assert "Original exception on remote side was" in msg and "CustomException" in msg, msg
    assert "foo" in msg, msg


def test_failed_python_call_is_printed_on_the_callee(program):
    cls, msg = program["raise_value"][:2]
    assert cls == "ValueError" and "Expected error from the callee" in msg
    printed = program.ok("callee_stderr")
    assert "On WorkerInfo(id=2, name=worker2)" in printed, printed
    assert "ValueError('Expected error from the callee')" in printed, printed
    assert "raise_value_error" in printed, printed  # the traceback


def test_rref_pickled_outside_rpc_raises(program):
    for key in ("pickle_rref", "torch_save_rref"):
        cls, msg, is_runtime, _ = program[key]
        assert is_runtime and "Can not pickle rref in python pickler" in msg, (key, cls, msg)


def test_async_execution_errors_reach_the_caller(program):
    cls, msg = program["async_raise"][:2]
    assert cls == "ValueError" and "Expected error" in msg
    for key in ("async_wrong_type", "async_wrong_type_remote"):
        cls, msg, is_runtime, _ = program[key]
        assert is_runtime and "must return a torch.futures.Future object" in msg, (key, msg)


# -- without processes ----------------------------------------------------------


def test_signatures_match_torch():
    import torch.distributed.rpc as trpc

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(rpc.init_rpc)[:5] == params(trpc.init_rpc)
    assert params(rpc.TensorPipeRpcBackendOptions) == params(trpc.TensorPipeRpcBackendOptions)
    assert params(rpc.rpc_sync)[:4] == params(trpc.rpc_sync)[:4]
    assert params(rpc.get_worker_info) == params(trpc.get_worker_info)
    assert [b.name for b in rpc.BackendType] == [b.name for b in trpc.BackendType]
    assert issubclass(rpc.TensorPipeRpcBackendOptions, rpc.RpcBackendOptions)


def test_tensorpipe_only_options_warn_once():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plain = rpc.TensorPipeRpcBackendOptions(num_worker_threads=3, rpc_timeout=5)
        assert not seen
        opts = rpc.TensorPipeRpcBackendOptions(device_maps={"w1": {0: 1}}, devices=[0])
        assert len(seen) == 1 and "device_maps, devices" in str(seen[0].message)
        opts.set_device_map("w1", {1: 2})
        assert len(seen) == 2 and "set_device_map" in str(seen[1].message)
    assert (plain.num_worker_threads, plain.rpc_timeout, plain.init_method) == (3, 5, "env://")
    assert opts.device_maps == {"w1": {0: 1, 1: 2}}


def test_python_udf_env_opt_in(monkeypatch):
    monkeypatch.delenv("TORCHRPC_PYTHON_UDF", raising=False)
    assert rpc.RpcOptions().python_udf is False
    monkeypatch.setenv("TORCHRPC_PYTHON_UDF", "1")
    assert rpc.RpcOptions().python_udf is True
    assert rpc.RpcOptions(python_udf=False).python_udf is False


def test_init_rpc_rejects_bad_arguments_before_starting():
    local = "tcp://127.0.0.1:1"  # never reached: each call fails first
    with pytest.raises(RuntimeError, match="invalid worker name") as bad_name:
        rpc.init_rpc("abc*", rank=0, world_size=1, init_method=local)
    assert isinstance(bad_name.value, ValueError)  # torchrpc's earlier class, still true
    with pytest.raises(RuntimeError, match="rank"):
        rpc.init_rpc("w", rank=2, world_size=2, init_method=local)
    with pytest.raises(TypeError, match="backend"):
        rpc.init_rpc("w", backend="tensorpipe", rank=0, world_size=1)
    with pytest.raises(TypeError, match="rpc_backend_options"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options={"rpc_timeout": 1})
    with pytest.raises(TypeError, match="not both"):
        rpc.init_rpc("w", rank=0, world_size=1, options=rpc.RpcOptions(),
                     rpc_backend_options=rpc.TensorPipeRpcBackendOptions(init_method=local))
    # torch's test_invalid_names: its words, its limit
    for bad in ("abc*", " ", "", "a" * 128, "a" * 500):
        with pytest.raises(RuntimeError, match="invalid worker name") as e:
            rpc.WorkerInfo(bad, 0)
        for words in ("Worker name must match", "must be non-empty", "shorter than 128"):
            assert words in str(e.value), (bad, str(e.value))
    assert rpc.WorkerInfo("a" * 127, 0).name == "a" * 127
    with pytest.raises(TypeError, match="Argument backend must be a member of BackendType"):
        rpc.init_rpc("w", backend="TENSORPIPE", rank=0, world_size=1)
    with pytest.raises(TypeError, match="Argument rpc_backend_options must be an instance of Rpc"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options={"init_method": local})
    # torch infers the backend from the options' class: a plain
    # RpcBackendOptions (or a subclass of it) names none
    with pytest.raises(TypeError, match="Could not infer backend for options"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=rpc.RpcBackendOptions(
            init_method=local))


def test_worker_info_pickles_and_prints_as_in_torch():
    info = rpc.WorkerInfo("worker3", 3)
    assert pickle.loads(pickle.dumps(info)) == info
    assert repr(info) == str(info) == "WorkerInfo(id=3, name=worker3)"


# -- async_execution: the Python half of the contract, in one process ------------

_parked = {}


@rpc.functions.async_execution
def park(key, x):
    """Returns a Future that the test completes later."""
    fut = Future()
    _parked[key] = fut
    return fut


@rpc.functions.async_execution
def park_then(key, x):
    return park(key, x).then(lambda f: f.value() + 1)


class AsyncExecutionClass:
    @staticmethod
    @rpc.functions.async_execution
    def static_async_add(to, x, y, z):
        return rpc.rpc_async(to, torch.add, args=(x, y)).then(lambda fut: fut.wait() + z)

    @classmethod
    @rpc.functions.async_execution
    def class_async_add(cls, to, x, y, z):
        ret_fut = Future()
        rpc.rpc_async(to, torch.add, args=(x, y)).then(
            lambda fut: ret_fut.set_result(fut.wait() + z))
        return ret_fut

    @rpc.functions.async_execution
    def bound_async_add(self, to, x, y, z):
        return rpc.rpc_async(to, torch.add, args=(x, y)).then(lambda fut: fut.wait() + z)


@torch.jit.script
def script_add(x: Tensor, y: Tensor) -> Tensor:
    return x + y


@rpc.functions.async_execution
@torch.jit.script
def async_script_fork(x: Tensor, y: Tensor) -> Future[Tensor]:
    return torch.jit.fork(script_add, x, y)


@rpc.functions.async_execution
@torch.jit.script
def async_script_rpc(to: str, x: Tensor, y: Tensor) -> Future[Any]:
    args: List[Any] = [x, y]
    return torch.ops.torchrpc.rpc_async(to, "__torch__.scripted_ops.add", args)


def _reply(result):
    assert result[0] == "future", result
    fut = result[1]
    assert isinstance(fut, Future)
    return fut


def test_async_execution_marks():
    is_async = rpc.functions._is_async_execution
    assert is_async(park) and is_async(AsyncExecutionClass.static_async_add)
    assert is_async(AsyncExecutionClass.class_async_add)
    assert is_async(AsyncExecutionClass().bound_async_add)
    assert not is_async(identity)
    assert park.__name__ == "park" and park._wrapped_async_rpc_function.__name__ == "park"
    # On TorchScript: still the ScriptFunction, registrable and callable as usual.
    assert isinstance(async_script_fork, torch.jit.ScriptFunction)
    rpc.register(async_script_fork)
    assert torch.equal(async_script_fork(torch.ones(2), torch.ones(2)).wait(), 2 * torch.ones(2))


def test_python_call_replies_when_the_future_completes():
    x = torch.arange(3.0)
    fut = _reply(python_udf.run_python_call(*python_udf.dumps((park, ("ok", x), {}))))
    assert not fut.done()
    _parked.pop("ok").set_result({"y": x * 2})
    kind, pickled, tensors = fut.wait()
    assert kind == "ok" and torch.equal(python_udf.loads(pickled, tensors)["y"], x * 2)

    fut = _reply(python_udf.run_python_call(*python_udf.dumps((park, ("err", x), {}))))
    _parked.pop("err").set_exception(ValueError("boom"))
    kind, cls, msg, tb = fut.wait()  # the error tuple: the future itself never fails
    assert (kind, cls, msg) == ("err", "builtins.ValueError", "boom")

    # A Future made by then() (a torch._C.Future) counts too.
    fut = _reply(python_udf.run_python_call(*python_udf.dumps((park_then, ("then", x), {}))))
    _parked.pop("then").set_result(x)
    kind, pickled, tensors = fut.wait()
    assert kind == "ok" and torch.equal(python_udf.loads(pickled, tensors), x + 1)

    fut = _reply(python_udf.run_python_remote(*python_udf.dumps((park, ("remote", x), {}))))
    owned = Counter(7)
    _parked.pop("remote").set_result(owned)
    assert fut.wait() == ("ok", owned)

    # Failing before any future exists: the error tuple, at once.
    kind, cls, msg, _ = python_udf.run_python_call(*python_udf.dumps((async_wrong_type, (), {})))
    assert (kind, cls) == ("err", "builtins.RuntimeError") and "torch.futures.Future" in msg
    kind, cls, msg, _ = python_udf.run_python_remote(*python_udf.dumps((async_raise, (), {})))
    assert (kind, cls, msg) == ("err", "builtins.ValueError", "Expected error")


# -- async_execution across processes (the callee's C++ waits for the Future) ----


class BatchingServer:
    """torch's batch-updating parameter server tutorial: every caller's
    future completes when the n-th caller of a round has arrived."""

    def __init__(self, n):
        self.n = n
        self.lock = threading.Lock()
        self.round = 0
        self.total = torch.zeros(2)
        self.waiting = []

    @staticmethod
    @rpc.functions.async_execution
    def update(server_rref, grad):
        self = server_rref.local_value()
        fut = Future()
        with self.lock:
            self.total += grad
            self.waiting.append(fut)
            if len(self.waiting) < self.n:
                return fut
            done, self.waiting = self.waiting, []
            self.round += 1
            result = (self.round, self.total.clone())
        for f in done:
            f.set_result(result)
        return fut


def batch_trainers(server_rref, threads, rounds):
    """Runs on a caller process: `threads` trainers in flight at once."""
    results = [None] * threads

    def trainer(i):
        try:
            results[i] = [
                rpc.rpc_sync(server_rref.owner(), BatchingServer.update,
                             args=(server_rref, torch.ones(2)), timeout=30)[0]
                for _ in range(rounds)
            ]
        except Exception as e:
            results[i] = f"{type(e).__name__}: {e}"

    pool = [threading.Thread(target=trainer, args=(i,)) for i in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return results


def async_program(rank):
    """worker0 serves with two threads; worker1 drives; worker2 helps."""
    if rank != 1:
        return None
    c = Checks()
    x, y, z = torch.ones(2, 2), 1, 2
    for how in ("rpc_sync", "rpc_async", "remote"):
        def run(fn, args, how=how):
            out = getattr(rpc, how)("worker0", fn, args=args)
            if how == "rpc_sync":
                return out
            return out.wait() if how == "rpc_async" else out.to_here()

        c.run(f"static_{how}", lambda run=run: run(AsyncExecutionClass.static_async_add,
                                                   ("worker2", x, y, z)).tolist())
        c.run(f"class_{how}", lambda run=run: run(AsyncExecutionClass.class_async_add,
                                                  ("worker2", x, y, z)).tolist())
        c.run(f"script_fork_{how}", lambda run=run: run(async_script_fork, (x, x)).tolist())
        c.run(f"script_rpc_{how}",
              lambda run=run: run(async_script_rpc, ("worker2", x, x)).tolist())
    obj = rpc.remote("worker0", AsyncExecutionClass)
    c.run("proxy_sync", lambda: [obj.rpc_sync().static_async_add("worker2", x, y, z).tolist(),
                                 obj.rpc_sync().class_async_add("worker2", x, y, z).tolist(),
                                 obj.rpc_sync().bound_async_add("worker2", x, y, z).tolist()])
    c.run("proxy_async",
          lambda: obj.rpc_async().bound_async_add("worker2", x, y, z).wait().tolist())
    c.run("proxy_remote",
          lambda: obj.remote().bound_async_add("worker2", x, y, z).to_here().tolist())

    # 8 trainers in flight (4 threads here, 4 on worker2) against 2 server threads.
    server = rpc.remote("worker0", BatchingServer, args=(8,))
    t0 = time.monotonic()
    elsewhere = rpc.rpc_async("worker2", batch_trainers, args=(server, 4, 3), timeout=60)
    here = batch_trainers(server, 4, 3)
    c.run("batching", lambda: (here + elsewhere.wait(), time.monotonic() - t0))
    return dict(c)


@pytest.fixture(scope="module")
def async_results():
    try:
        return Checks(launch(async_program, 3, threads=[2, 4, 4])[1])
    except Exception as e:  # reported by each test, which then fails with it
        return Checks(launch_failed=(type(e).__name__, str(e)))


@pytest.mark.parametrize("how", ["rpc_sync", "rpc_async", "remote"])
def test_async_static_and_class_methods(async_results, how):
    expected = (torch.ones(2, 2) + 3).tolist()
    assert "launch_failed" not in async_results, async_results["launch_failed"]
    assert async_results.ok(f"static_{how}") == expected
    assert async_results.ok(f"class_{how}") == expected


@pytest.mark.parametrize("how", ["rpc_sync", "rpc_async", "remote"])
def test_async_torchscript_functions(async_results, how):
    assert "launch_failed" not in async_results, async_results["launch_failed"]
    assert async_results.ok(f"script_fork_{how}") == (2 * torch.ones(2, 2)).tolist()
    assert async_results.ok(f"script_rpc_{how}") == (2 * torch.ones(2, 2)).tolist()


def test_async_methods_through_rref_proxies(async_results):
    expected = (torch.ones(2, 2) + 3).tolist()
    assert "launch_failed" not in async_results, async_results["launch_failed"]
    assert async_results.ok("proxy_sync") == [expected] * 3
    assert async_results.ok("proxy_async") == expected
    assert async_results.ok("proxy_remote") == expected


def test_batching_server_with_two_threads_serves_eight_waiting_callers(async_results):
    assert "launch_failed" not in async_results, async_results["launch_failed"]
    rounds, took = async_results.ok("batching")
    assert rounds == [[1, 2, 3]] * 8, rounds
    assert took < 20, took
