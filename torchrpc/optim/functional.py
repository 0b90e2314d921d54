"""Optimizers compiled to TorchScript, so a parameter's owner can step them
with no Python and no GIL.

`ScriptOptimizer` is a TorchScript class that makes the same updates as
torch.optim's SGD, Adam, AdamW, Adagrad and RMSprop (their single-tensor
code path, the one torch.optim takes for CPU tensors), step after step.
`script_optimizer(torch.optim.Adam, params, lr=0.01)` builds one from the
arguments the torch.optim class takes; `script_config` does the argument
mapping alone, for code that builds the object elsewhere (on an owner).

    opt = script_optimizer(torch.optim.SGD, [w], lr=0.1, momentum=0.9)
    opt.step({w: grad_of_w})          # Dict[Tensor, Tensor], keyed by the param
    opt.step_list([grad_of_w])        # or one Optional[Tensor] per param

Differences from torch.optim: one parameter group; no sparse gradients;
no `differentiable` or `capturable`; `foreach` and `fused` only choose
torch's kernels, so they are accepted and ignored. The per-parameter step
count is an int (torch keeps a float32 tensor, which stops counting at 2**24).
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ScriptOptimizer", "script_optimizer", "script_config", "SCRIPT_OPTIMIZERS"]

# The torch.optim classes ScriptOptimizer reproduces, and its name for each
# update rule (AdamW is Adam with decoupled weight decay).
SCRIPT_OPTIMIZERS = {
    torch.optim.SGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
    torch.optim.Adagrad: "adagrad",
    torch.optim.RMSprop: "rmsprop",
}

# What each rule reads from the hyperparameters and flags ScriptOptimizer takes.
_FLOATS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum"),
}
_FLAGS = {
    "sgd": ("nesterov", "maximize"),
    "adam": ("amsgrad", "maximize", "decoupled_weight_decay"),
    "adagrad": ("maximize",),
    "rmsprop": ("centered", "maximize"),
}


@torch.jit.script
def _required(values: Dict[str, float], key: str, kind: str) -> float:
    if key not in values:
        raise ValueError("ScriptOptimizer '" + kind + "' needs hyperparameter '" + key + "'")
    return values[key]


@torch.jit.script
def _required_flag(flags: Dict[str, bool], key: str, kind: str) -> bool:
    if key not in flags:
        raise ValueError("ScriptOptimizer '" + kind + "' needs flag '" + key + "'")
    return flags[key]


@torch.jit.script
def _zeros(n: int) -> List[int]:
    out: List[int] = []
    for _ in range(n):
        out.append(0)
    return out


@torch.jit.script
def _nones(n: int) -> List[Optional[Tensor]]:
    out: List[Optional[Tensor]] = []
    for _ in range(n):
        out.append(None)
    return out


@torch.jit.script
class ScriptOptimizer:
    """One optimizer over `params`, updating them in place.

    kind: "sgd", "adam", "adagrad" or "rmsprop". hparams and flags hold what
    that rule reads (see script_config; keys it does not read are ignored).
    State is created per parameter on its first gradient, as torch.optim does.
    """

    def __init__(self, kind: str, params: List[Tensor], hparams: Dict[str, float],
                 flags: Dict[str, bool]):
        if kind not in ["sgd", "adam", "adagrad", "rmsprop"]:
            raise ValueError("ScriptOptimizer: unknown kind '" + kind + "'")
        self.kind = kind
        self.params = params
        self.lr = _required(hparams, "lr", kind)
        self.weight_decay = _required(hparams, "weight_decay", kind)
        self.maximize = _required_flag(flags, "maximize", kind)
        self.momentum = 0.0
        self.dampening = 0.0
        self.nesterov = False
        self.beta1 = 0.0
        self.beta2 = 0.0
        self.eps = 0.0
        self.amsgrad = False
        self.decoupled_weight_decay = False
        self.lr_decay = 0.0
        self.initial_accumulator_value = 0.0
        self.alpha = 0.0
        self.centered = False
        if kind == "sgd":
            self.momentum = _required(hparams, "momentum", kind)
            self.dampening = _required(hparams, "dampening", kind)
            self.nesterov = _required_flag(flags, "nesterov", kind)
        elif kind == "adam":
            self.beta1 = _required(hparams, "beta1", kind)
            self.beta2 = _required(hparams, "beta2", kind)
            self.eps = _required(hparams, "eps", kind)
            self.amsgrad = _required_flag(flags, "amsgrad", kind)
            self.decoupled_weight_decay = _required_flag(flags, "decoupled_weight_decay", kind)
        elif kind == "adagrad":
            self.lr_decay = _required(hparams, "lr_decay", kind)
            self.initial_accumulator_value = _required(hparams, "initial_accumulator_value", kind)
            self.eps = _required(hparams, "eps", kind)
        else:
            self.alpha = _required(hparams, "alpha", kind)
            self.eps = _required(hparams, "eps", kind)
            self.momentum = _required(hparams, "momentum", kind)
            self.centered = _required_flag(flags, "centered", kind)
        # Per-parameter state, one list per buffer (None until first needed;
        # real views for complex parameters). Not a dict per parameter: run
        # by the agent (remote()), the dicts of `[{} for _ in params]` came
        # out as one shared constant, shared by every parameter and every
        # optimizer. Lists filled by append are written where they are built.
        # Buffers are set with self.<list>[i] = ... in the method itself:
        # a helper taking the list as an argument did not update it here.
        self.steps = _zeros(len(params))
        self.momentum_buffer = _nones(len(params))  # sgd, rmsprop
        self.exp_avg = _nones(len(params))  # adam
        self.exp_avg_sq = _nones(len(params))  # adam
        self.max_exp_avg_sq = _nones(len(params))  # adam with amsgrad
        self.sum = _nones(len(params))  # adagrad
        self.square_avg = _nones(len(params))  # rmsprop
        self.grad_avg = _nones(len(params))  # rmsprop, centered

    def step(self, grads: Dict[Tensor, Tensor]) -> None:
        """Updates every parameter that has an entry in `grads` (keyed by the
        parameter tensor itself); the others are left alone."""
        ordered: List[Optional[Tensor]] = []
        for p in self.params:
            ordered.append(grads.get(p))
        self.step_list(ordered)

    def step_list(self, grads: List[Optional[Tensor]]) -> None:
        """Like step, with one gradient (or None) per parameter, in order."""
        if len(grads) != len(self.params):
            raise ValueError("ScriptOptimizer.step_list: got " + str(len(grads))
                             + " gradients for " + str(len(self.params)) + " parameters")
        with torch.no_grad():
            for i in range(len(self.params)):
                grad = grads[i]
                if grad is not None:
                    self._update(i, self.params[i], grad)

    def _update(self, i: int, param: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError("ScriptOptimizer does not support sparse gradients")
        if torch.is_complex(param):
            # Views share storage, so updating them updates the parameter.
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
        if self.maximize:
            grad = -grad
        self.steps[i] += 1
        if self.kind == "sgd":
            self._sgd(i, param, grad)
        elif self.kind == "adam":
            self._adam(i, param, grad, float(self.steps[i]))
        elif self.kind == "adagrad":
            self._adagrad(i, param, grad, float(self.steps[i]))
        else:
            self._rmsprop(i, param, grad)

    # Each rule below follows torch.optim's _single_tensor_<name> operation by
    # operation: the same float rounding is what makes the results equal.

    def _sgd(self, i: int, param: Tensor, grad: Tensor) -> None:
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = self.momentum_buffer[i]
            if buf is None:
                buf = grad.detach().clone()
                self.momentum_buffer[i] = buf
            else:
                buf.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
            if self.nesterov:
                grad = grad.add(buf, alpha=self.momentum)
            else:
                grad = buf
        param.add_(grad, alpha=-self.lr)

    def _adam(self, i: int, param: Tensor, grad: Tensor, step: float) -> None:
        exp_avg = self.exp_avg[i]
        if exp_avg is None:
            exp_avg = torch.zeros_like(param)
            self.exp_avg[i] = exp_avg
        exp_avg_sq = self.exp_avg_sq[i]
        if exp_avg_sq is None:
            exp_avg_sq = torch.zeros_like(param)
            self.exp_avg_sq[i] = exp_avg_sq
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                param.mul_(1 - self.lr * self.weight_decay)
            else:
                grad = grad.add(param, alpha=self.weight_decay)
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1 ** step
        bias_correction2 = 1 - self.beta2 ** step
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        if self.amsgrad:
            max_exp_avg_sq = self.max_exp_avg_sq[i]
            if max_exp_avg_sq is None:
                max_exp_avg_sq = torch.zeros_like(param)
                self.max_exp_avg_sq[i] = max_exp_avg_sq
            max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _adagrad(self, i: int, param: Tensor, grad: Tensor, step: float) -> None:
        state_sum = self.sum[i]
        if state_sum is None:
            state_sum = torch.full_like(param, self.initial_accumulator_value)
            self.sum[i] = state_sum
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        clr = self.lr / (1 + (step - 1) * self.lr_decay)
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(self.eps)
        param.addcdiv_(grad, std, value=-clr)

    def _rmsprop(self, i: int, param: Tensor, grad: Tensor) -> None:
        square_avg = self.square_avg[i]
        if square_avg is None:
            square_avg = torch.zeros_like(param)
            self.square_avg[i] = square_avg
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
        if self.centered:
            grad_avg = self.grad_avg[i]
            if grad_avg is None:
                grad_avg = torch.zeros_like(param)
                self.grad_avg[i] = grad_avg
            grad_avg.lerp_(grad, 1 - self.alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(self.eps)
        if self.momentum > 0:
            buf = self.momentum_buffer[i]
            if buf is None:
                buf = torch.zeros_like(param)
                self.momentum_buffer[i] = buf
            buf.mul_(self.momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-self.lr)
        else:
            param.addcdiv_(grad, avg, value=-self.lr)


def script_config(optimizer_class, *args, **kwargs) -> Optional[Tuple[str, Dict[str, float],
                                                                      Dict[str, bool]]]:
    """(kind, hparams, flags) for ScriptOptimizer from a torch.optim class and
    the arguments that follow `params` in its constructor; None when
    ScriptOptimizer has no version of that class (subclasses included: they
    may change the update).

    The class's own constructor checks the arguments and fills in its
    defaults, so errors and defaults are torch.optim's.
    """
    kind = SCRIPT_OPTIMIZERS.get(optimizer_class)
    if kind is None:
        return None
    probe = optimizer_class([torch.zeros(1, requires_grad=True)], *args, **kwargs)
    defaults = probe.defaults
    for unsupported in ("differentiable", "capturable"):
        if defaults.get(unsupported):
            raise ValueError(f"torchrpc.optim: the TorchScript {optimizer_class.__name__} "
                             f"does not support {unsupported}=True")
    hparams = {}
    for key in _FLOATS[kind]:
        if key in ("beta1", "beta2"):
            hparams[key] = float(defaults["betas"][0 if key == "beta1" else 1])
        else:
            hparams[key] = float(defaults[key])
    flags = {key: bool(defaults.get(key, False)) for key in _FLAGS[kind]}
    return kind, hparams, flags


def script_optimizer(optimizer_class, params: List[Tensor], *args, **kwargs) -> ScriptOptimizer:
    """A ScriptOptimizer over `params` that steps like
    `optimizer_class(params, *args, **kwargs)`."""
    config = script_config(optimizer_class, *args, **kwargs)
    if config is None:
        supported = ", ".join(sorted({c.__name__ for c in SCRIPT_OPTIMIZERS}))
        raise ValueError(f"torchrpc.optim: no TorchScript version of {optimizer_class!r} "
                         f"(there is one for {supported})")
    kind, hparams, flags = config
    return ScriptOptimizer(kind, list(params), hparams, flags)
