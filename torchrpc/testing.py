"""Hypothesis strategies for TorchScript values and torchrpc messages, and the
equality checks a round-trip test needs.

Why this module exists: the codec's contract is "any value a TorchScript
function can take comes back equal, with the same dtypes, autograd flags and
storage sharing". Checking that by hand-picked examples misses the corners
(NaN payloads, -0.0, 64-bit extremes, strided views, empty containers whose
element type must survive), so tests draw values from the TorchScript type
itself: `values_of(fn.schema.arguments[0].type)`.

Sizes are kept small on purpose (tensors of at most 64 elements, containers
of at most 5 items, nesting at most 3 for `Any`) so that hundreds of examples
run in seconds; the codec's size limits are tested separately (tests/test_fuzz.py).

The frame helpers at the end (`split_frame`, `join_frame`, `crc32c`) let a
fuzzer corrupt a frame and still make its checksum valid, so corruption
reaches the payload and descriptor decoders instead of stopping at the CRC.
"""

import hashlib
import hmac
import math
import os
import socket
import struct
import typing
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from hypothesis import strategies as st
from torch._sources import fake_range
from torch.jit.annotations import ann_to_type

from torchrpc import messages as _messages

__all__ = [
    "DTYPES",
    "to_jit_type",
    "tensors",
    "values_of",
    "arguments_for",
    "messages",
    "message_strategy",
    "MESSAGE_FIELD_STRATEGIES",
    "tensors_in",
    "assert_deep_equal",
    "assert_same_sharing",
    "assert_messages_equal",
    "crc32c",
    "FrameParts",
    "split_frame",
    "join_frame",
    "HEADER",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The dtypes tensors are drawn from: every dtype a TorchScript user commonly sends.
DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
)

MAX_ELEMENTS = 64
MAX_ITEMS = 5
MAX_ANY_DEPTH = 3

# ---------------------------------------------------------------------------
# Types


# Names an annotation string may use. "NoneType" and "Device" are how
# annotation_str() spells those types, so decoded `.types` strings parse too.
_ANNOTATION_NAMES = {
    "List": List,
    "Tuple": Tuple,
    "Dict": Dict,
    "Optional": Optional,
    "Any": Any,
    "Tensor": torch.Tensor,
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "complex": complex,
    "None": None,
    "NoneType": type(None),
    "Device": torch.device,
}


def to_jit_type(annotation) -> torch._C.Type:
    """The TorchScript type of `annotation`.

    Accepts a JitType (torch._C.Type, returned as is), a Python annotation
    (`int`, `List[int]`, `torch.Tensor`, `type(None)`, ...) or a string: Python
    style ("Tuple[int, List[int]]", as annotation_str() writes it) or schema
    style ("int[]", "Tensor?").
    """
    if isinstance(annotation, torch._C.Type):
        return annotation
    if isinstance(annotation, str):
        try:
            # Strings come from tests and decoded `.types`; only typing names are in scope.
            annotation = eval(annotation, {"__builtins__": {}}, _ANNOTATION_NAMES)  # noqa: S307
        except Exception:
            schema = torch._C.parse_schema(f"f({annotation} x) -> ()")
            return schema.arguments[0].type
    jit_type = ann_to_type(annotation, fake_range())
    if jit_type is None:
        raise TypeError(f"{annotation!r} is not a TorchScript type")
    return jit_type


# ---------------------------------------------------------------------------
# Tensors


_SHAPES = st.one_of(
    st.lists(st.integers(0, 4), max_size=3),  # 0-dim, empty and small n-d shapes
    st.integers(0, MAX_ELEMENTS).map(lambda n: [n]),
)

_SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0)


@st.composite
def _base_tensors(draw, dtypes) -> torch.Tensor:
    """A fresh contiguous tensor with arbitrary bit patterns (NaN payloads,
    subnormals) plus explicitly planted NaN/inf/-0.0 for floating dtypes."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(_SHAPES)
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    size = n * dtype.itemsize
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if dtype is torch.bool:
        flat = (torch.frombuffer(raw, dtype=torch.uint8)[:n] & 1).bool()
    else:
        flat = torch.frombuffer(raw, dtype=dtype).clone()
    if dtype.is_floating_point or dtype.is_complex:
        for index, value in draw(
            st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(_SPECIAL_FLOATS)), max_size=3)
        ):
            flat[index] = value
    return flat.reshape(shape)


def _views(base: torch.Tensor):
    """The ways of looking at `base` that change strides, offset or dtype but
    keep its storage: what the codec must send once and rebuild as views."""
    out = [("same", base)]
    if base.dim() >= 2:
        out.append(("transposed", base.transpose(0, 1)))
    if base.dim() >= 1:
        out.append(("strided", base[::2]))
        if base.shape[0] >= 1:
            out.append(("offset", base[1:]))
        if base.is_contiguous() and base.dtype.itemsize > 1:
            out.append(("bytes", base.view(torch.uint8)))
    out.append(("expanded", base.unsqueeze(0).expand(2, *base.shape)))  # stride 0
    return out


@st.composite
def _view_of(draw, base_strategy) -> torch.Tensor:
    base = draw(base_strategy)
    _, view = draw(st.sampled_from(_views(base)))
    view = view.detach()
    if (view.dtype.is_floating_point or view.dtype.is_complex) and draw(st.booleans()):
        view.requires_grad_(True)
    return view


def tensors(dtypes=DTYPES, share: bool = True) -> st.SearchStrategy:
    """Small tensors of `dtypes`: 0-dim, empty, non-contiguous (transposed,
    strided, offset, expanded), reinterpreted as bytes, and requires_grad for
    floating and complex dtypes.

    With `share`, some tensors drawn in the same example are views of one
    shared base, so values hold tensors that share a storage.
    """
    dtypes = tuple(dtypes)
    fresh = _base_tensors(dtypes)
    if not share:
        return _view_of(fresh)
    shared = st.shared(fresh, key=f"torchrpc.testing.shared_base{dtypes}")
    return _view_of(st.one_of(fresh, shared))


@st.composite
def _pickled_bytes(draw) -> torch.Tensor:
    """What PythonCall-like messages carry as `pickled`: a 1-D uint8 tensor,
    possibly a strided or offset view."""
    flat = draw(_base_tensors((torch.uint8,))).reshape(-1)
    return draw(st.sampled_from((flat, flat[::2], flat[1:])))


# ---------------------------------------------------------------------------
# Values

_INTS = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from((INT64_MIN, INT64_MAX, 0, -1, 1, 2**31, -(2**31) - 1)),
)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_COMPLEX = st.complex_numbers(allow_nan=True, allow_infinity=True)
_STRINGS = st.text(max_size=12)  # any code point but surrogates, which UTF-8 cannot carry
_DEVICES = st.sampled_from((torch.device("cpu"), torch.device("cuda", 0), torch.device("meta")))

_INT, _FLOAT, _BOOL, _STR = (torch._C.IntType.get(), torch._C.FloatType.get(),
                             torch._C.BoolType.get(), torch._C.StringType.get())
_TENSOR, _COMPLEX_T, _NONE = (torch._C.TensorType.get(), torch._C.ComplexType.get(),
                              torch._C.NoneType.get())


def _dicts(dict_type, min_size: int) -> st.SearchStrategy:
    key_type = dict_type.getKeyType()
    if key_type.kind() == "FloatType":
        keys = st.floats(allow_nan=False)  # NaN keys never compare equal, so never dedupe
    else:
        keys = values_of(key_type)
    return st.dictionaries(keys, values_of(dict_type.getValueType()), min_size=min_size,
                           max_size=MAX_ITEMS)


def _inferable_types(depth: int) -> st.SearchStrategy:
    """TorchScript types whose values torch can infer back from the Python
    object alone, which is how an `Any` field is converted: so no empty or
    mixed lists and dicts, and None only where nothing must be unified with it."""
    leaves = st.sampled_from((_INT, _FLOAT, _BOOL, _STR, _TENSOR, _COMPLEX_T))
    if depth == 0:
        return st.one_of(leaves, st.just(_NONE))
    inner = _inferable_types(depth - 1)
    return st.one_of(
        leaves,
        st.just(_NONE),
        leaves.map(torch._C.ListType),  # list elements: no None (inference would unify)
        st.lists(inner, max_size=3).map(torch._C.TupleType),
        st.tuples(st.sampled_from((_STR, _INT)), leaves).map(lambda kv: torch._C.DictType(*kv)),
    )


def _inferable_values(jit_type) -> st.SearchStrategy:
    """Like values_of, but containers are non-empty (type inference needs an element)."""
    kind = jit_type.kind()
    if kind == "ListType":
        return st.lists(values_of(jit_type.getElementType()), min_size=1, max_size=MAX_ITEMS)
    if kind == "TupleType":
        return st.tuples(*[_inferable_values(t) for t in jit_type.elements()])
    if kind == "DictType":
        return _dicts(jit_type, min_size=1)
    return values_of(jit_type)


_ANY_VALUES = _inferable_types(MAX_ANY_DEPTH - 1).flatmap(_inferable_values)


def values_of(annotation) -> st.SearchStrategy:
    """Values of a TorchScript type (see to_jit_type for what `annotation` may be).

    `Any` draws a mix of scalars, tensors and containers up to MAX_ANY_DEPTH
    deep, each one a value torch can infer a type for.
    """
    jit_type = to_jit_type(annotation)
    kind = jit_type.kind()
    simple = {
        "IntType": _INTS,
        "FloatType": _FLOATS,
        "ComplexType": _COMPLEX,
        "BoolType": st.booleans(),
        "StringType": _STRINGS,
        "NoneType": st.none(),
        "TensorType": tensors(),
        "DeviceObjType": _DEVICES,
        "NumberType": st.one_of(_INTS, _FLOATS, _COMPLEX),
        "AnyType": _ANY_VALUES,
    }
    if kind in simple:
        return simple[kind]
    if kind == "ListType":
        return st.lists(values_of(jit_type.getElementType()), max_size=MAX_ITEMS)
    if kind == "TupleType":
        return st.tuples(*[values_of(t) for t in jit_type.elements()])
    if kind == "DictType":
        return _dicts(jit_type, min_size=0)
    if kind == "OptionalType":
        return st.one_of(st.none(), values_of(jit_type.getElementType()))
    raise NotImplementedError(f"no strategy for TorchScript type {jit_type.annotation_str}")


def arguments_for(fn) -> st.SearchStrategy:
    """Argument tuples for a torch.jit.ScriptFunction, one value per schema
    argument in order (keyword-only arguments included, positionally)."""
    return st.tuples(*[values_of(arg.type) for arg in fn.schema.arguments])


# ---------------------------------------------------------------------------
# Messages


def _call_args() -> st.SearchStrategy:
    """ScriptCall.args: a tuple of arbitrary values."""
    return st.lists(_ANY_VALUES, max_size=4).map(tuple)


_PICKLED = {"pickled": _pickled_bytes}
_CALL = {"args": _call_args}
_WRAPS = {"wrapped": lambda: st.deferred(lambda: messages(wrapped=True))}
# WITH_CODE: an archive's bytes (any: its id is not checked by the codec)
# around a call.
_WITH_CODE = {
    "archive": lambda: st.binary(max_size=256).map(
        lambda b: torch.tensor(list(b), dtype=torch.uint8)),
    "wrapped": lambda: st.one_of(message_strategy("SCRIPT_CALL", True),
                                 message_strategy("SCRIPT_REMOTE_CALL", True)),
}

# How to generate each message type's fields where values_of(declared type)
# is not enough. Every type is listed, even with nothing to override, so a
# type added to the C++ catalog fails test_every_message_type_has_a_strategy
# until someone decides how to generate it.
MESSAGE_FIELD_STRATEGIES: Dict[str, Dict[str, typing.Callable[[], st.SearchStrategy]]] = {
    "SCRIPT_CALL": _CALL,
    "SCRIPT_RET": {},
    "PYTHON_CALL": _PICKLED,
    "PYTHON_RET": _PICKLED,
    "SCRIPT_REMOTE_CALL": _CALL,
    "PYTHON_REMOTE_CALL": _PICKLED,
    "REMOTE_RET": {},
    "SCRIPT_RREF_FETCH_CALL": {},
    "PYTHON_RREF_FETCH_CALL": {},
    "SCRIPT_RREF_FETCH_RET": {},
    "PYTHON_RREF_FETCH_RET": _PICKLED,
    "RREF_USER_DELETE": {},
    "RREF_FORK_REQUEST": {},
    "RREF_CHILD_ACCEPT": {},
    "RREF_ACK": {},
    "FORWARD_AUTOGRAD_REQ": _WRAPS,
    "FORWARD_AUTOGRAD_RESP": _WRAPS,
    "BACKWARD_AUTOGRAD_REQ": {},
    "BACKWARD_AUTOGRAD_RESP": {},
    "CLEANUP_AUTOGRAD_CONTEXT_REQ": {},
    "CLEANUP_AUTOGRAD_CONTEXT_RESP": {},
    "RUN_WITH_PROFILING_REQ": _WRAPS,
    "RUN_WITH_PROFILING_RESP": _WRAPS,
    "RREF_BACKWARD_REQ": {},
    "RREF_BACKWARD_RESP": {},
    "EXCEPTION": {},
    "HANDSHAKE": {},
    "HEARTBEAT": {},
    "CANCEL": {},
    "SCHEMA_QUERY": {},
    "SCHEMA_RET": {},
    "SHUTDOWN_NOTICE": {},
    "CANCEL_RET": {},
    "WITH_CODE": _WITH_CODE,
}


def message_strategy(message_type, wrapped: bool = False) -> st.SearchStrategy:
    """Valid instances of one message type with arbitrary field values.

    A wrapped message (inside ForwardAutogradReq etc.) has id 0, since only
    the outer message's id travels.
    """
    message_type = _messages.MessageType[message_type] if isinstance(message_type, str) \
        else _messages.MessageType(message_type)
    overrides = MESSAGE_FIELD_STRATEGIES[message_type.name]  # KeyError: add the new type above
    cls = _messages.MESSAGE_CLASSES[message_type]
    fields = {
        name: overrides[name]() if name in overrides else values_of(kind)
        for name, kind in cls.FIELDS.items()
    }
    ids = st.just(0) if wrapped else _INTS
    return st.builds(lambda id, f: cls(id=id, **f), ids, st.fixed_dictionaries(fields))


def messages(wrapped: bool = False) -> st.SearchStrategy:
    """A message of any type (wrapping types nest, the nesting shrinking away
    as hypothesis favours the earlier, non-wrapping types)."""
    return st.one_of([message_strategy(t, wrapped) for t in _messages.MessageType])


# ---------------------------------------------------------------------------
# Equality


def tensors_in(value) -> List[torch.Tensor]:
    """Every tensor in `value` (a message, or nested containers), in a fixed
    traversal order, so two equal structures list matching tensors."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, _messages.Message):
        return [t for name in value.FIELDS for t in tensors_in(value.fields[name])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for kv in value.items() for t in tensors_in(kv)]
    return []


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The element bytes of `t` in logical order (a fresh dense copy, because
    contiguous() keeps odd strides on size-1 dims and view(uint8) rejects them)."""
    dense = torch.empty(t.shape, dtype=t.dtype)
    dense.copy_(t)
    return dense.view(-1).view(torch.uint8)


def _assert_tensor_equal(a: torch.Tensor, b: torch.Tensor, path: str, exact: bool):
    assert isinstance(b, torch.Tensor), f"{path}: Tensor vs {type(b).__name__}"
    assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert a.requires_grad == b.requires_grad, (
        f"{path}: requires_grad {a.requires_grad} vs {b.requires_grad}")
    assert a.device == b.device, f"{path}: device {a.device} vs {b.device}"
    a, b = a.detach(), b.detach()
    if exact:
        # Bit for bit: NaN payloads and -0.0 included; strides don't matter.
        if a.numel() == 0:
            return
        a_bits, b_bits = (_bytes_of(t) for t in (a, b))
        if torch.equal(a_bits, b_bits):
            return
    elif a.dtype.is_floating_point or a.dtype.is_complex:
        try:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            return
        except AssertionError:
            pass
    elif torch.equal(a, b):
        return
    raise AssertionError(f"{path}: tensor values differ:\n{a}\nvs\n{b}")


def _assert_float_equal(a: float, b, path: str, exact: bool):
    assert type(b) is float, f"{path}: float vs {type(b).__name__}"
    if math.isnan(a) and math.isnan(b):
        return
    same = a == b and (not exact or math.copysign(1, a) == math.copysign(1, b))
    assert same, f"{path}: {a!r} vs {b!r}"


def assert_deep_equal(a, b, path: str = "value", exact: bool = True):
    """Asserts `b` equals `a` the way a round trip must preserve it.

    Tensors: same dtype, shape, device, requires_grad and values (strides may
    differ). Containers: same Python type (list is not tuple), same length,
    dict keys in the same order. Floats: NaN equals NaN. With `exact` (the
    default), tensors compare bit for bit and -0.0 differs from 0.0, which
    is right for a codec that copies bytes; exact=False compares values.
    """
    if isinstance(a, torch.Tensor):
        _assert_tensor_equal(a, b, path, exact)
    elif isinstance(a, _messages.Message):
        _assert_fields_equal(a, b, path, exact)
    elif type(a) is float:
        _assert_float_equal(a, b, path, exact)
    elif type(a) is complex:
        assert type(b) is complex, f"{path}: complex vs {type(b).__name__}"
        _assert_float_equal(a.real, b.real, path + ".real", exact)
        _assert_float_equal(a.imag, b.imag, path + ".imag", exact)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_deep_equal(x, y, f"{path}[{i}]", exact)
    elif isinstance(a, dict):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: {len(a)} keys vs {len(b)}"
        for i, ((ka, va), (kb, vb)) in enumerate(zip(a.items(), b.items())):
            assert_deep_equal(ka, kb, f"{path}.keys()[{i}]", exact)
            assert_deep_equal(va, vb, f"{path}[{ka!r}]", exact)
    else:
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: unlike data_ptr(), distinct for empty storages.
    return t.untyped_storage()._cdata


def assert_same_sharing(original_tensors, decoded_tensors):
    """Tensors i and j share a storage after decoding exactly when they did before."""
    assert len(original_tensors) == len(decoded_tensors), "different tensor counts"
    before = [_storage_key(t) for t in original_tensors]
    after = [_storage_key(t) for t in decoded_tensors]
    for i in range(len(before)):
        for j in range(i + 1, len(before)):
            shared, now = before[i] == before[j], after[i] == after[j]
            assert shared == now, (
                f"tensors {i} and {j} {'shared' if shared else 'did not share'} a storage "
                f"before the round trip and {'do' if now else 'do not'} after"
            )


def _assert_fields_equal(a, b, path: str, exact: bool):
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    assert a.id == b.id, f"{path}: id {a.id} vs {b.id}"
    for name in a.FIELDS:
        assert_deep_equal(a.fields[name], b.fields[name], f"{path}.{name}", exact)


def assert_messages_equal(a, b):
    """Same class, id and fields (deep, see assert_deep_equal; wrapped messages
    too), and the same storage sharing among all the tensors of the message,
    wrapped ones included, since they all travel in one frame."""
    _assert_fields_equal(a, b, type(a).__name__, exact=True)
    assert_same_sharing(tensors_in(a), tensors_in(b))


# ---------------------------------------------------------------------------
# Frames (layout: csrc/wire/frame.cpp)

# magic, version, flags, type, id, payload bytes, descriptor bytes, storage
# count, tensor count, storage bytes, checksum, reserved: 48 bytes.
HEADER = struct.Struct("<IBBHqIIIIQII")
_CHECKSUM_INDEX = 10


class FrameParts(NamedTuple):
    """A frame cut at its section boundaries (as its header declares them)."""

    header: list  # HEADER's fields, in order
    payload: bytes
    descriptors: bytes
    storage: bytes  # tensor bytes, all storages back to back


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), continuing from `crc`, as frame.cpp computes it."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def split_frame(frame: bytes) -> FrameParts:
    """Cuts a well-formed frame into header fields and sections."""
    header = list(HEADER.unpack_from(frame))
    payload_end = HEADER.size + header[5]
    descriptors_end = payload_end + header[6]
    return FrameParts(header, frame[HEADER.size:payload_end], frame[payload_end:descriptors_end],
                      frame[descriptors_end:])


def join_frame(parts: FrameParts, reseal: bool = True) -> bytes:
    """Puts a frame back together; with `reseal`, the checksum is recomputed
    over the given header, payload and descriptors, so it is valid whatever
    they hold (the section lengths are taken from the header as given)."""
    header = list(parts.header)
    if reseal:
        header[_CHECKSUM_INDEX] = 0
        crc = crc32c(HEADER.pack(*header))
        crc = crc32c(parts.payload, crc)
        header[_CHECKSUM_INDEX] = crc32c(parts.descriptors, crc)
    return HEADER.pack(*header) + parts.payload + parts.descriptors + parts.storage


# --- Raw clients -----------------------------------------------------------

_HS_MAGIC = 0x53485254
_HS_VERSION = 1


def _handshake_mac(secret: bytes, job_id: str, label: bytes, dialer: int, listener: int,
                   dialer_nonce: bytes, listener_nonce: bytes) -> bytes:
    job = job_id.encode()
    msg = (label + b"\0" + struct.pack("<I", len(job)) + job + struct.pack("<qq", dialer, listener)
           + dialer_nonce + listener_nonce)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def tcp_endpoint(address: str):
    """(host, port) of the TCP transport among a worker's published
    addresses ("tcp://127.0.0.1:40123,shm://...")."""
    for a in address.split(","):
        if a.startswith("tcp://"):
            host, port = a[len("tcp://"):].rsplit(":", 1)
            return host.strip("[]"), int(port)
    raise ValueError(f"torchrpc: {address!r} offers no TCP transport")


def authenticated_socket(address: str, as_worker: int, listener: int, secret: bytes, job_id: str,
                         timeout: float = 10.0) -> socket.socket:
    """A raw socket to a worker's TCP transport that has passed the handshake
    (csrc/agent/handshake.h) as worker `as_worker`: for tests that play a
    misbehaving *member*. Raises ConnectionError if the worker refuses."""
    s = socket.create_connection(tcp_endpoint(address), timeout=timeout)
    nonce = os.urandom(32)
    s.sendall(struct.pack("<IHHqq", _HS_MAGIC, _HS_VERSION, 0, as_worker, listener) + nonce)
    challenge = b""
    while len(challenge) < 80:
        chunk = s.recv(80 - len(challenge))
        if not chunk:
            s.close()
            raise ConnectionError("the worker closed the connection during the handshake")
        challenge += chunk
    magic, _, status, _ = struct.unpack_from("<IHHq", challenge)
    if magic != _HS_MAGIC or status != 0:
        s.close()
        raise ConnectionError(f"handshake refused (status {status})")
    their_nonce, their_mac = challenge[16:48], challenge[48:80]
    expected = _handshake_mac(secret, job_id, b"torchrpc handshake v1 listener", as_worker, listener,
                              nonce, their_nonce)
    if not hmac.compare_digest(expected, their_mac):
        s.close()
        raise ConnectionError("the worker does not hold this secret")
    s.sendall(_handshake_mac(secret, job_id, b"torchrpc handshake v1 dialer", as_worker, listener,
                             nonce, their_nonce))
    return s


def read_frame(sock: socket.socket):
    """Reads the next frame other than a heartbeat from a raw socket (the
    48-byte header, then the sizes it gives) and decodes it."""

    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the worker closed the connection")
            buf += chunk
        return buf

    while True:
        header = exact(48)
        payload, descriptors, _, _, storage = struct.unpack_from("<IIIIQ", header, 16)
        frame = _messages.decode(header + exact(payload + descriptors + storage))
        if frame.TYPE != _messages.MessageType.HEARTBEAT:  # liveness, never an answer
            return frame
