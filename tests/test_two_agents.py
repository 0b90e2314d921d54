"""Two agents in one process, over a real loopback connection: each sends and
receives RRefs through its own RRefContext. Nothing here makes either of them
the process's current agent (torch.ops.torchrpc's), so an RRef encoded or
decoded through that one would fail."""

import gc
import secrets
import time

import pytest
import torch

import torchrpc
from torchrpc import _C

TIMEOUT = 30.0


@torch.jit.script
def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


@torch.jit.script
def twice(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@torch.jit.script
def plus_owned(r: torch.classes.torchrpc.RRef, y: torch.Tensor) -> torch.Tensor:
    # Runs on the owner, where local_value() needs no agent.
    v = r.local_value()
    assert isinstance(v, torch.Tensor)
    return v + y


@torch.jit.script
def echo(r: torch.classes.torchrpc.RRef) -> torch.classes.torchrpc.RRef:
    return r


FUNCTIONS = (add, twice, plus_owned, echo)


def _options(secret: bytes, job_id: str, transport: str) -> dict:
    """What init_rpc gives _C.Agent, for a loopback worker on `transport`."""
    o = torchrpc.RpcOptions(num_worker_threads=4, transports=[transport])
    return torchrpc.api.agent_options(o, "127.0.0.1", secret, job_id)


def _start_pair(transport):
    """Workers w0 and w1 of one job, each knowing the other."""
    secret, job_id = secrets.token_bytes(32), secrets.token_hex(16)
    agents = [_C.Agent(f"w{i}", i, _options(secret, job_id, transport)) for i in range(2)]
    workers = [(f"w{i}", agent.address, False) for i, agent in enumerate(agents)]
    for agent in agents:
        for fn in FUNCTIONS:
            agent.register_function(fn.qualified_name, fn)
        agent.set_workers(workers)
    return agents


def _call(agent, to, fn, *args):
    return agent.script_call(to, fn.qualified_name, fn.schema, args, {}, TIMEOUT, True)


def _counts(agent):
    info = agent.debug_info()
    return {k: info[k] for k in ("owned_values", "user_forks", "pending_children",
                                 "unconfirmed_users", "live_users")}


def _settle(agents, limit=10.0):
    """Waits until every agent's RRef tables are empty; returns the last counts."""
    deadline = time.monotonic() + limit
    while True:
        gc.collect()
        seen = [_counts(agent) for agent in agents]
        if not any(any(c.values()) for c in seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_two_agents_in_one_process(transport):
    with pytest.raises(torchrpc.RpcShutdownError):
        _C.current_agent()  # the premise: no agent is the current one
    a, b = _start_pair(transport)
    try:
        x, y = torch.arange(4.0), torch.ones(4)

        # Script calls both ways.
        assert torch.equal(_call(a, 1, add, x, y), x + y)
        assert torch.equal(_call(b, 0, add, y, x), x + y)

        # remote() from w0 makes a value w1 owns; w0 fetches it.
        r = a.remote_script(1, twice.qualified_name, twice.schema, (x,), {}, TIMEOUT)
        assert a.rref_info(r)[:2] == (False, 1)  # a user reference, owned by w1
        assert torch.equal(a.rref_fetch(r, TIMEOUT), 2 * x)
        # Sent back to its owner as an argument: w0 encodes it, w1 decodes it
        # into its owner reference.
        assert torch.equal(_call(a, 1, plus_owned, r, y), 2 * x + y)

        # An RRef w1 owns goes to w0 as an argument (a fork the owner
        # registers) and comes back as the result (a child fork of w0's):
        # both agents fork and register RRefs with their own codec.
        local = b.rref_local(3 * x, False)
        back = _call(b, 0, echo, local)
        assert b.rref_info(back)[0] is True
        assert b.rref_id(back) == b.rref_id(local)
        assert torch.equal(b.rref_fetch(back, TIMEOUT), 3 * x)

        del r, local, back
        counts = _settle([a, b])
        assert not any(any(c.values()) for c in counts), counts
        assert a.wait_until_idle(TIMEOUT) and b.wait_until_idle(TIMEOUT)
    finally:
        a.shutdown()
        b.shutdown()
