"""Typed calls for TorchScript code.

`torch.ops.torchrpc.rpc_sync(to, name, args, timeout)` returns `Any`, which
TorchScript callers would have to refine by hand after every call. A stub is
generated from the remote function's schema instead: it takes `to` plus the
function's own parameters (so the TorchScript compiler checks every call
site) and returns the declared type.

    add_stub = torchrpc.stub(scripted_ops.add)

    @torch.jit.script
    def f(x: Tensor) -> Tensor:
        fut = add_stub.rpc_async("w1", x, x)   # Future[Any]
        y = add_stub.wait(fut)                 # Tensor
        return add_stub.rpc_sync("w1", y, x)   # Tensor

`stub.remote(to, ...)` returns a typed view of the RRef (`stub.RRef`), whose
`to_here()` and `local_value()` return the declared type: assigning it to a
variable of another type, or passing wrong arguments, fails when the caller
is compiled, not when it runs. `stub.RRef(rref)` types an RRef obtained
elsewhere (checked when its value is fetched).
"""

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import types

import torch

__all__ = ["stub", "Stub"]

_SIMPLE_DEFAULTS = (bool, int, float, str, type(None))


class Stub(types.ModuleType):
    """ScriptFunctions for one remote function (rpc_sync, rpc_async, wait,
    remote) and the TorchScript class of its typed RRefs (RRef).

    A module type on purpose: TorchScript resolves attributes of Python
    modules at compile time, and of no other plain Python object.
    """

    def __init__(self, module, qualified_name):
        super().__init__(f"torchrpc_stub.{qualified_name}")
        self.rpc_sync = torch.jit.script(module.rpc_sync)
        self.rpc_async = torch.jit.script(module.rpc_async)
        self.wait = torch.jit.script(module.wait)
        self.RRef = module.TypedRRef
        self.remote = torch.jit.script(module.remote)
        self.qualified_name = qualified_name


def _params(schema):
    params, names = [], []
    for arg in schema.arguments:
        text = f"{arg.name}: {arg.type.annotation_str}"
        if arg.has_default_value() and isinstance(arg.default_value, _SIMPLE_DEFAULTS):
            text += f" = {arg.default_value!r}"
        params.append(text)
        names.append(arg.name)
    return params, names


def stub(fn, qualified_name=None, schema=None) -> Stub:
    """A typed Stub for a TorchScript function (or a name plus its schema)."""
    if schema is None:
        schema = fn.schema
        qualified_name = fn.qualified_name
    returns = schema.returns
    if len(returns) == 0:
        ret = "None"
    elif len(returns) == 1:
        ret = returns[0].type.annotation_str
    else:
        ret = "Tuple[" + ", ".join(r.type.annotation_str for r in returns) + "]"
    params, names = _params(schema)
    # Defaulted parameters must follow the others, and so must timeout.
    sig = ", ".join(["to: str"] + params + ["timeout: float = -1.0"])
    args = ", ".join(names)
    refine = (
        "    return None\n"
        if ret == "None"
        else f"    assert torch.jit.isinstance(r, {ret})\n    return r\n"
    )
    indented = "".join("    " + line + "\n" for line in refine.splitlines())
    source = (
        f"def rpc_sync({sig}) -> {ret}:\n"
        f"    args: List[Any] = [{args}]\n"
        f"    r = torch.ops.torchrpc.rpc_sync(to, {qualified_name!r}, args, timeout)\n"
        + refine
        + f"def rpc_async({sig}) -> Future[Any]:\n"
        f"    args: List[Any] = [{args}]\n"
        f"    return torch.ops.torchrpc.rpc_async(to, {qualified_name!r}, args, timeout)\n"
        f"def wait(fut: Future[Any]) -> {ret}:\n"
        f"    r = fut.wait()\n" + refine
        + "@torch.jit.script\n"
        "class TypedRRef:\n"
        "    def __init__(self, rref: torch.classes.torchrpc.RRef):\n"
        "        self.rref = rref\n"
        f"    def to_here(self, timeout: float = -1.0) -> {ret}:\n"
        "        r = self.rref.to_here(timeout)\n" + indented
        + f"    def local_value(self) -> {ret}:\n"
        "        r = self.rref.local_value()\n" + indented
        + "    def owner_name(self) -> str:\n"
        "        return self.rref.owner_name()\n"
        "    def is_owner(self) -> bool:\n"
        "        return self.rref.is_owner()\n"
        f"def remote({sig}) -> TypedRRef:\n"
        f"    args: List[Any] = [{args}]\n"
        f"    return TypedRRef(torch.ops.torchrpc.remote(to, {qualified_name!r}, args, timeout))\n"
    )
    module = _load_source(qualified_name, source)
    return Stub(module, qualified_name)


def _load_source(qualified_name, source):
    """Imports generated source from a real file.

    torch.jit.CompilationUnit would compile it too, but functions compiled that
    way are not written out by torch.jit.save: a module calling them could not
    be loaded elsewhere. Functions scripted from an importable module are.
    """
    header = "from typing import Any, Dict, List, Optional, Tuple\nimport torch\n"
    header += "from torch import Tensor\nfrom torch.jit import Future\n\n"
    text = header + source
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    name = "torchrpc_stub_" + re.sub(r"\W", "_", qualified_name) + "_" + digest
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.join(tempfile.gettempdir(), f"torchrpc_stubs_{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".py")
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
