"""Finding the other workers: each publishes its name and listen address in
c10d's TCPStore (hosted by rank 0) and reads everyone else's."""

import json
import os
import re
import socket
import time
from datetime import timedelta
from typing import Callable, List, Optional, Set
from urllib.parse import urlparse

from torch.distributed import TCPStore

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


def open_store(host: str, port: int, rank: int, world_size: int, deadline: float) -> TCPStore:
    """The rendezvous store: hosted here on rank 0, else reached by
    `deadline` (time.monotonic()) or RpcTimeoutError."""
    # Under torchrun the elastic agent already hosts a store on MASTER_PORT.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_host = rank == 0 and not agent_hosts
    if not is_host:
        _wait_reachable(host, port, deadline)
    left = max(deadline - time.monotonic(), 0.1)
    try:
        return TCPStore(
            host, port, world_size, is_host, timedelta(seconds=left), wait_for_workers=False,
        )
    except Exception as e:
        if is_host:
            raise RpcError(f"torchrpc: rank 0 cannot host the rendezvous store on port {port}: {e}") from e
        raise RpcTimeoutError(
            f"torchrpc: rendezvous: cannot use the store at {host}:{port} (hosted by rank 0): {e}"
        ) from e


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


def barrier(store, key: str, rank: int, world_size: int, timeout: float, wait: bool = True,
            gone: Callable[[], Set[int]] = set, probe: Optional[Callable[[], None]] = None,
            missing: Optional[Set[int]] = None) -> bool:
    """Counts this worker in at `key` and, if `wait`, waits for every other
    worker to count in or be `gone()` (lost or shut down: a dead worker must
    not hold the others up). `probe` is called now and then, so that workers
    we never talked to are checked too.

    Returns False if the timeout passed first, or the store went away while
    every worker still looked alive. `missing`, if given, receives the ranks
    that never counted in.
    """
    if missing is None:
        missing = set()
    deadline = time.monotonic() + timeout
    waiting = set(range(world_size)) - {rank}
    next_probe = 0.0
    try:
        # A store whose host died must fail fast, not retry for init_timeout.
        store.set_timeout(timedelta(seconds=max(0.5, min(timeout, 5.0))))
        store.set(f"{key}/{rank}", "1")
        count = store.add(key, 1)
        while wait and waiting and time.monotonic() < deadline:
            if count >= world_size:
                waiting = set()
                break
            waiting = {r for r in waiting if not store.check([f"{key}/{r}"])}
            dead = waiting & gone()
            missing.update(dead)
            waiting -= dead
            if waiting and probe is not None and time.monotonic() >= next_probe:
                probe()
                next_probe = time.monotonic() + 0.5
            if waiting:
                time.sleep(0.01)
                count = store.add(key, 0)
    except Exception:
        missing.update(waiting)
        return bool(gone())
    if wait and waiting and count < world_size:
        missing.update(waiting)
        return False
    return True
