"""Finding the other workers: each publishes its name and listen address in
c10d's TCPStore (hosted by rank 0) and reads everyone else's."""

import dataclasses
import json
import os
import re
import secrets
import socket
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import urlparse

import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore

from torchrpc.errors import InvalidWorkerError, RpcError, RpcTimeoutError

# torch's rule (plus '.'), and its length limit: shorter than 128.
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,127}$")


def parse_init_method(init_method: str, rank: int, world_size):
    """(host, port, rank, world_size) from env:// or tcp://host:port."""
    url = urlparse(init_method)
    if url.scheme == "env":
        host = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if not host or not port:
            raise ValueError("init_method='env://' needs MASTER_ADDR and MASTER_PORT to be set")
        if rank < 0:
            rank = int(os.environ.get("RANK", "-1"))
        if world_size is None and "WORLD_SIZE" in os.environ:
            world_size = int(os.environ["WORLD_SIZE"])
        port = int(port)
    elif url.scheme == "tcp":
        if not url.hostname or not url.port:
            raise ValueError(f"init_method {init_method!r} must look like tcp://host:port")
        host, port = url.hostname, url.port
    else:
        raise ValueError(f"unsupported init_method {init_method!r}: use env:// or tcp://host:port")
    if world_size is None or world_size < 1:
        raise ValueError("world_size must be given (or WORLD_SIZE set) and be at least 1")
    if not 0 <= rank < world_size:
        raise InvalidWorkerError(
            f"rank must be in [0, {world_size}), got {rank} (set rank= or RANK)"
        )
    return host, port, rank, world_size


def local_address_towards(host: str) -> str:
    """The IPv4 address of this machine that `host` can reach us at."""
    addr = socket.gethostbyname(host)
    if addr.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 1))  # no packet is sent: this only picks a route
        return s.getsockname()[0]


def check_name(name: str):
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidWorkerError(
            f"invalid worker name {name!r}: Worker name must match [A-Za-z0-9_.:-]+, "
            f"and must be non-empty and shorter than 128 characters"
        )


def open_store(host: str, port: int, rank: int, world_size: int, deadline: float) -> Store:
    """The rendezvous store at host:port, reached by `deadline`
    (time.monotonic()) or RpcTimeoutError, with this init_rpc's keys under a
    prefix of their own (see _join).

    - If a default process group (init_process_group) keeps its store at
      host:port, that store: through a connection of torchrpc's own (so
      torchrpc's timeouts never change the group's), holding the group's
      store so that destroy_process_group() before torchrpc.shutdown() does
      not take the server from under torchrpc's shutdown.
    - Else rank 0 hosts the store, multi-tenant: init_process_group(
      init_method="env://") on the same port later in this process shares
      its server (c10d's env:// and tcp:// stores are multi-tenant too), and
      the server lives as long as either of them uses it. The other ranks
      connect to it. Under torchrun the elastic agent hosts it instead.
    """
    shared = _process_group_store(host, port)
    if shared is not None:
        try:
            connection = shared.clone()
        except Exception as e:
            raise RpcTimeoutError(
                f"torchrpc: rendezvous: cannot reach the process group's store at "
                f"{host}:{port}: {e}"
            ) from e
        keep = shared
    else:
        # Under torchrun the elastic agent already hosts a store on MASTER_PORT.
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        is_host = rank == 0 and not agent_hosts
        if not is_host:
            _wait_reachable(host, port, deadline)
        left = timedelta(seconds=max(deadline - time.monotonic(), 0.1))
        try:
            connection = TCPStore(
                host, port, world_size, is_host, left, wait_for_workers=False, multi_tenant=True,
            )
        except Exception as e:
            if is_host:
                raise RpcError(
                    f"torchrpc: rank 0 cannot host the rendezvous store on port {port}: {e}"
                ) from e
            raise RpcTimeoutError(
                f"torchrpc: rendezvous: cannot use the store at {host}:{port} "
                f"(hosted by rank 0): {e}"
            ) from e
        keep = None
    return _join(connection, keep, (host, port), rank, deadline)


def _process_group_store(host: str, port: int) -> Optional[TCPStore]:
    """The TCPStore under the default process group's store, if it serves
    host:port; else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, PrefixStore):
        store = store.underlying_store
    if not isinstance(store, TCPStore) or store.port != port:
        return None
    return store if _same_host(store.host, host) else None


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return socket.gethostbyname(a) == socket.gethostbyname(b)
    except OSError:
        return False


class _JoinedStore(PrefixStore):
    """The store under this init_rpc's prefix; keeps `keep` (the process
    group's store, whose server it needs) alive as long as torchrpc uses it."""

    def __init__(self, prefix: str, connection: Store, keep: Optional[Store]):
        super().__init__(prefix, connection)
        self._keep = keep


# (host, port) -> the last rendezvous this process joined there. A store
# can outlive a torchrpc world (a process group shares it, or rank 0's
# server is still held), so each init_rpc works under a fresh prefix drawn
# by rank 0; the others wait for one they have not used yet.
_last_joined: Dict[Tuple[str, int], str] = {}
_CURRENT_KEY = "torchrpc/current"


def _join(connection: Store, keep: Optional[Store], address, rank: int, deadline: float) -> Store:
    left = lambda: timedelta(seconds=max(deadline - time.monotonic(), 0.1))  # noqa: E731
    connection.set_timeout(left())  # no request to the store outlives init_timeout
    try:
        if rank == 0:
            current = secrets.token_hex(8)
            connection.set(_CURRENT_KEY, current)
        else:
            connection.wait([_CURRENT_KEY], left())
            current = connection.get(_CURRENT_KEY).decode()
            while current == _last_joined.get(address):
                if time.monotonic() >= deadline:
                    raise TimeoutError("rank 0 never started a new rendezvous")
                time.sleep(0.02)
                current = connection.get(_CURRENT_KEY).decode()
    except Exception as e:
        raise RpcTimeoutError(
            f"torchrpc: rendezvous timed out: rank 0 did not start a rendezvous at "
            f"{address[0]}:{address[1]} ({e})"
        ) from None
    _last_joined[address] = current
    return _JoinedStore(f"torchrpc/{current}", connection, keep)


def _wait_reachable(host: str, port: int, deadline: float):
    # TCPStore's own client retries past any timeout it is given; a plain
    # connect loop keeps init_rpc within init_timeout.
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RpcTimeoutError(
                    f"torchrpc: rendezvous timed out: nothing answered at {host}:{port}, where rank 0 "
                    f"hosts the store (is rank 0 running? last error: {e})"
                ) from None
            time.sleep(0.05)


def exchange(store, rank: int, world_size: int, info: dict, timeout: float) -> List[dict]:
    """Publishes this worker's info and returns everyone's, indexed by rank.

    Rank 0 gathers the infos in one request and publishes the list under one
    key, which every other rank reads once: O(N) store requests per job, not
    O(N^2). An invalid world (a duplicate name) is published the same way, so
    every rank raises the same error, and rank 0 (which may host the store)
    leaves only once every rank has read it.
    """
    if store.add(f"torchrpc/rank/{rank}", 1) != 1:
        raise InvalidWorkerError(f"rank {rank} is already taken by another worker")
    store.set(f"torchrpc/worker/{rank}", json.dumps(info))
    wait = timedelta(seconds=max(timeout, 0.1))
    if rank == 0:
        keys = [f"torchrpc/worker/{r}" for r in range(world_size)]
        _wait_for(store, keys, wait, world_size)
        infos = [json.loads(v) for v in store.multi_get(keys)]
        store.set(_WORLD_KEY, json.dumps({"workers": infos, "error": _duplicate_name(infos)}))
    else:
        _wait_for(store, [_WORLD_KEY], wait, world_size)
    world = json.loads(store.get(_WORLD_KEY))
    if world["error"]:
        read = store.add(_WORLD_READ_KEY, 1)
        deadline = time.monotonic() + max(timeout, 0.1)
        while rank == 0 and read < world_size and time.monotonic() < deadline:
            time.sleep(0.01)
            read = store.add(_WORLD_READ_KEY, 0)
        raise InvalidWorkerError(world["error"])
    return world["workers"]


_WORLD_KEY = "torchrpc/world"  # every worker's info, published by rank 0
_WORLD_READ_KEY = "torchrpc/world/read"


def _wait_for(store, keys: List[str], wait: timedelta, world_size: int):
    try:
        store.wait(keys, wait)
    except Exception as e:
        try:
            missing = [r for r in range(world_size) if not store.check([f"torchrpc/worker/{r}"])]
        except Exception:
            missing = "unknown (the store went away)"
        raise RpcTimeoutError(
            f"torchrpc: rendezvous timed out waiting for {world_size} workers: "
            f"ranks {missing} never arrived"
        ) from e


def _duplicate_name(infos: List[dict]) -> Optional[str]:
    seen = {}
    for r, w in enumerate(infos):
        if w["name"] in seen:
            return (f"duplicate worker name {w['name']!r}: a worker name is not unique "
                    f"(ranks {seen[w['name']]} and {r})")
        seen[w["name"]] = r
    return None


@dataclasses.dataclass
class BarrierResult:
    """How a barrier ended. done: every other worker counted in or is gone
    (lost or left). missing: the workers that never counted in. store_lost:
    why the store stopped answering, if it did."""

    done: bool
    missing: Set[int]
    store_lost: Optional[str] = None


def barrier(store, key: str, rank: int, world_size: int, timeout: float, wait: bool = True,
            gone: Callable[[], Set[int]] = set, lost: Callable[[], Set[int]] = set,
            probe: Optional[Callable[[], None]] = None, lost_within: float = 5.0) -> BarrierResult:
    """Counts this worker in at `key` and, if `wait`, waits (at most
    `timeout` s) for every other worker to count in or be `gone()` (lost or
    shut down: a dead worker must not hold the others up). `probe` is called
    now and then, so that workers we never talked to are checked too.

    A store that stops answering went away with the worker hosting it (rank
    0): who else counted in can no longer be known, so the wait ends as soon
    as a worker that never counted in is found `lost()` (not just left),
    which `probe` tells within the peer timeout. If none is within
    `lost_within` s, every worker still lives and the store failed on its
    own: the barrier is not done, and waiting longer would not mend it.
    """
    deadline = time.monotonic() + timeout
    waiting = set(range(world_size)) - {rank}
    missing: Set[int] = set()
    store_lost: Optional[str] = None
    give_up_at = deadline

    def ask(request, otherwise):
        nonlocal store_lost, give_up_at
        if store_lost is not None:
            return otherwise
        try:
            return request()
        except Exception as e:
            store_lost = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            give_up_at = min(deadline, time.monotonic() + lost_within)
            return otherwise

    # A store whose host is frozen must fail fast, not block for init_timeout.
    ask(lambda: store.set_timeout(timedelta(seconds=max(0.5, min(timeout, 5.0)))), None)
    ask(lambda: store.set(f"{key}/{rank}", "1"), None)
    count = ask(lambda: store.add(key, 1), 0)
    if not wait:
        return BarrierResult(store_lost is None, set(), store_lost)
    next_probe = 0.0
    while waiting and count < world_size:
        waiting -= ask(lambda w=waiting: {r for r in w if store.check([f"{key}/{r}"])}, set())
        dead = waiting & gone()
        missing |= dead
        waiting -= dead
        if store_lost is not None and (missing | waiting) & lost():
            break  # the store went with a worker that never counted in
        if not waiting or time.monotonic() >= give_up_at:
            break
        if probe is not None and time.monotonic() >= next_probe:
            probe()
            next_probe = time.monotonic() + 0.5
        time.sleep(0.01)
        count = ask(lambda: store.add(key, 0), count)
    if count >= world_size:
        waiting = set()
    done = not waiting or (store_lost is not None and bool((missing | waiting) & lost()))
    return BarrierResult(done, missing | waiting, store_lost)
