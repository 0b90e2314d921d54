"""torchrpc and a torch.distributed process group in one job, on one
MASTER_ADDR/MASTER_PORT, as programs that mix collectives and RPC start them
(DDP plus a parameter server).

Each case runs real processes that bring up a gloo group
(init_process_group(backend="gloo", init_method="env://")) and torchrpc in
one order, all_reduce next to RPC calls (a script call, a Python call), shut
torchrpc down and start it again on the same store (a second rendezvous must
not read the first one's keys), and tear both down in one order. After
torchrpc's shutdown the group must still reach its store (new_group() asks
it); after destroy_process_group() torchrpc's shutdown barrier must still
work.
"""

import os

import pytest
import torch
import torch.distributed as dist
from rpc_harness import free_port, report_from_child, spawn_and_collect

import scripted_ops
import torchrpc

WORLD_SIZE = 2


def udf_rank_times(k):
    return torchrpc.get_worker_info().id * k


def _start_rpc(rank):
    torchrpc.init_rpc(f"w{rank}", rank=rank, world_size=WORLD_SIZE,
                      options=torchrpc.RpcOptions(python_udf=True, shutdown_timeout=20))


def _start_group():
    dist.init_process_group(backend="gloo", init_method="env://")


def _all_reduce(group=None):
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t, group=group)
    return t.item()


def _calls(rank):
    """A script call and a Python call to the next worker."""
    peer = f"w{(rank + 1) % WORLD_SIZE}"
    script = torchrpc.rpc_sync(peer, scripted_ops.add, (torch.ones(2), torch.ones(2)))
    python = torchrpc.rpc_sync(peer, udf_rank_times, (10,))
    return script.tolist(), python


def _child(start, teardown, rank, port, queue):
    def run():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(WORLD_SIZE))
        out = {}
        for what in start:
            if what == "rpc":
                _start_rpc(rank)
            else:
                _start_group()
        out["first"] = (_all_reduce(), _calls(rank))
        torchrpc.shutdown()
        # The group's store outlives torchrpc: a new group rendezvous there.
        out["after_rpc_shutdown"] = _all_reduce(dist.new_group())
        _start_rpc(rank)  # now over the group's store: fresh keys, not the first run's
        out["second"] = (_all_reduce(), _calls(rank))
        if teardown == ("group", "rpc"):
            dist.destroy_process_group()
            out["after_group_destroyed"] = _calls(rank)
            torchrpc.shutdown()
        else:
            torchrpc.shutdown()
            dist.destroy_process_group()
        return out

    report_from_child(rank, queue, run)


ORDERS = [("group", "rpc"), ("rpc", "group")]


@pytest.mark.parametrize("teardown", ORDERS, ids=lambda t: "_".join(t))
@pytest.mark.parametrize("start", ORDERS, ids=lambda s: "_".join(s))
def test_process_group_and_rpc_share_the_rendezvous_store(start, teardown):
    port = free_port()
    results = spawn_and_collect(
        _child, lambda r: (start, teardown, r, port), WORLD_SIZE, timeout=60
    )
    total = float(sum(range(1, WORLD_SIZE + 1)))
    for rank, out in enumerate(results):
        expected_calls = ([2.0, 2.0], ((rank + 1) % WORLD_SIZE) * 10)
        assert out["first"] == (total, expected_calls), out
        assert out["after_rpc_shutdown"] == total, out
        assert out["second"] == (total, expected_calls), out
        if teardown[0] == "group":
            assert out["after_group_destroyed"] == expected_calls, out
