"""Finding the other workers: each publishes its name and listen address in
c10d's TCPStore (hosted by rank 0) and reads everyone else's."""

import json
import os
import re
import socket
import time
from datetime import timedelta
from typing import List
from urllib.parse import urlparse

from torch.distributed import TCPStore

from torchrpc.errors import InvalidWorkerError, RpcTimeoutError

_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


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
            f"invalid worker name {name!r}: use 1-128 letters, digits, '_', '-', '.', ':'"
        )


def open_store(host: str, port: int, rank: int, world_size: int, timeout: float) -> TCPStore:
    # Under torchrun the elastic agent already hosts a store on MASTER_PORT.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return TCPStore(
        host, port, world_size, rank == 0 and not agent_hosts, timedelta(seconds=timeout),
        wait_for_workers=False,
    )


def exchange(store, rank: int, world_size: int, info: dict, timeout: float) -> List[dict]:
    """Publishes this worker's info and returns everyone's, indexed by rank."""
    if store.add(f"torchrpc/rank/{rank}", 1) != 1:
        raise InvalidWorkerError(f"rank {rank} is already taken by another worker")
    store.set(f"torchrpc/worker/{rank}", json.dumps(info))
    keys = [f"torchrpc/worker/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as e:
        raise RpcTimeoutError(
            f"torchrpc: rendezvous timed out after {timeout} s waiting for {world_size} workers"
        ) from e
    infos = [json.loads(store.get(k)) for k in keys]
    seen = {}
    for r, w in enumerate(infos):
        if w["name"] in seen:
            raise InvalidWorkerError(
                f"duplicate worker name {w['name']!r} (ranks {seen[w['name']]} and {r})"
            )
        seen[w["name"]] = r
    return infos


def barrier(store, key: str, world_size: int, timeout: float, wait: bool = True) -> bool:
    """Counts this worker in at `key` and, if `wait`, waits for all.

    Returns False if the timeout passed or the store went away first.
    """
    try:
        # A store whose host died must fail fast, not retry for init_timeout.
        store.set_timeout(timedelta(seconds=min(timeout, 5.0)))
        count = store.add(key, 1)
        deadline = time.monotonic() + timeout
        while wait and count < world_size and time.monotonic() < deadline:
            time.sleep(0.005)
            count = store.add(key, 0)
    except Exception:
        return False
    return count >= world_size or not wait
