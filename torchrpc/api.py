"""The public RPC API. Names follow torch.distributed.rpc so users can switch
with little change; the work happens in torchrpc._C.Agent."""

import atexit
import dataclasses
import gc
import os
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

import scripted_ops
from torchrpc import _C, _handle, compiled, inspect, observe, profiling, python_udf, rendezvous, trust
from torchrpc.observe import metrics, metrics_text
from torchrpc.profiling import add_remote_events, profile, profile_remote, remote_events
from torchrpc._handle import _State, _current, _timeout
from torchrpc.compat import BackendType, RpcBackendOptions, TensorPipeRpcBackendOptions
from torchrpc.rref import RRef, _unwrap, _wrap
from torchrpc.errors import (
    CodeRefusedError,
    FunctionNotFoundError,
    InvalidWorkerError,
    RpcError,
    RpcShutdownError,
    RpcTimeoutError,
)

__all__ = [
    "RpcOptions",
    "BackendType",
    "RpcBackendOptions",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "init_rpc",
    "shutdown",
    "rpc_sync",
    "rpc_async",
    "register",
    "script",
    "get_worker_info",
    "get_rpc_timeout",
    "remote",
    "debug_info",
    "metrics",
    "metrics_text",
    "metrics_port",
    "profile",
    "profile_remote",
    "remote_events",
    "add_remote_events",
    "cancel",
    "RRef",
]


@dataclasses.dataclass
class RpcOptions:
    """Options for init_rpc.

    num_worker_threads: threads that run incoming requests.
    rpc_timeout: default call timeout in seconds (0: none).
    python_udf: run pickled Python callables sent by peers. Off by default
        (unpickling runs arbitrary code) unless the environment variable
        TORCHRPC_PYTHON_UDF=1 is set, which opts in without code changes
        (for programs written for torch.distributed.rpc).
    init_timeout: seconds to wait for every worker at rendezvous.
    shutdown_timeout: default seconds a graceful shutdown waits for peers.
    rref_leaks: what a graceful shutdown does about RRefs still referenced
        once every worker has finished: "ignore", "warn" or "raise".

    Trust and liveness (see README, "Security model"):
    secret: the job's shared secret (str or bytes, at least 16 bytes); else
        TORCHRPC_SECRET or TORCHRPC_SECRET_FILE; else rank 0 draws one per
        job and workers listen on loopback only.
    insecure: allow listening beyond loopback with a store-distributed secret.
    handshake_timeout: seconds a connection may take to authenticate.
    max_pending_handshakes: connections allowed mid-handshake at once.
    max_frame_bytes / max_inflight_bytes: the largest message accepted, and
        the bytes of all messages being received at once.
    heartbeat_interval: an idle connection sends a heartbeat this often.
    peer_timeout: a peer silent this long is declared lost.
    faults: fault injection for tests (TORCHRPC_FAULTS), e.g.
        "RREF_USER_DELETE:drop:0.2,SCRIPT_CALL:delay:0.05".

    Transports (see README, "Transports"):
    transports: the transports to use, in order of preference: "shm"
        (shared memory, same host only) and "tcp". None: TORCHRPC_TRANSPORTS
        (comma-separated), else both, shared memory first, so peers on the
        same host use it and the others TCP.
    shm_ring_bytes: each direction's ring of a shared-memory connection;
        small messages go inline, larger ones stream through it.
    shm_pool_bytes: each direction's pool for tensor bytes: a tensor is
        copied once into it and received as a view of it; when it runs dry,
        tensors stream through the ring instead.

    Code shipped by value (see README, "Compiled functions"):
    accept_code: load and run compiled code that authenticated peers send
        (ScriptFunctions, ScriptModules, ExportedPrograms passed to rpc_sync
        and friends). Off by default; a worker without it refuses such code
        before loading any of it.
    code_cache_size: how many shipped functions stay loaded; the least
        recently used is dropped first (a caller then sends it again).

    Seeing inside (see README, "Seeing inside"):
    metrics: count and time calls (torchrpc.metrics()); off only to measure
        what counting costs.
    metrics_port: serve torchrpc.metrics_text() over HTTP at
        http://metrics_host:metrics_port/metrics (0: any free port). None:
        no HTTP server.
    inspect: answer `python -m torchrpc.inspect PID` on a Unix socket only
        this user can reach.
    """

    num_worker_threads: int = 16
    rpc_timeout: float = 60.0
    python_udf: bool = dataclasses.field(
        default_factory=lambda: os.environ.get("TORCHRPC_PYTHON_UDF", "") == "1"
    )
    init_timeout: float = 120.0
    shutdown_timeout: float = 120.0
    rref_leaks: str = "warn"
    secret: Optional[Union[str, bytes]] = dataclasses.field(default=None, repr=False)
    insecure: bool = False
    handshake_timeout: float = 5.0
    max_pending_handshakes: int = 64
    max_frame_bytes: int = 1 << 40
    max_inflight_bytes: int = 8 << 30
    heartbeat_interval: float = 0.5
    peer_timeout: float = 2.0
    faults: str = dataclasses.field(default_factory=lambda: os.environ.get("TORCHRPC_FAULTS", ""))
    transports: Optional[Sequence[str]] = None
    shm_ring_bytes: int = 4 << 20
    shm_pool_bytes: int = 256 << 20
    accept_code: bool = False
    code_cache_size: int = 64
    metrics: bool = True
    metrics_port: Optional[int] = None
    metrics_host: str = "127.0.0.1"
    inspect: bool = True


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker's name and id (its rank)."""

    name: str
    id: int

    def __post_init__(self):
        rendezvous.check_name(self.name)

    def __repr__(self):
        return f"WorkerInfo(id={self.id}, name={self.name})"  # as torch prints it


_lock = threading.Lock()  # init_rpc and shutdown set and clear the handle (torchrpc._handle)
# Name -> a ScriptFunction, or a _C.Callable (exported program, AOTInductor package).
_registered: Dict[str, object] = {}


def init_rpc(
    name: str,
    backend: Optional[BackendType] = None,
    rank: int = -1,
    world_size: Optional[int] = None,
    rpc_backend_options: Optional[RpcBackendOptions] = None,
    *,
    init_method: Optional[str] = None,
    options: Optional[RpcOptions] = None,
):
    """Starts this worker and waits until all `world_size` workers have joined.

    The signature is torch.distributed.rpc.init_rpc's, plus torchrpc's own
    keywords: `options` (RpcOptions) instead of `rpc_backend_options` (a
    TensorPipeRpcBackendOptions, whose num_worker_threads, rpc_timeout and
    init_method are used), and `init_method` beside `options`. init_method is
    "env://" (the default: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as
    torchrun sets them) or "tcp://host:port"; rank 0 hosts the rendezvous store.
    """
    options, init_method = _resolve_options(backend, rpc_backend_options, options, init_method)
    rendezvous.check_name(name)
    host, port, rank, world_size = rendezvous.parse_init_method(init_method, rank, world_size)
    with _lock:
        if _handle._state is not None:
            raise RuntimeError(
                "RPC is already initialized: init_rpc was already called in this process "
                "(call torchrpc.shutdown() first)"
            )
        _handle._initialized.clear()
        _handle._initializing.set()
        try:
            _start(name, rank, world_size, host, port, options)
        finally:
            _handle._initializing.clear()
            _handle._initialized.set()


def _resolve_options(backend, rpc_backend_options, options, init_method):
    """(RpcOptions, init_method) from init_rpc's two ways of giving them."""
    # The TypeErrors carry torch's words ("Argument backend must be a member
    # of BackendType", ...): programs written for it match on them.
    if backend is not None and backend is not BackendType.TENSORPIPE:
        raise TypeError(
            f"init_rpc: Argument backend must be a member of BackendType "
            f"(BackendType.TENSORPIPE) or None, got {backend!r}"
        )
    if rpc_backend_options is None:
        return options or RpcOptions(), init_method or "env://"
    if not isinstance(rpc_backend_options, RpcBackendOptions):
        raise TypeError(
            f"init_rpc: Argument rpc_backend_options must be an instance of "
            f"RpcBackendOptions (a TensorPipeRpcBackendOptions), "
            f"got {type(rpc_backend_options).__name__}"
        )
    if backend is None and not isinstance(rpc_backend_options, TensorPipeRpcBackendOptions):
        # torch picks the backend from the options' class; only
        # TensorPipeRpcBackendOptions names one.
        raise TypeError(
            f"init_rpc: Could not infer backend for options {type(rpc_backend_options).__name__}: "
            f"pass a TensorPipeRpcBackendOptions, or backend=BackendType.TENSORPIPE"
        )
    if options is not None or init_method is not None:
        raise TypeError(
            "init_rpc: give either rpc_backend_options (torch's form) or "
            "options=/init_method= (torchrpc's), not both"
        )
    converted = RpcOptions(rpc_timeout=rpc_backend_options.rpc_timeout)
    threads = getattr(rpc_backend_options, "num_worker_threads", None)
    if threads is not None:
        converted.num_worker_threads = threads
    return converted, rpc_backend_options.init_method


_KNOWN_TRANSPORTS = ("shm", "tcp")


def _transports(chosen: Optional[Sequence[str]]) -> List[str]:
    """RpcOptions.transports, else TORCHRPC_TRANSPORTS, else shm then tcp."""
    if chosen is None:
        env = os.environ.get("TORCHRPC_TRANSPORTS", "")
        chosen = [t.strip() for t in env.split(",") if t.strip()] or list(_KNOWN_TRANSPORTS)
    if isinstance(chosen, str):
        chosen = [chosen]
    chosen = list(chosen)
    unknown = [t for t in chosen if t not in _KNOWN_TRANSPORTS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"torchrpc: transports must be distinct names from {_KNOWN_TRANSPORTS}, "
                         f"got {chosen}")
    return chosen


def agent_options(options: RpcOptions, host: str, secret: bytes, job_id: str) -> dict:
    """What _C.Agent takes: `options` for a worker listening on `host` (TCP)
    with the job's credentials."""
    return {
        "num_worker_threads": options.num_worker_threads,
        "rpc_timeout": float(options.rpc_timeout),
        "python_udf": options.python_udf,
        "accept_code": bool(options.accept_code),
        "code_cache_size": int(options.code_cache_size),
        "metrics": bool(options.metrics),
        "faults": options.faults or "",
        "listen_host": host,
        "advertised_host": host,
        "secret": secret,
        "job_id": job_id,
        "handshake_timeout": float(options.handshake_timeout),
        "max_pending_handshakes": int(options.max_pending_handshakes),
        "heartbeat_interval": float(options.heartbeat_interval),
        "peer_timeout": float(options.peer_timeout),
        "max_frame_bytes": int(options.max_frame_bytes),
        "max_inflight_bytes": int(options.max_inflight_bytes),
        "transports": _transports(options.transports),
        "shm_ring_bytes": int(options.shm_ring_bytes),
        "shm_pool_bytes": int(options.shm_pool_bytes),
    }


def _start(name, rank, world_size, host, port, options):
    """Rendezvous and agent start-up; init_rpc's body."""
    deadline = time.monotonic() + options.init_timeout
    secret = trust.configured_secret(options.secret)
    my_host = rendezvous.local_address_towards(host)
    trust.check_listen_host(my_host, secret, options.insecure)
    store = rendezvous.open_store(host, port, rank, world_size, deadline)
    job_id, secret = trust.job_credentials(store, rank, secret)
    agent = _C.Agent(name, rank, agent_options(options, my_host, secret, job_id))
    # Ready to serve before anyone can learn our address.
    agent.set_python_hooks(
        python_udf.run_python_call, python_udf.run_python_remote, python_udf.dumps
    )
    for fn in scripted_ops.ALL:
        agent.register_function(fn.qualified_name, fn)
    for qualified_name, fn in _registered.items():
        _add_to_agent(agent, qualified_name, fn)
    _C.set_code_loader(agent, compiled.load_code)
    _C.set_current_agent(agent)
    try:
        infos = rendezvous.exchange(
            store, rank, world_size,
            {"name": name, "address": agent.address, "python_udf": options.python_udf,
             "accept_code": bool(options.accept_code)},
            deadline - time.monotonic(),
        )
    except BaseException:
        _C.set_current_agent(None)
        agent.shutdown()
        raise
    agent.set_workers([(w["name"], w["address"], w["python_udf"]) for w in infos])
    state = _State(agent, store, [WorkerInfo(w["name"], r) for r, w in enumerate(infos)], options)
    state.credentials = (job_id, secret)  # for torchrpc.testing's raw clients
    state.python_udf = [w["python_udf"] for w in infos]
    state.accept_code = [w["accept_code"] for w in infos]
    state.self_info = state.workers[rank]
    _handle._state = state
    if options.metrics_port is not None:
        state.servers.append(observe.MetricsServer(options.metrics_host, options.metrics_port))
    if options.inspect:
        state.servers.append(inspect.InspectServer(_inspect_snapshot))


def _inspect_snapshot() -> dict:
    state = _current()
    return {"worker": state.self_info.name, "pid": os.getpid(), "debug_info": debug_info(),
            "metrics": metrics()}


def metrics_port() -> Optional[int]:
    """The port the metrics HTTP server listens on (RpcOptions.metrics_port), or None."""
    return next((s.port for s in _current().servers if isinstance(s, observe.MetricsServer)), None)


def shutdown(graceful: bool = True, timeout: Optional[float] = None,
             raise_on_lost_peers: bool = False):
    """Stops this worker.

    graceful=True waits until every worker has finished its calls (a barrier
    over all workers), then closes; graceful=False closes at once, failing
    pending calls. Past `timeout` seconds (None: RpcOptions.shutdown_timeout;
    0: no limit, as in torch) it closes anyway and raises RpcTimeoutError.
    Workers found lost (dead, frozen, unreachable: see peer_timeout) are not
    waited for; they are named in a RuntimeWarning, or in an RpcShutdownError
    with raise_on_lost_peers=True. The rendezvous store going away with its
    host (rank 0) is that worker lost, not a timeout; a store gone while every
    worker lives raises RpcError within about peer_timeout.
    """
    with _lock:
        state = _handle._state
        if state is None:
            return
    if timeout is None:
        timeout = state.options.shutdown_timeout
    elif timeout == 0:
        timeout = _NO_LIMIT_S
    n = len(state.workers)
    rank = state.self_info.id
    agent = state.agent
    # One deadline for every phase, so shutdown never takes more than `timeout`.
    deadline = time.monotonic() + timeout
    left = lambda: max(deadline - time.monotonic(), 0.0)  # noqa: E731
    ok = True
    leaks = None
    gone = lambda: set(agent.lost_peers()) | set(agent.left_peers())  # noqa: E731
    # A dead worker is found lost within peer_timeout (probed, or silent).
    lost_within = state.options.peer_timeout + 1.0
    lost = {}
    missing = set(range(n)) - {rank}  # workers not known to have finished
    store_lost = None  # why the rendezvous store stopped answering, if it did
    store_failed = None  # ... and no lost worker explains it
    try:
        if graceful:
            # Still serving (Python callables and RRef forks need _state) until
            # every worker has finished its own calls. Dropped RRefs send their
            # deletes now, and the wait covers their acknowledgements.
            gc.collect()
            ok = agent.wait_until_idle(timeout)
            first = rendezvous.barrier(
                state.store, "torchrpc/shutdown/1", rank, n, left(), gone=gone,
                lost=lambda: set(agent.lost_peers()), probe=agent.probe_peers,
                lost_within=lost_within,
            )
            missing, store_lost = first.missing, first.store_lost
            store_failed = None if first.done else store_lost
            ok = first.done and ok
            leaks = _rref_leaks(state) if ok else None
    finally:
        gone_before = gone()
        # A worker that finished its calls and closed while we still waited
        # is not lost: only those that never got there are.
        lost = {r: why for r, why in agent.lost_peers().items() if r in missing}
        with _lock:
            _handle._state = None
        for server in state.servers:
            server.close()
        _C.set_current_agent(None)
        agent.shutdown()
    if graceful and store_lost is None:
        # Rank 0 hosts the store: it leaves only after every live worker has
        # left the first barrier, so none of them loses the store mid-wait.
        rendezvous.barrier(
            state.store, "torchrpc/shutdown/2", rank, n, left(), wait=rank == 0,
            gone=lambda: gone_before, lost_within=lost_within,
        )
    if lost:
        names = ", ".join(
            f"{state.workers[r].name!r} ({why})" for r, why in sorted(lost.items()) if r < n
        )
        message = f"torchrpc: worker {state.self_info.name!r} shut down with lost peers: {names}"
        if raise_on_lost_peers:
            raise RpcShutdownError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    if store_failed is not None:
        raise RpcError(
            f"torchrpc: graceful shutdown of worker {state.self_info.name!r} could not wait for "
            f"the other workers: the rendezvous store stopped answering ({store_failed}) while "
            f"every worker still looked alive; closed anyway"
        )
    if not ok:
        raise RpcTimeoutError(
            f"torchrpc: graceful shutdown timed out after {timeout} s "
            f"(pending calls or workers that never arrived); closed anyway"
        )
    if leaks and state.options.rref_leaks == "raise":
        raise RpcError(leaks)
    if leaks:
        warnings.warn(leaks, RuntimeWarning, stacklevel=2)


def cancel(fut) -> bool:
    """Gives up a call made with rpc_async: its future fails with
    RpcCancelledError, and the callee drops the request if it has not started
    (or discards its result). Returns True if the call never ran; False if it
    ran, finished already, or its worker could not be asked."""
    return _current().agent.cancel(fut)


_NO_LIMIT_S = 10 * 365 * 24 * 3600.0  # "no timeout" as seconds the C++ waits can take


def _rref_leaks(state: _State) -> Optional[str]:
    """What RRefs are still referenced once every worker is done, or None."""
    if state.options.rref_leaks == "ignore":
        return None
    info = state.agent.debug_info()
    leaked = {k: info[k] for k in ("owned_values", "live_users", "pending_children") if info[k]}
    if not leaked:
        return None
    return (
        f"torchrpc: worker {state.self_info.name!r} shuts down with RRefs still referenced "
        f"({leaked}); values owned here are freed now"
    )


def get_worker_info(worker_name: Optional[str] = None) -> WorkerInfo:
    """This worker's WorkerInfo, or that of the worker called `worker_name`."""
    state = _current()
    if worker_name is None:
        return state.self_info
    try:
        return state.by_name[worker_name]
    except (KeyError, TypeError):
        raise InvalidWorkerError(
            f"torchrpc: could not find destination worker {worker_name!r}: no worker has that name"
        ) from None


def get_rpc_timeout() -> float:
    """The default call timeout in seconds (RpcOptions.rpc_timeout, or the
    rpc_backend_options' rpc_timeout); 0 means none."""
    return float(_current().options.rpc_timeout)


def register(fn, name: Optional[str] = None, *, num_runners: int = 1):
    """Registers a compiled function so peers can call it by name; returns `fn`.

    - A torch.jit.ScriptFunction, under its qualified name (or `name`); a
      decorator too. Served in C++, no GIL.
    - A torch.export.ExportedProgram, under `name`. Callers' arguments are
      checked against its input spec (dtype, rank, static sizes); results
      come back in its output structure. Served by running its module in
      Python: each call takes the GIL on this worker.
    - The path of an AOTInductor package (.pt2, from
      torch._inductor.aoti_compile_and_package), under `name`. Served in C++
      by AOTInductor's loader, no GIL; `num_runners` calls run at once.

    Registering before init_rpc is fine.
    """
    if isinstance(fn, torch.jit.ScriptFunction):
        key, entry = name or fn.qualified_name, fn
    elif isinstance(fn, torch.export.ExportedProgram):
        key = _required_name(name, "an ExportedProgram")
        entry = compiled.exported_callable(fn, key)
    elif isinstance(fn, (str, os.PathLike)):
        key = _required_name(name, "an AOTInductor package")
        entry = compiled.aoti_callable(fn, key, num_runners=num_runners)
    else:
        raise TypeError(f"register() takes a torch.jit.ScriptFunction, a torch.export.ExportedProgram "
                        f"or the path of an AOTInductor package, got {type(fn).__name__}")
    _registered[key] = entry
    if _handle._state is not None:
        _add_to_agent(_handle._state.agent, key, entry)
    return fn


def _required_name(name, what):
    if not isinstance(name, str) or not name or "::" in name or name.startswith("sha256:"):
        raise ValueError(f"register(): {what} needs name=, a name without '::' "
                         f"that does not start with 'sha256:', got {name!r}")
    return name


def _add_to_agent(agent, name, entry):
    if isinstance(entry, torch.jit.ScriptFunction):
        agent.register_function(name, entry)
    else:
        agent.register_callable(name, entry)


def script(fn: Callable) -> torch.jit.ScriptFunction:
    """torch.jit.script(fn), then register()."""
    return register(torch.jit.script(fn))


def _worker_id(state: _State, to: Union[str, int, WorkerInfo]) -> int:
    if isinstance(to, str):
        return get_worker_info(to).id
    rank = to.id if isinstance(to, WorkerInfo) else to
    if isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < len(state.workers):
        return rank
    raise InvalidWorkerError(
        f"torchrpc: could not find destination {to!r}: not a worker name, WorkerInfo "
        f"or rank in [0, {len(state.workers)})"
    )


def _builtin_name(func) -> Optional[str]:
    """'aten::add' for torch.add, torch.ops.aten.add, torch.ops.aten.add.Tensor."""
    if isinstance(func, torch._ops.OpOverload):
        return func._schema.name
    if isinstance(func, torch._ops.OpOverloadPacket):
        return func._qualified_op_name
    return torch.jit._builtins._find_builtin(func)


def _schema_for(state: _State, to: int, name: str):
    schema = state.agent.local_schema(name)
    if schema is not None:
        return schema
    key = (to, name)
    if key not in state.remote_schemas:
        text = state.agent.query_schema(to, name, -1.0)
        if not text:
            raise FunctionNotFoundError(
                f"torchrpc: no function {name!r} is registered on worker "
                f"{state.workers[to].name!r}"
            )
        state.remote_schemas[key] = torch._C.parse_schema(text)
    return state.remote_schemas[key]


# ScriptFunction -> ("script", name, schema, None): reading .schema builds a
# new object each time, and this is on every call's path.
_script_targets: Dict[torch.jit.ScriptFunction, tuple] = {}


def _script_target(state, dst, func):
    """("script", name, schema, shipped) or ("builtin", op name, None, None);
    None for Python callables. `shipped` is the compiled.Shipped form of code
    shipped by value, else None."""
    if isinstance(func, torch.jit.ScriptFunction):
        target = _script_targets.get(func)
        if target is None:
            target = _script_targets[func] = ("script", func.qualified_name, func.schema, None)
        # Called by name where the callee has it (it imported the function);
        # shipped where it does not and accepts code; refused here, before
        # anything is sent, where it does neither.
        if _callee_has(state, dst, target[1]):
            return target
        if state.accept_code[dst]:
            return _shipped_target(func)
        raise CodeRefusedError(
            f"torchrpc: worker {state.workers[dst].name!r} has no function {target[1]!r} "
            f"and does not accept shipped code: start it with RpcOptions(accept_code=True) "
            f"to send the function by value, or register it there; nothing was sent"
        )
    if isinstance(func, str):
        if "::" in func:
            return "builtin", func.split(".")[0], None, None
        return "script", func, _schema_for(state, dst, func), None
    if isinstance(func, (torch.jit.ScriptModule, torch.export.ExportedProgram)):
        return _shipped_target(func)
    builtin = _builtin_name(func)
    if builtin is not None:
        return "builtin", builtin, None, None
    return None


def _shipped_target(func):
    shipped = compiled.shipped(func)
    return "script", shipped.id, shipped.schema, shipped


def _callee_has(state, dst, name) -> bool:
    """Whether worker `dst` serves `name`: asked once, then remembered. A
    "no" is remembered only where the code is shipped instead (the callee
    might register the function later)."""
    key = (dst, name)
    has = state.callee_has.get(key)
    if has is None:
        has = bool(state.agent.query_schema(dst, name, -1.0))
        if has or state.accept_code[dst]:
            state.callee_has[key] = has
    return has


def _prepare(to, func, args, kwargs, timeout):
    """What every call resolves first: (state, destination id, args, kwargs,
    timeout for the agent, script target or None for a Python callable)."""
    state = _current()
    dst = state.by_name[to].id if type(to) is str and to in state.by_name else _worker_id(state, to)
    args = tuple(args) if args is not None else ()
    kwargs = dict(kwargs) if kwargs is not None else {}
    target = _script_target(state, dst, func)
    if target is not None and target[3] is not None and target[3].check is not None and not kwargs:
        target[3].check(args)  # an exported program's input spec, before anything is sent
    if target is not None and not all(type(a) in _PLAIN for a in args):
        args = _unwrap(args)
    if target is not None and kwargs:
        kwargs = _unwrap(kwargs)
    return state, dst, args, kwargs, _timeout(timeout), target


# Argument types that never hold an RRef: no need to look inside.
_PLAIN = frozenset({torch.Tensor, int, float, bool, str, type(None)})


class _CallFuture(torch.futures.Future):
    """What rpc_async returns for script and builtin calls: a torch Future
    whose wait() reads the reply itself where the transport allows (shared
    memory), instead of waiting to be woken by the thread that got it."""

    def wait(self):
        relay = self.__dict__.get("_relay")
        if relay is not None:
            relay.wait()
        return super().wait()


def _invoke(to, func, args, kwargs, timeout, sync: bool):
    prepared = _prepare(to, func, args, kwargs, timeout)
    if not torch.autograd._profiler_enabled():
        return _send(prepared, func, sync)
    state, dst, target = prepared[0], prepared[1], prepared[5]
    label = _label(func, target)
    if sync:
        with profiling.call_range("rpc_sync", label, state, dst):
            return _send(prepared, func, sync)
    return profiling.async_call(label, state, dst, lambda: _send(prepared, func, sync))


def _label(func, target) -> str:
    """How a call is named in profiler ranges."""
    if target is not None:
        return target[1]
    return getattr(func, "__qualname__", None) or repr(func)


def _send(prepared, func, sync: bool):
    state, dst, args, kwargs, t, target = prepared
    agent = state.agent
    if target is not None:
        kind, name, schema, shipped = target
        out = None if sync else _CallFuture()
        if kind == "script":
            result = agent.script_call(dst, name, schema, args, kwargs, t, sync, out, shipped and shipped.code)
        else:
            result = agent.builtin_call(dst, name, args, kwargs, t, sync, out)
        if not sync:
            out._relay = result
            return out
        if type(result) in _PLAIN:
            return result
        return _wrap(result)
    return python_udf.call(state, dst, func, args, kwargs, t, sync)


def rpc_sync(to, func, args=None, kwargs=None, timeout: Optional[float] = None):
    """Calls `func(*args, **kwargs)` on worker `to` and returns its result.

    `func` is a TorchScript function (or its registered qualified name), a
    builtin operator (torch.add, torch.ops.aten.mul.Tensor), or, where the
    callee opted in, any picklable Python callable. `to` is a worker name,
    id or WorkerInfo. timeout: None for the default, 0 for none, else seconds.
    """
    return _invoke(to, func, args, kwargs, timeout, True)


def rpc_async(to, func, args=None, kwargs=None, timeout: Optional[float] = None):
    """Like rpc_sync, but returns a torch Future at once."""
    return _invoke(to, func, args, kwargs, timeout, False)


def remote(to, func, args=None, kwargs=None, timeout: Optional[float] = None) -> RRef:
    """Runs `func(*args, **kwargs)` on worker `to`, which keeps the result, and
    returns an RRef to it at once. Same `func` forms and opt-in rule as rpc_sync."""
    state, dst, args, kwargs, t, target = _prepare(to, func, args, kwargs, timeout)
    with profiling.call_range("rpc_remote", _label(func, target), state, dst):
        return _remote(state, dst, func, args, kwargs, t, target)


def _remote(state, dst, func, args, kwargs, t, target) -> RRef:
    agent = state.agent
    if target is not None:
        kind, name, schema, shipped = target
        if kind == "script":
            obj = agent.remote_script(dst, name, schema, args, kwargs, t, shipped and shipped.code)
        else:
            obj = agent.remote_builtin(dst, name, args, kwargs, t)
        return RRef(_script_object=obj)
    return RRef(_script_object=python_udf.remote(state, dst, func, args, kwargs, t))


def debug_info() -> dict:
    """This worker's state, for people and tools (python -m torchrpc.inspect):

    - peers: per worker name, its connection state (idle, connecting,
      connected, left, lost with why), transport, and seconds since its last
      message (heartbeats included).
    - requests: requests in flight, ours ("out": waiting for a reply) and
      theirs ("in": queued or running here), with function and age.
    - rref_tables: values owned here with their forks, and user references
      not yet confirmed by their owners; the counts beside (owned_values,
      user_forks, pending_children, unconfirmed_users, live_users).
    - autograd: live distributed autograd contexts and the workers in each.
    - connections, traffic (messages and bytes per peer), code_cache,
      lost_peers, pending_requests, served_inline.
    """
    state = _current()
    info = state.agent.debug_info()
    info["lost_peers"] = {state.workers[r].name: why for r, why in state.agent.lost_peers().items()}
    info["connections"] = {state.workers[r].name: c for r, c in info["connections"].items()}
    info["traffic"] = {state.workers[r].name: t for r, t in info["traffic"].items()}
    info["peers"] = {state.workers[r].name: p for r, p in info["peers"].items()}
    for r in info["requests"]:
        r["peer"] = state.workers[r["peer"]].name if 0 <= r["peer"] < len(state.workers) else r["peer"]
    for c in info["autograd"]:
        c["workers"] = [state.workers[w].name for w in c["workers"] if 0 <= w < len(state.workers)]
    return info


@atexit.register
def _close_at_exit():
    # A process that never called shutdown() must still exit: close locally.
    if _handle._state is not None:
        shutdown(graceful=False)
