"""torchrpc.optim: the TorchScript optimizers against torch.optim, and
DistributedOptimizer across real worker processes.

The end-to-end training tests need distributed autograd
(torch.ops.torchrpc.get_gradients and torchrpc.autograd) and skip without it.
"""

import importlib.util
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rpc_harness import run_workers

import torchrpc
from torchrpc.optim import DistributedOptimizer, ScriptOptimizer, script_optimizer
from torchrpc.optim.functional import script_config

HAS_AUTOGRAD = (
    hasattr(torch.ops.torchrpc, "get_gradients")
    and importlib.util.find_spec("torchrpc.autograd") is not None
)
needs_autograd = pytest.mark.skipif(
    not HAS_AUTOGRAD, reason="needs distributed autograd (torch.ops.torchrpc.get_gradients)"
)

# ---------------------------------------------------------------------------
# (a) ScriptOptimizer makes torch.optim's updates, step after step.

_lr = st.sampled_from([1e-3, 0.01, 0.1, 0.5])
_wd = st.sampled_from([0.0, 0.1])
_eps = st.sampled_from([1e-8, 1e-3])


@st.composite
def _sgd_kwargs(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    dampening = draw(st.sampled_from([0.0, 0.1]))
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    return dict(lr=draw(_lr), momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=draw(_wd), maximize=draw(st.booleans()))


def _adam_kwargs(decoupled: bool):
    return st.fixed_dictionaries(dict(
        lr=_lr,
        betas=st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.9, 0.999])),
        eps=_eps, weight_decay=_wd, amsgrad=st.booleans(), maximize=st.booleans(),
        **({} if decoupled else {"decoupled_weight_decay": st.booleans()}),
    ))


_CASES = {
    torch.optim.SGD: _sgd_kwargs(),
    torch.optim.Adam: _adam_kwargs(decoupled=False),
    torch.optim.AdamW: _adam_kwargs(decoupled=True),
    torch.optim.Adagrad: st.fixed_dictionaries(dict(
        lr=_lr, lr_decay=st.sampled_from([0.0, 0.1]), weight_decay=_wd,
        initial_accumulator_value=st.sampled_from([0.0, 0.1]),
        eps=st.sampled_from([1e-10, 1e-3]), maximize=st.booleans())),
    torch.optim.RMSprop: st.fixed_dictionaries(dict(
        lr=_lr, alpha=st.sampled_from([0.9, 0.99]), eps=_eps, weight_decay=_wd,
        momentum=st.sampled_from([0.0, 0.9]), centered=st.booleans(),
        maximize=st.booleans())),
}

_shapes = st.lists(st.lists(st.integers(1, 4), max_size=3), min_size=1, max_size=3)
_dtypes = st.sampled_from([torch.float32, torch.float64, torch.complex64])


@pytest.mark.parametrize("cls", list(_CASES), ids=lambda c: c.__name__)
@settings(deadline=None, max_examples=40)
@given(data=st.data(), shapes=_shapes, dtype=_dtypes, steps=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_script_optimizer_matches_torch_optim(cls, data, shapes, dtype, steps, seed):
    kwargs = data.draw(_CASES[cls], label="kwargs")
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    mine = script_optimizer(cls, ours, **kwargs)
    reference = cls(theirs, **kwargs)
    for _ in range(steps):
        # Some parameters get no gradient in some steps: both skip them.
        has_grad = [bool(torch.rand((), generator=gen) < 0.8) for _ in shapes]
        grads = [torch.randn(s, dtype=dtype, generator=gen) if g else None
                 for s, g in zip(shapes, has_grad)]
        mine.step({p: g for p, g in zip(ours, grads) if g is not None})
        for p, g in zip(theirs, grads):
            p.grad = None if g is None else g.clone()
        reference.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)


def test_step_list_and_dict_agree():
    a = torch.randn(3, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    grads = [torch.randn(3) for _ in range(3)]
    by_dict = script_optimizer(torch.optim.Adam, [a], lr=0.1)
    by_list = script_optimizer(torch.optim.Adam, [b], lr=0.1)
    for g in grads:
        by_dict.step({a: g})
        by_list.step_list([g])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="1 parameters"):
        by_list.step_list([])


@torch.jit.script
def _step_in_torchscript(opt: ScriptOptimizer, p: torch.Tensor, g: torch.Tensor) -> float:
    opt.step({p: g})
    return opt.lr


def test_script_optimizer_runs_inside_torchscript():
    p = torch.ones(2, requires_grad=True)
    assert _step_in_torchscript(script_optimizer(torch.optim.SGD, [p], lr=0.5), p,
                                torch.ones(2)) == 0.5
    assert torch.equal(p.detach(), torch.full((2,), 0.5))


def test_config_comes_from_torch_optim():
    kind, hparams, flags = script_config(torch.optim.AdamW)
    assert kind == "adam" and flags["decoupled_weight_decay"]
    assert hparams["weight_decay"] == 0.01 and (hparams["beta1"], hparams["beta2"]) == (0.9, 0.999)
    assert script_config(torch.optim.Adadelta) is None
    assert script_config(type("MySGD", (torch.optim.SGD,), {})) is None  # may change the update
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch.optim's own check
        script_config(torch.optim.SGD, lr=-1.0)
    with pytest.raises(ValueError, match="differentiable"):
        script_config(torch.optim.Adam, differentiable=True)
    with pytest.raises(ValueError, match="no TorchScript version"):
        script_optimizer(torch.optim.Adadelta, [torch.zeros(1)])


def test_missing_hyperparameter_is_named():
    with pytest.raises(Exception, match="needs hyperparameter 'momentum'"):
        ScriptOptimizer("sgd", [torch.zeros(1)], {"lr": 0.1, "weight_decay": 0.0},
                        {"maximize": False, "nesterov": False})
    with pytest.raises(Exception, match="unknown kind 'lbfgs'"):
        ScriptOptimizer("lbfgs", [], {}, {})


# ---------------------------------------------------------------------------
# (b) DistributedOptimizer across worker processes.


@torch.jit.script
def make_param(value: torch.Tensor) -> torch.Tensor:
    return value.clone().requires_grad_(True)


@torch.jit.script
def param_count(opt: torch.classes.torchrpc.RRef) -> int:
    value = opt.local_value()
    assert isinstance(value, ScriptOptimizer)
    return len(value.params)


@torch.jit.script
def state_is_separate(a: torch.classes.torchrpc.RRef, b: torch.classes.torchrpc.RRef) -> bool:
    """Writing optimizer a's state for its first parameter leaves its second
    parameter's and optimizer b's alone."""
    x = a.local_value()
    y = b.local_value()
    assert isinstance(x, ScriptOptimizer) and isinstance(y, ScriptOptimizer)
    x.momentum_buffer[0] = torch.zeros(1)
    x.steps[0] = 7
    return x.momentum_buffer[1] is None and y.momentum_buffer[0] is None and y.steps[0] == 0


@torch.jit.script
def forward(w: torch.classes.torchrpc.RRef, x: torch.Tensor) -> torch.Tensor:
    """x @ w on w's owner: the step autograd records across workers."""
    value = w.local_value()
    assert isinstance(value, torch.Tensor)
    return torch.tanh(x @ value)


class PlainSGD(torch.optim.SGD):
    """A subclass: no TorchScript version, so it takes the Python path."""


def _initial():
    gen = torch.Generator().manual_seed(0)
    return {"w1": torch.randn(4, 3, generator=gen), "w2a": torch.randn(3, 2, generator=gen),
            "w2b": torch.randn(3, 2, generator=gen), "b": torch.randn(2, generator=gen)}


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + step))


def _loss(step, h_of, w2_of, b):
    """The model both loops train: w1 on w1, w2a/w2b on w2, b on the trainer;
    step 1 leaves w2a out, so its owner steps without a gradient for it."""
    h = h_of(_inputs(step))
    out = w2_of("w2b", h) if step == 1 else w2_of("w2a", h) + w2_of("w2b", h)
    return ((out + b) ** 2).sum()


def _make_params():
    init = _initial()
    return {
        "w1": torchrpc.remote("w1", make_param, (init["w1"],)),
        "w2a": torchrpc.remote("w2", make_param, (init["w2a"],)),
        "w2b": torchrpc.remote("w2", make_param, (init["w2b"],)),
        "b": torchrpc.RRef(init["b"].clone().requires_grad_()),
    }


def body_train(rank, optimizer_class, kwargs, steps):
    if rank != 0:
        return None
    import torchrpc.autograd as dist_autograd  # here: builds without it still collect

    params = _make_params()
    opt = DistributedOptimizer(optimizer_class, list(params.values()), **kwargs)
    b = params["b"].local_value()
    for step in range(steps):
        with dist_autograd.context() as ctx:
            loss = _loss(step, lambda x: torchrpc.rpc_sync("w1", forward, (params["w1"], x)),
                         lambda k, h: torchrpc.rpc_sync("w2", forward, (params[k], h)), b)
            dist_autograd.backward(ctx, [loss])
            opt.step(ctx)
    return {k: r.to_here().detach() for k, r in params.items()}


def _train_locally(optimizer_class, kwargs, steps):
    params = {k: v.clone().requires_grad_() for k, v in _initial().items()}
    opt = optimizer_class(list(params.values()), **kwargs)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(step, lambda x: torch.tanh(x @ params["w1"]),
              lambda k, h: torch.tanh(h @ params[k]), params["b"]).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def _train(rank, case):
    return body_train(rank, *case)


@needs_autograd
@pytest.mark.parametrize("case", [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, 3),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, 3),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}, 3),
], ids=["SGD", "Adam", "RMSprop"])
def test_distributed_training_matches_local_torch_optim(case):
    got = run_workers(partial(_train, case=case), 3, timeout=180)[0]
    expected = _train_locally(*case)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


@needs_autograd
def test_python_fallback_trains_like_local():
    case = (PlainSGD, {"lr": 0.05, "momentum": 0.9}, 3)
    got = run_workers(partial(_train, case=case), 3, options={"python_udf": True}, timeout=180)[0]
    expected = _train_locally(*case)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def body_construct(rank):
    """One optimizer per owner, errors at construction; no autograd needed."""
    if rank != 0:
        return None
    params = _make_params()
    out = {}
    opt = DistributedOptimizer(torch.optim.Adam, list(params.values()), lr=0.1)
    out["script_owners"] = {name: torchrpc.rpc_sync(name, param_count, (r,))
                            for name, r in opt._optimizers.items()}
    other = DistributedOptimizer(torch.optim.SGD, [params["w2a"], params["w2b"]], lr=0.1,
                                 momentum=0.9)
    out["separate_state"] = torchrpc.rpc_sync(
        "w2", state_is_separate, (opt._optimizers["w2"], other._optimizers["w2"]))
    python_opt = DistributedOptimizer(PlainSGD, [params["w1"], params["b"]], lr=0.1)
    out["python_owners"] = {
        name: torchrpc.rpc_sync(name, _python_param_count, (r,))
        for name, r in python_opt._optimizers.items()
    }
    for label, make in [
        ("refused", lambda: DistributedOptimizer(PlainSGD, [params["w2a"]], lr=0.1)),
        ("bad_python_args", lambda: DistributedOptimizer(PlainSGD, [params["w1"]], lr=-1.0)),
        ("bad_script_args", lambda: DistributedOptimizer(torch.optim.SGD, [params["w1"]], lr=-1.0)),
        ("not_a_tensor", lambda: DistributedOptimizer(
            torch.optim.SGD, [torchrpc.remote("w1", torch.add, (1, 2))], lr=0.1)),
        ("not_an_rref", lambda: DistributedOptimizer(torch.optim.SGD, [torch.zeros(1)])),
    ]:
        try:
            make()
            out[label] = None
        except Exception as e:
            out[label] = (type(e).__name__, str(e))
    return out


def _python_param_count(rref) -> int:
    return sum(len(g["params"]) for g in rref.local_value().param_groups)


def test_one_optimizer_per_owner_and_clear_errors():
    # w2 does not run Python callables; w0 and w1 do.
    options = [{"python_udf": True}, {"python_udf": True}, {"python_udf": False}]
    out = run_workers(body_construct, 3, options=options, timeout=180)[0]
    assert out["script_owners"] == {"w0": 1, "w1": 1, "w2": 2}
    assert out["separate_state"]
    assert out["python_owners"] == {"w0": 1, "w1": 1}
    kind, message = out["refused"]
    assert kind == "PythonCallDisabledError"
    assert "'w2'" in message and "python_udf=True" in message and "PlainSGD" in message
    kind, message = out["bad_python_args"]  # raised on w1, by torch.optim
    assert kind == "ValueError" and "learning rate" in message
    assert out["bad_script_args"][0] == "ValueError"
    assert "does not hold a tensor" in out["not_a_tensor"][1]
    assert out["not_an_rref"][0] == "TypeError"
