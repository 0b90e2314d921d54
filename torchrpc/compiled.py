"""Compiled functions other than registered TorchScript functions.

- torch.export programs registered by name: served by running the program's
  module in Python (each call takes the GIL on the callee).
- AOTInductor packages (.pt2) registered by name: served by C++ alone
  (torch::inductor::AOTIModelPackageLoader), no GIL.
- Code shipped by value: ScriptFunctions, ScriptModules and ExportedPrograms
  passed to rpc_sync/rpc_async/remote travel as their archives (TorchScript
  archive, torch.export.save archive), named by the archive's SHA-256. The
  callee loads an archive once, with loaders that never unpickle arbitrary
  objects, and keeps it by that name (csrc/agent/code_cache.h).
"""

import contextlib
import io
import os
import threading
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

from torchrpc import _C
from torchrpc.errors import ArgumentError

# AOTInductor checks input dtypes and shapes only when this is set (its
# generated code reads it once, at the first run). Without the check a wrong
# shape sent by a caller would be read out of bounds, so workers serving
# packages turn it on.
_AOTI_CHECKS = "AOTI_RUNTIME_CHECK_INPUTS"


# Schema text cannot name a function "sha256:..."; shipped code's schemas
# carry this name until the callee renames them after their id.
_SHIPPED_NAME = "shipped"


class Shipped:
    """What a call of code shipped by value needs: the code's id
    ("sha256:<hex>"), its schema for binding arguments, and its archive as
    (id, kind, uint8 tensor) for the agent."""

    __slots__ = ("id", "schema", "code", "check", "__weakref__")

    def __init__(self, kind: str, archive: bytes, schema):
        tensor = torch.frombuffer(bytearray(archive), dtype=torch.uint8)
        self.id = _C.code_id(tensor)
        self.schema = schema
        self.code = (self.id, kind, tensor)
        self.check = None  # check(args): raises ArgumentError before sending


# Archives are made once per object, at its first call: a ScriptModule whose
# parameters change later is not shipped again (ship a new module instead).
_shipped: "weakref.WeakKeyDictionary[Any, Shipped]" = weakref.WeakKeyDictionary()
_shipped_lock = threading.Lock()


def shipped(obj) -> Shipped:
    """The Shipped form of a ScriptFunction, ScriptModule or ExportedProgram."""
    with _shipped_lock:
        found = _shipped.get(obj)
    if found is not None:
        return found
    if isinstance(obj, torch.jit.ScriptFunction):
        made = Shipped("script", obj.save_to_buffer(), obj.schema)
    elif isinstance(obj, torch.jit.ScriptModule):
        made = Shipped("script", obj.save_to_buffer(), _method_schema(obj, "forward"))
    elif isinstance(obj, torch.export.ExportedProgram):
        buf = io.BytesIO()
        torch.export.save(obj, buf)
        made = Shipped("export", buf.getvalue(), None)
        sig = ExportedSignature(obj)
        made.schema = torch._C.parse_schema(sig.schema(_SHIPPED_NAME))
        made.check = lambda args: sig.check(f"exported program {made.id[:19]}", args)
    else:
        raise TypeError(f"cannot ship {type(obj).__name__} by value: only ScriptFunctions, "
                        f"ScriptModules and ExportedPrograms")
    with _shipped_lock:
        return _shipped.setdefault(obj, made)


def _method_schema(module: torch.jit.ScriptModule, method: str):
    """A ScriptModule method's schema without `self`."""
    if not module._c._has_method(method):
        raise TypeError(f"cannot ship this ScriptModule: it has no {method}() method")
    text = str(module._c._get_method(method).schema)
    head, args = text.split("(", 1)
    comma = args.find(", ")
    paren = args.find(")")
    rest = args[comma + 2:] if 0 <= comma < paren else args[paren:]
    return torch._C.parse_schema(f"{head}({rest}")


# -- torch.export programs -----------------------------------------------------


def _leaf_type(value) -> str:
    """The schema type of an example value or FX meta value."""
    if isinstance(value, torch.Tensor):
        return "Tensor"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, torch.SymInt)):
        return "int"
    if isinstance(value, (float, torch.SymFloat)):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "NoneType"
    return "Any"


def structure_type(spec: pytree.TreeSpec, leaves: List[str]) -> Tuple[str, str]:
    """(type in schema syntax, output plan) of a pytree spec whose leaves
    have the types `leaves` (consumed in order). The plan is what
    aoti_callable rebuilds outputs from: L, T(...), S(...), D(k=...)."""
    if spec.is_leaf():
        if not leaves:
            raise TypeError("the output structure has more leaves than outputs")
        return leaves.pop(0), "L"
    kids = [structure_type(c, leaves) for c in spec.children_specs]
    types = [t for t, _ in kids]
    plans = [p for _, p in kids]
    if spec.type is dict:
        keys = list(spec.context)
        if not all(isinstance(k, str) and k.isidentifier() for k in keys):
            raise TypeError(f"output dicts need identifier string keys, got {keys}")
        value = types[0] if types and len(set(types)) == 1 else "Any"
        return f"Dict(str, {value})", "D(" + ",".join(f"{k}={p}" for k, p in zip(keys, plans)) + ")"
    if spec.type is list and types and len(set(types)) == 1 and types[0] == "Tensor":
        return "Tensor[]", "S(" + ",".join(plans) + ")"
    if spec.type in (tuple, list) or pytree.is_namedtuple_class(spec.type):
        return "(" + ", ".join(types) + ")", "T(" + ",".join(plans) + ")"
    raise TypeError(f"cannot return a {spec.type.__name__} over RPC: outputs are tensors, "
                    f"scalars, tuples, lists and dicts of them")


class ExportedSignature:
    """An ExportedProgram's inputs and outputs as a FunctionSchema, plus what
    checks and runs a call: positional then keyword inputs, flattened."""

    def __init__(self, ep: torch.export.ExportedProgram):
        args_spec, kwargs_spec = ep.call_spec.in_spec.children_specs
        for spec in args_spec.children_specs + kwargs_spec.children_specs:
            if not spec.is_leaf():
                raise TypeError("torchrpc serves exported programs whose inputs are tensors and "
                                "scalars, not nested structures")
        user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        self.num_positional = len(args_spec.children_specs)
        self.keywords = list(kwargs_spec.context)
        examples = _flat_examples(ep)
        names = [getattr(s.arg, "name", f"arg{i}") for i, s in enumerate(user)]
        count = self.num_positional + len(self.keywords)
        if len(names) != count:
            names = [f"arg{i}" for i in range(self.num_positional)]
        names = names[: self.num_positional] + self.keywords
        self.names = names
        placeholders = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        self.metas: List[Any] = []
        types = []
        for i, name in enumerate(names):
            meta = placeholders.get(user[i].arg.name) if i < len(user) and hasattr(user[i].arg, "name") else None
            if meta is None and examples is not None and i < len(examples):
                meta = examples[i]
            self.metas.append(meta)
            types.append(_leaf_type(meta))
        self.types = types
        outs = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
        out_nodes = list(ep.graph.nodes)[-1].args[0]
        leaf_types = []
        for i, _ in enumerate(outs):
            node = out_nodes[len(out_nodes) - len(outs) + i] if i < len(out_nodes) else None
            val = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
            leaf_types.append(_leaf_type(val))
        self.returns, _ = structure_type(ep.call_spec.out_spec, leaf_types)

    def schema(self, name: str) -> str:
        params = ", ".join(f"{t} {n}" for t, n in zip(self.types, self.names))
        return f"{name}({params}) -> {self.returns}"

    def check(self, name: str, values: Sequence[Any]):
        """Raises ArgumentError unless `values` fit the program's inputs:
        dtype, rank and every static dimension of each tensor."""
        for arg, meta, value in zip(self.names, self.metas, values):
            if not isinstance(meta, torch.Tensor):
                continue
            if not isinstance(value, torch.Tensor):
                raise ArgumentError(f"torchrpc: {name!r} expects argument {arg!r} to be a Tensor, "
                                    f"got {type(value).__name__}")
            want = [int(d) if isinstance(d, int) else None for d in meta.shape]
            ok = value.dtype == meta.dtype and value.dim() == len(want) and all(
                w is None or w == g for w, g in zip(want, value.shape))
            if not ok:
                shape = "(" + ", ".join("?" if w is None else str(w) for w in want) + ")"
                raise ArgumentError(
                    f"torchrpc: {name!r} expects argument {arg!r} as a {meta.dtype} tensor of shape "
                    f"{shape}, got {value.dtype} {tuple(value.shape)}")

    def split(self, values: Sequence[Any]):
        args = tuple(values[: self.num_positional])
        kwargs = dict(zip(self.keywords, values[self.num_positional:]))
        return args, kwargs


def _flat_examples(ep) -> Optional[list]:
    examples = getattr(ep, "example_inputs", None)
    if not examples:
        return None
    args, kwargs = examples
    return list(args) + [kwargs[k] for k in ep.call_spec.in_spec.children_specs[1].context]


def _plain(value):
    """Namedtuples as plain tuples, recursively (what TorchScript types hold)."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _direct_runner(ep: torch.export.ExportedProgram, sig: "ExportedSignature"):
    """Runs ep's graph with its parameters passed in and its outputs
    unflattened here: a quarter of the time of ep.module()(...), whose
    pytree handling and input-constraint hook dominate a small model. Only
    for programs where sig.check() covers every input constraint (static
    shapes) and whose graph only returns user outputs (no buffer mutations,
    tokens or custom objects); None for the others."""
    static = all(not isinstance(m, torch.Tensor) or all(isinstance(d, int) for d in m.shape)
                 for m in sig.metas)
    outputs_ok = all(s.kind.name == "USER_OUTPUT" for s in ep.graph_signature.output_specs)
    if not static or not outputs_ok:
        return None
    lifted = []  # per graph input: a lifted tensor, or None for the next user input
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            lifted.append(None)
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            source = ep.state_dict if spec.target in ep.state_dict else ep.constants
            if spec.target not in source:
                return None
            lifted.append(source[spec.target])
        else:
            return None
    graph, out_spec = ep.graph_module, ep.call_spec.out_spec

    def run(values):
        it = iter(values)
        flat = graph(*[next(it) if t is None else t for t in lifted])
        return pytree.tree_unflatten(list(flat), out_spec)

    return run


def exported_callable(ep: torch.export.ExportedProgram, name: str):
    """A _C.Callable named `name` that runs `ep` (under the GIL)."""
    sig = ExportedSignature(ep)
    direct = _direct_runner(ep, sig)
    module = ep.module() if direct is None else None

    def run(*values):
        sig.check(name, values)
        if direct is not None:
            return _plain(direct(values))
        args, kwargs = sig.split(values)
        return _plain(module(*args, **kwargs))

    return _C.python_callable(sig.schema(_SHIPPED_NAME if name.startswith("sha256:") else name), run)


# -- AOTInductor packages ------------------------------------------------------


def aoti_callable(path: str, name: str, model_name: str = "model", num_runners: int = 1):
    """A _C.Callable named `name` that runs the AOTInductor package at `path` in C++."""
    os.environ.setdefault(_AOTI_CHECKS, "1")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torchrpc: no AOTInductor package at {path!r}")
    package = _C.load_aoti_package(path, model_name, int(num_runners))
    in_text, out_text = package.call_spec()
    in_spec = pytree.treespec_loads(in_text)
    out_spec = pytree.treespec_loads(out_text)
    args_spec, kwargs_spec = in_spec.children_specs
    specs = args_spec.children_specs + kwargs_spec.children_specs
    if not all(s.is_leaf() for s in specs):
        raise TypeError("torchrpc serves AOTInductor packages whose inputs are tensors, "
                        "not nested structures")
    names = [f"arg{i}" for i in range(len(args_spec.children_specs))] + list(kwargs_spec.context)
    returns, plan = structure_type(out_spec, ["Tensor"] * out_spec.num_leaves)
    schema = f"{name}({', '.join('Tensor ' + n for n in names)}) -> {returns}"
    return package.callable(schema, plan)


# -- loading shipped code --------------------------------------------------------

_weights_only_lock = threading.Lock()


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load in the block is weights-only, even where a loader
    asks otherwise: torch.export.load falls back to a full unpickle when a
    weights-only load fails, which would run code from the archive."""
    with _weights_only_lock:
        before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if before is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_code(kind: str, archive: torch.Tensor, code_id: str):
    """The code loader agents call for archives C++ does not load itself."""
    if kind != "export":
        raise ValueError(f"unknown code kind {kind!r}")
    data = archive.numpy().tobytes()
    with _weights_only_loads():
        ep = torch.export.load(io.BytesIO(data))
    return exported_callable(ep, code_id)
