"""Every message type survives encode -> decode with its fields deep-equal,
its id, and the storage sharing among its tensors; plus checks of the
generators in torchrpc.testing that these tests rely on."""

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchrpc
from torchrpc import messages
from torchrpc.messages import MessageType
from torchrpc.testing import (
    DTYPES,
    MESSAGE_FIELD_STRATEGIES,
    arguments_for,
    assert_deep_equal,
    assert_messages_equal,
    assert_same_sharing,
    message_strategy,
    tensors,
    tensors_in,
    to_jit_type,
    values_of,
)

FAST = settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
# Types whose fields hold arbitrary values get more examples than fixed-shape control messages.
RICH = {MessageType.SCRIPT_CALL, MessageType.SCRIPT_RET, MessageType.SCRIPT_REMOTE_CALL,
        MessageType.SCRIPT_RREF_FETCH_RET, MessageType.FORWARD_AUTOGRAD_REQ,
        MessageType.RUN_WITH_PROFILING_RESP}


def roundtrip(message):
    return messages.decode(message.encode())


def test_every_message_type_has_a_strategy():
    missing = [t.name for t in MessageType if t.name not in MESSAGE_FIELD_STRATEGIES]
    stale = sorted(set(MESSAGE_FIELD_STRATEGIES) - {t.name for t in MessageType})
    assert not missing, f"message types without a strategy in torchrpc.testing: {missing}"
    assert not stale, f"strategies for message types that no longer exist: {stale}"
    for t in MessageType:
        message_strategy(t)  # raises KeyError for a type missing from the table


@pytest.mark.parametrize("message_type", list(MessageType), ids=lambda t: t.name)
def test_roundtrip(message_type):
    count = 40 if message_type in RICH else 10

    @settings(FAST, max_examples=count)
    @given(message_strategy(message_type))
    def check(message):
        decoded = roundtrip(message)
        assert decoded.TYPE == message_type
        assert_messages_equal(message, decoded)
        # Each decoded annotation names a type the field's declared type accepts.
        for name, kind in message.FIELDS.items():
            if kind != "Message":
                assert to_jit_type(decoded.types[name]).isSubtypeOf(to_jit_type(kind)), name

    check()


@FAST
@given(st.data())
def test_wrapped_messages_nest(data):
    """Wrapping types inside wrapping types (autograd under the profiler)."""
    inner = data.draw(message_strategy(MessageType.SCRIPT_CALL, wrapped=True))
    middle = data.draw(message_strategy(MessageType.FORWARD_AUTOGRAD_REQ, wrapped=True)
                       .map(lambda m: type(m)(**{**m.fields, "wrapped": inner})))
    outer = messages.RunWithProfilingReq(profiler_config="{}", profiling_key=(1, 2),
                                         wrapped=middle, id=9)
    decoded = roundtrip(outer)
    assert_messages_equal(outer, decoded)
    assert type(decoded.wrapped.wrapped) is messages.ScriptCall


# ---------------------------------------------------------------------------
# Type overrides and decoded annotations

_OVERRIDE_TYPES = [
    int, float, bool, str, complex, torch.Tensor, type(None), Optional[int],
    List[int], List[Optional[float]], List[List[int]], Tuple[int, str], Tuple[()],
    Dict[str, torch.Tensor], Dict[int, List[float]], Optional[List[torch.Tensor]],
]


@FAST
@given(st.data(), st.sampled_from(_OVERRIDE_TYPES))
def test_script_call_types_override(data, annotation):
    """With `types`, args convert with the given type, so empty and None-holding
    containers keep their element type; the decoded annotation is a subtype."""
    arg_type = to_jit_type(Tuple[annotation, annotation])
    args = data.draw(values_of(arg_type))
    call = messages.ScriptCall(qualified_name="f", args=args, is_async=False,
                               types={"args": arg_type})
    decoded = roundtrip(call)
    assert_deep_equal(call.args, decoded.args)
    assert_same_sharing(tensors_in(call.args), tensors_in(decoded.args))
    assert to_jit_type(decoded.types["args"]).isSubtypeOf(arg_type), decoded.types["args"]


def test_empty_containers_keep_their_element_type():
    arg_type = to_jit_type(Tuple[List[int], Dict[int, List[float]], List[Optional[torch.Tensor]]])
    call = messages.ScriptCall(qualified_name="f", args=([], {}, [None]), is_async=True,
                               types={"args": arg_type})
    decoded = roundtrip(call)
    expected = "Tuple[List[int], Dict[int, List[float]], List[Optional[Tensor]]]"
    assert decoded.types["args"] == expected


def test_string_types_override():
    call = messages.ScriptCall(qualified_name="f", args=(1, []), is_async=False,
                               types={"args": "Tuple[int, List[int]]"})
    assert roundtrip(call).types["args"] == "Tuple[int, List[int]]"


def test_non_tuple_args_raise_argument_error():
    with pytest.raises(torchrpc.ArgumentError):
        messages.ScriptCall(qualified_name="f", args=[1, 2], is_async=False).encode()


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, "\ud800", object()],
                         ids=["int-overflow", "int-underflow", "lone-surrogate", "object"])
def test_unconvertible_values_raise_argument_error(value):
    with pytest.raises(torchrpc.ArgumentError):
        messages.ScriptRet(value=(value,)).encode()


# ---------------------------------------------------------------------------
# The generators themselves


@torch.jit.script
def _scripted(x: torch.Tensor, n: int, scale: float, xs: List[int], named: Dict[str, torch.Tensor],
              maybe: Optional[float], pair: Tuple[bool, str], flag: bool = False) -> int:
    total = n % 7 + len(xs) + len(named) + len(pair[1]) + x.dim()
    if maybe is not None and flag:
        total += 1
    return total


@FAST
@given(arguments_for(_scripted))
def test_arguments_for_makes_acceptable_arguments(args):
    """arguments_for matches the schema: the scripted function accepts the
    arguments, and accepts them again after a typed round trip."""
    expected = _scripted(*args)
    schema_type = torch._C.TupleType([a.type for a in _scripted.schema.arguments])
    call = messages.ScriptCall(qualified_name=_scripted.qualified_name, args=args,
                               is_async=False, types={"args": schema_type})
    decoded = roundtrip(call)
    assert_deep_equal(args, decoded.args)
    assert _scripted(*decoded.args) == expected


@pytest.mark.parametrize("annotation", [int, "int", torch._C.IntType.get(), List[int], "List[int]",
                                        "int[]", Optional[int], type(None), complex, torch.Tensor,
                                        "Dict[str, Tensor]", "Tuple[int, str]"])
def test_values_of_accepts_annotations_strings_and_jit_types(annotation):
    jit_type = to_jit_type(annotation)
    call = messages.ScriptRet(value=None)

    @settings(FAST, max_examples=10)
    @given(values_of(annotation))
    def check(value):
        call.fields["value"] = value
        call.types["value"] = jit_type  # converts only if the value has this type
        assert to_jit_type(roundtrip(call).types["value"]).isSubtypeOf(jit_type)

    check()


_TENSOR_CASES = {
    **{f"dtype-{d}": (lambda d: lambda t: t.dtype == d)(d) for d in DTYPES},
    "0-dim": lambda t: t.dim() == 0,
    "empty": lambda t: t.numel() == 0 and t.dim() > 0,
    "transposed-or-strided": lambda t: not t.is_contiguous() and 0 not in t.stride(),
    "expanded": lambda t: 0 in t.stride() and t.numel() > 1,
    "offset": lambda t: t.storage_offset() > 0,
    "requires-grad": lambda t: t.requires_grad,
    "nan": lambda t: t.dtype.is_floating_point and bool(t.detach().isnan().any()),
    "inf": lambda t: t.dtype.is_floating_point and bool(t.detach().isinf().any()),
}
_ANY_CASES = {
    "list": lambda v: type(v) is list and len(v) > 0,
    "tuple": lambda v: type(v) is tuple and len(v) > 0,
    "dict": lambda v: type(v) is dict and len(v) > 0,
    "nested": lambda v: isinstance(v, (list, tuple, dict)) and any(
        isinstance(x, (list, tuple, dict)) for x in (v.values() if isinstance(v, dict) else v)),
    "tensor": lambda v: isinstance(v, torch.Tensor),
    "None": lambda v: v is None,
    "str": lambda v: type(v) is str,
}


def test_generators_cover_the_advertised_cases():
    """One derandomized pass records which cases the generators produced."""
    seen = set()

    @settings(max_examples=400, derandomize=True, database=None, deadline=None)
    @given(tensors(), tensors(), values_of("Any"))
    def collect(a, b, any_value):
        seen.update(name for name, case in _TENSOR_CASES.items() if case(a) or case(b))
        seen.update(name for name, case in _ANY_CASES.items() if case(any_value))
        if a.untyped_storage()._cdata == b.untyped_storage()._cdata:
            seen.add("shared-storage")

    collect()
    missing = (set(_TENSOR_CASES) | set(_ANY_CASES) | {"shared-storage"}) - seen
    assert not missing, f"never generated: {sorted(missing)}"


def test_assert_deep_equal_distinguishes():
    t = torch.tensor([1.0, float("nan")])
    assert_deep_equal([t, {"a": (1, float("nan"))}], [t.clone(), {"a": (1, float("nan"))}])
    for a, b in [([1], (1,)), (1, True), (0.0, -0.0), ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
                 (t, t.double()), (t, t.clone().requires_grad_()), (t, t[:1])]:
        with pytest.raises(AssertionError):
            assert_deep_equal(a, b)
    assert_deep_equal(0.0, -0.0, exact=False)
    base = torch.zeros(4)
    with pytest.raises(AssertionError, match="shared"):
        assert_same_sharing([base, base[1:]], [torch.zeros(4), torch.zeros(3)])
