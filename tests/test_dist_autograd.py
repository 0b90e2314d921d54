"""Distributed autograd across real worker processes: gradients equal local
autograd for generated models split over three workers, every call form,
re-entrant graphs, retained graphs, errors, lost peers and cleanup."""

import os
import threading
import time
from typing import Any, List, Tuple

import hypothesis.strategies as st
import torch
from hypothesis import given, settings
from rpc_harness import run_workers

import torchrpc
import torchrpc.autograd as dist_autograd
from torchrpc import messages

UDF = {"python_udf": True}


@torch.jit.script
def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w)


@torch.jit.script
def layer_owned(x: torch.Tensor, w: torch.classes.torchrpc.RRef) -> torch.Tensor:
    v = w.local_value()
    assert isinstance(v, torch.Tensor)
    return torch.tanh(x @ v)


@torch.jit.script
def with_index(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # The second output is an integer tensor: it cannot carry a gradient.
    return x * 2.0, x.argmax()


@torch.jit.script
def ts_caller(to: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    args: List[Any] = [x, w]
    y = torch.ops.torchrpc.rpc_sync(to, "__torch__.test_dist_autograd.layer", args)
    assert isinstance(y, torch.Tensor)
    return y


def py_layer(x, w):
    return torch.tanh(x @ w)


def bounce(x, w):
    """Runs on another worker and calls back into the caller (A -> B -> A)."""
    return torchrpc.rpc_sync("w0", layer, (x, w)) * 1.0


def grad_of(context_id, rref):
    return dist_autograd.get_gradients(context_id)[rref.local_value()]


def contexts_alive():
    return torchrpc.debug_info()["autograd_contexts"]


def wait_all_released(world_size, timeout=1.0):
    """Live contexts per worker, once all are 0 or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [torchrpc.rpc_sync(f"w{r}", contexts_alive) for r in range(world_size)]
        if not any(alive) or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


MODES = ["script", "python", "remote", "torchscript", "owned", "bounce"]


def forward(h, w, mode, worker, owned_rref):
    """One layer of the generated model, the distributed way."""
    to = f"w{worker}"
    if mode == "script":
        return torchrpc.rpc_sync(to, layer, (h, w))
    if mode == "python":
        return torchrpc.rpc_sync(to, py_layer, (h, w))
    if mode == "remote":
        return torchrpc.remote(to, layer, (h, w)).to_here()
    if mode == "torchscript":
        return ts_caller(to, h, w)
    if mode == "owned":
        return torchrpc.rpc_sync(owned_rref.owner_name(), layer_owned, (h, owned_rref))
    return torchrpc.rpc_sync("w1", bounce, (h, w))


model_spec = st.integers(2, 4).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(1, 5), min_size=n + 1, max_size=n + 1),
        st.lists(st.tuples(st.sampled_from(MODES), st.integers(1, 2)), min_size=n, max_size=n),
        st.booleans(),  # reuse the first hidden tensor in the loss (a tensor used twice)
    )
)


def gradients_match_body(rank):
    if rank != 0:
        return None
    checked = []

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(model_spec)
    def check(spec):
        widths, layers, reuse = spec
        torch.manual_seed(len(checked))
        x = torch.randn(3, widths[0], requires_grad=True)
        ws = [torch.randn(widths[i], widths[i + 1], requires_grad=True) for i in range(len(layers))]
        # "owned" layers keep their weight on the remote worker, inside an RRef.
        owned = [
            torchrpc.remote(f"w{worker}", torch.Tensor.requires_grad_, (w.detach().clone(),))
            if mode == "owned" else None
            for w, (mode, worker) in zip(ws, layers)
        ]
        with dist_autograd.context() as cid:
            h, first = x, None
            for w, (mode, worker), r in zip(ws, layers, owned):
                h = forward(h, w, mode, worker, r)
                first = h if first is None else first
            loss = h.sum() + (first * first).sum() if reuse else h.sum()
            dist_autograd.backward(cid, [loss])
            grads = dist_autograd.get_gradients(cid)
            got_x = grads[x]
            got_w = [
                torchrpc.rpc_sync(r.owner_name(), grad_of, (cid, r)) if r is not None else grads.get(w)
                for w, r in zip(ws, owned)
            ]
        xl = x.detach().clone().requires_grad_()
        wl = [w.detach().clone().requires_grad_() for w in ws]
        h, first = xl, None
        for w in wl:
            h = torch.tanh(h @ w)
            first = h if first is None else first
        (h.sum() + (first * first).sum() if reuse else h.sum()).backward()
        torch.testing.assert_close(got_x, xl.grad)
        for got, want in zip(got_w, wl):
            torch.testing.assert_close(got, want.grad)
        checked.append(spec)

    check()
    return len(checked), wait_all_released(3)


def test_gradients_match_local_autograd(transport):
    checked, alive = run_workers(gradients_match_body, 3, options=UDF, timeout=240,
                                 transport=transport)[0]
    assert checked >= 20
    assert alive == [0, 0, 0]


def semantics_body(rank):
    if rank != 0:
        return None
    out = {}
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    # retain_graph, then a second backward: gradients add up in the context.
    with dist_autograd.context() as cid:
        loss = torchrpc.rpc_sync("w1", layer, (x, w)).sum()
        dist_autograd.backward(cid, [loss], retain_graph=True)
        once = dist_autograd.get_gradients(cid)[w].clone()
        dist_autograd.backward(cid, [loss])
        out["retain"] = torch.allclose(dist_autograd.get_gradients(cid)[w], 2 * once)
        # A second forward and backward in the same context.
        loss2 = torchrpc.rpc_sync("w2", layer, (x, w)).sum()
        dist_autograd.backward(cid, [loss2])
        out["second_forward"] = torch.allclose(dist_autograd.get_gradients(cid)[w], 3 * once)
    # Outputs that do not require grad travel beside ones that do.
    with dist_autograd.context() as cid:
        y, idx = torchrpc.rpc_sync("w1", with_index, (x,))
        out["index_grad"] = idx.requires_grad
        dist_autograd.backward(cid, [y.sum()])
        out["x_grad"] = torch.allclose(dist_autograd.get_gradients(cid)[x], torch.full_like(x, 2.0))
    # Gradients never reach .grad.
    out["no_dot_grad"] = x.grad is None and w.grad is None
    # Nothing with requires_grad sent: no context needed on the far side.
    with dist_autograd.context() as cid:
        plain = torchrpc.rpc_sync("w1", layer, (x.detach(), w.detach()))
        out["plain"] = not plain.requires_grad
    # RRef.backward: owner-side within a context, and a local backward on the owner.
    with dist_autograd.context() as cid:
        r = torchrpc.remote("w1", layer, (x, w))
        r.backward(cid)
        out["rref_backward"] = dist_autograd.get_gradients(cid)[w].shape == w.shape
    try:
        with dist_autograd.context():
            with dist_autograd.context():
                pass
        out["nested"] = "allowed"
    except RuntimeError as e:
        out["nested"] = str(e)
    out["alive"] = wait_all_released(3)
    return out


def test_retain_graph_second_forward_and_rref_backward(transport):
    out = run_workers(semantics_body, 3, options=UDF, timeout=120, transport=transport)[0]
    assert out["retain"] and out["second_forward"]
    assert out["index_grad"] is False and out["x_grad"]
    assert out["no_dot_grad"] and out["plain"] and out["rref_backward"]
    assert "do not nest" in out["nested"]
    assert out["alive"] == [0, 0, 0]


class Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ValueError("boom in backward")


class Die(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        os._exit(0)


def boom_layer(x):
    return Boom.apply(x)


def die_layer(x):
    return Die.apply(x)


def train_thread(seed, results):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 2, requires_grad=True)
    ok = True
    for _ in range(5):
        with dist_autograd.context() as cid:
            loss = torchrpc.rpc_sync(f"w{1 + seed % 2}", layer, (x, w)).sum()
            dist_autograd.backward(cid, [loss])
            got = dist_autograd.get_gradients(cid)[w]
        wl = w.detach().clone().requires_grad_()
        torch.tanh(x.detach() @ wl).sum().backward()
        ok = ok and torch.allclose(got, wl.grad)
    results[seed] = ok


_finished = threading.Event()


def finish():
    # Set a moment later: the waiting worker shuts down at once, and this
    # call's reply must leave first.
    threading.Timer(0.2, _finished.set).start()


def failures_body(rank):
    if rank != 0:
        # Serve until rank 0 is done (w2 dies in its backward before that).
        _finished.wait(90)
        return None
    out = {}
    x = torch.randn(2, 2, requires_grad=True)
    with dist_autograd.context() as cid:
        y = torchrpc.rpc_sync("w1", boom_layer, (x,))
        try:
            dist_autograd.backward(cid, [y.sum()])
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
    results = {}
    threads = [threading.Thread(target=train_thread, args=(s, results)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    out["threads"] = results
    out["alive_before_loss"] = wait_all_released(3)
    with dist_autograd.context() as cid:
        y = torchrpc.rpc_sync("w2", die_layer, (x,))
        start = time.monotonic()
        try:
            dist_autograd.backward(cid, [y.sum()])
            out["lost"] = None
        except torchrpc.PeerLostError as e:
            out["lost"] = str(e)
        out["lost_after"] = time.monotonic() - start
    out["alive"] = [contexts_alive(), torchrpc.rpc_sync("w1", contexts_alive)]
    torchrpc.rpc_sync("w1", finish)
    return out


def test_errors_lost_peer_and_concurrent_contexts(transport):
    out = run_workers(failures_body, 3, options=UDF, timeout=120, graceful=False, may_die=(2,),
                      transport=transport)[0]
    assert "boom in backward" in out["error"] and "w1" in out["error"]
    assert out["threads"] == {0: True, 1: True, 2: True, 3: True}
    assert out["alive_before_loss"] == [0, 0, 0]
    assert out["lost"] is not None and out["lost_after"] < 10
    assert out["alive"] == [0, 0]


def stranger_body(rank):
    """A raw client sends autograd messages that name nothing real."""
    from torchrpc.testing import authenticated_socket, read_frame

    if rank != 0:
        _finished.wait(60)
        return None
    state = torchrpc.api._current()
    job_id, secret = state.credentials
    replies = {}
    # A member gone wrong: it authenticates as w1, then sends nonsense.
    with authenticated_socket(state.agent.address, 1, 0, secret, job_id) as s:
        probes = {
            "backward_unknown_context": messages.BackwardAutogradReq(
                id=1, context_id=12345, from_worker_id=1, grads={7: [torch.ones(2)]}),
            "cleanup_unknown_context": messages.CleanupAutogradContextReq(id=2, context_id=999),
            "rref_backward_unknown": messages.RRefBackwardReq(
                id=3, rref_id=(0, 77), context_id=5, retain_graph=False),
            "cleanup_then_late_request": messages.CleanupAutogradContextReq(id=5, context_id=777),
            "late_request": messages.ForwardAutogradReq(
                id=6, from_worker_id=1, context_id=777, message_id=1, device_map={},
                wrapped=messages.ScriptCall(qualified_name="aten::add", args=(1, 2), is_async=False)),
            "forward_wrapping_forward": messages.ForwardAutogradReq(
                id=4, from_worker_id=1, context_id=3, message_id=1, device_map={},
                wrapped=messages.ForwardAutogradReq(
                    from_worker_id=1, context_id=3, message_id=2, device_map={},
                    wrapped=messages.ScriptCall(qualified_name="x", args=(), is_async=False))),
        }
        for name, m in probes.items():
            s.sendall(m.encode())
            reply = read_frame(s)
            replies[name] = (reply.TYPE.name, reply.fields.get("message", ""))
    # The worker still serves its peers.
    x = torch.randn(2, 2, requires_grad=True)
    with dist_autograd.context() as cid:
        dist_autograd.backward(cid, [torchrpc.rpc_sync("w1", layer, (x, x)).sum()])
        ok = dist_autograd.get_gradients(cid)[x].shape == x.shape
    torchrpc.rpc_sync("w1", finish)
    return replies, ok


# Not per transport: its subject is the checks on autograd messages, which
# the raw client can only send as TCP frames.
def test_autograd_messages_from_a_stranger_get_clear_errors():
    replies, ok = run_workers(stranger_body, 2, options=UDF, timeout=60)[0]
    assert ok
    assert replies["backward_unknown_context"][0] == "EXCEPTION"
    assert "no autograd context 12345" in replies["backward_unknown_context"][1]
    assert replies["cleanup_unknown_context"][0] == "CLEANUP_AUTOGRAD_CONTEXT_RESP"
    assert replies["rref_backward_unknown"][0] == "EXCEPTION"
    assert replies["forward_wrapping_forward"][0] == "EXCEPTION"
    # A request for a context released here does not bring it back.
    assert replies["late_request"][0] == "EXCEPTION"
    assert "already released" in replies["late_request"][1]
    assert "wraps type" in replies["forward_wrapping_forward"][1]
