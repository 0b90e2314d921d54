"""Malformed frames raise torchrpc.DecodeError: never another exception, never
a crash, never an allocation the bytes actually present do not justify.

Frames come from valid messages (torchrpc.testing.messages) and are then cut,
bit-flipped, or rewritten and *resealed* (checksum recomputed) so that
corruption gets past the CRC into the payload and descriptor decoders, which
is where a peer that computes a valid checksum over garbage would hit.
The mutators take a random.Random so the same code drives hypothesis here
and a long seeded run in a memory-limited child process.
"""

import json
import os
import random
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchrpc
from torchrpc import messages
from torchrpc.testing import HEADER, join_frame, split_frame, tensors_in
from torchrpc.testing import messages as any_message

FUZZ = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FRAMES = any_message().map(lambda m: m.encode())
RANDOMS = st.randoms(use_true_random=False)

# Header field indexes in testing.HEADER.
TYPE, PAYLOAD, DESCRIPTORS, STORAGES, TENSORS, STORAGE_BYTES = 3, 5, 6, 7, 8, 9
INTERESTING = (0, 1, 2, 3, 7, 8, 15, 16, 64, 65, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def sample_frames():
    """A few valid frames that together use every section of the format:
    shared, strided and offset views, nested containers, wrapped messages."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    args = (base, base.t(), base[1:, ::2], base.view(torch.uint8),
            torch.tensor(3, dtype=torch.int16), [1, -(2**63)], {"k": (float("nan"), "ü", None)},
            [torch.ones(2, dtype=torch.bool)], 1.5j)
    call = messages.ScriptCall(qualified_name="m.f", args=args, is_async=False, id=5)
    pickled = torch.arange(16, dtype=torch.uint8)
    return [
        call.encode(),
        messages.ForwardAutogradReq(from_worker_id=1, context_id=2, message_id=3,
                                    device_map={"cpu": "cpu"}, wrapped=call).encode(),
        messages.PythonCall(pickled=pickled[::2], tensors=[base[0], pickled],
                            is_async=True).encode(),
        messages.BackwardAutogradReq(context_id=1, from_worker_id=3,
                                     grads={2: [base.detach().requires_grad_(), base[2:]]}).encode(),
        messages.RunWithProfilingResp(profiled_events="[]", profiling_key=(1, 2),
                                      wrapped=messages.ScriptRet(value=[{1: "a"}])).encode(),
        messages.Heartbeat(id=-1).encode(),
    ]


def checked_length(frame: bytes) -> int:
    """Bytes the CRC covers: header, payload and descriptors."""
    header = HEADER.unpack_from(frame)
    return HEADER.size + header[PAYLOAD] + header[DESCRIPTORS]


def _scramble(data: bytes, rng: random.Random) -> bytes:
    """Overwrites, inserts, deletes or duplicates a few bytes, or plants an interesting integer."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        op = rng.randrange(5)
        if op == 0 and at < len(data):
            data[at] = rng.randrange(256)
        elif op == 1:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del data[at:at + rng.randint(1, 8)]
        elif op == 3:
            value = rng.choice(INTERESTING) % 2**64
            width = rng.choice((1, 4, 8))
            data[at:at + width] = (value % 256**width).to_bytes(width, "little")
        else:
            data[at:at] = data[at:at + rng.randint(1, 16)]
    return bytes(data)


def truncate(frame, rng):
    return frame[:rng.randrange(len(frame))]


def flip_bits(frame, rng):
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def random_bytes(frame, rng):
    """Random bytes, sometimes behind a valid magic and version."""
    junk = rng.randbytes(rng.randint(0, 120))
    return (frame[:5] + junk) if rng.random() < 0.5 else junk


def resealed_payload(frame, rng):
    parts = split_frame(frame)
    payload = _scramble(parts.payload, rng)
    parts.header[PAYLOAD] = len(payload)
    return join_frame(parts._replace(payload=payload))


def resealed_descriptors(frame, rng):
    parts = split_frame(frame)
    descriptors = _scramble(parts.descriptors, rng)
    parts.header[DESCRIPTORS] = len(descriptors)
    return join_frame(parts._replace(descriptors=descriptors))


def resealed_header(frame, rng):
    """One header field set to an interesting value (type, a length or count)."""
    parts = split_frame(frame)
    field = rng.choice((TYPE, PAYLOAD, DESCRIPTORS, STORAGES, TENSORS, STORAGE_BYTES))
    width = 2 if field == TYPE else 8 if field == STORAGE_BYTES else 4
    parts.header[field] = rng.choice(INTERESTING + (rng.randrange(64),)) % 256**width
    return join_frame(parts)


MUTATORS = (truncate, flip_bits, random_bytes, resealed_payload, resealed_descriptors,
            resealed_header)


def mutate(frame: bytes, rng: random.Random) -> bytes:
    return rng.choice(MUTATORS)(frame, rng)




def check_decode(data: bytes):
    """Decodes `data`; DecodeError gives None, any
    other exception propagates. A decoded message's tensors must lie inside
    their storages."""
    try:
        decoded = messages.decode(data)
    except torchrpc.DecodeError:
        return None
    for t in tensors_in(decoded):
        if t.numel():
            last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            end = (last + 1) * t.element_size()
            assert end <= t.untyped_storage().nbytes(), "view past its storage"
            if t.numel() <= 1 << 16:  # stride-0 views may be huge; the bound check covers them
                t.detach().clone(memory_format=torch.contiguous_format)  # reads every element
    return decoded


# ---------------------------------------------------------------------------


def test_every_truncation_raises_decode_error():
    for frame in sample_frames():
        for n in range(len(frame)):
            with pytest.raises(torchrpc.DecodeError):
                messages.decode(frame[:n])
        with pytest.raises(torchrpc.DecodeError, match="after the frame"):
            messages.decode(frame + b"\0")


@FUZZ
@given(FRAMES, RANDOMS)
def test_random_truncation_raises_decode_error(frame, rng):
    with pytest.raises(torchrpc.DecodeError):
        messages.decode(truncate(frame, rng))


@FUZZ
@given(FRAMES, st.data())
def test_bit_flip_in_checked_bytes_raises_decode_error(frame, data):
    """One flipped bit in header, payload or descriptors is always caught
    (CRC-32C); one in tensor bytes is not checked and must still decode."""
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    flipped = bytearray(frame)
    flipped[bit // 8] ^= 1 << (bit % 8)
    if bit // 8 < checked_length(frame):
        with pytest.raises(torchrpc.DecodeError):
            messages.decode(bytes(flipped))
    else:
        assert check_decode(bytes(flipped)) is not None


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_raise_decode_error(data):
    with pytest.raises(torchrpc.DecodeError):
        messages.decode(data)


@pytest.mark.parametrize("mutator", [resealed_payload, resealed_descriptors, resealed_header,
                                     flip_bits, random_bytes], ids=lambda f: f.__name__)
def test_mutated_frames_decode_or_raise_decode_error(mutator):
    @FUZZ
    @given(FRAMES, RANDOMS)
    def check(frame, rng):
        check_decode(mutator(frame, rng))

    check()


@pytest.mark.parametrize("value_tag", range(12))
def test_resealed_value_tags(value_tag):
    """Every value tag (and one past the last) planted at every payload offset of a call."""
    frame = sample_frames()[0]
    parts = split_frame(frame)
    for at in range(4, len(parts.payload)):
        payload = parts.payload[:at] + bytes([value_tag]) + parts.payload[at + 1:]
        check_decode(join_frame(parts._replace(payload=payload)))


def test_invalid_utf8_raises_decode_error():
    parts = split_frame(messages.ScriptRet(value="a").encode())
    corrupt = join_frame(parts._replace(payload=parts.payload.replace(b"a", b"\xff")))
    with pytest.raises(torchrpc.DecodeError):
        messages.decode(corrupt)


def _with_float_descriptor(frame: bytes, sizes, strides) -> bytes:
    """`frame` (one storage, one tensor) with its tensor descriptor rewritten, resealed."""
    parts = split_frame(frame)
    float32 = 6  # c10::ScalarType::Float
    descriptors = parts.descriptors[:8] + struct.pack("<IBBBBQ", 0, float32, len(sizes), 0, 0, 0)
    descriptors += struct.pack(f"<{2 * len(sizes)}q", *sizes, *strides)
    parts.header[DESCRIPTORS] = len(descriptors)
    return join_frame(parts._replace(descriptors=descriptors))


def test_numel_overflow_raises_decode_error():
    frame = messages.ScriptRet(value=torch.zeros(1)).encode()
    with pytest.raises(torchrpc.DecodeError):
        messages.decode(_with_float_descriptor(frame, [2**62, 2**62], [0, 0]))


def test_header_checksum_layout():
    """The helpers reproduce frame.cpp's checksum, so resealed frames are valid."""
    for frame in sample_frames():
        assert join_frame(split_frame(frame)) == frame


# ---------------------------------------------------------------------------
# Memory: run in a child with an address-space limit, so that an allocation
# a lying header asks for fails loudly there instead of eating this machine.

_TESTS = os.path.dirname(os.path.abspath(__file__))
_CHILD_PRELUDE = """
import json, random, re, resource, sys
sys.path[:0] = [{tests!r}, {root!r}]
import torch, torchrpc
from torchrpc import messages
import test_fuzz

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10

# torch maps a lot of address space at import: limit relative to what is mapped now.
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + (512 << 20), hard))
"""


def run_child(body: str, stdin: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    root = os.path.dirname(_TESTS)
    code = _CHILD_PRELUDE.format(tests=_TESTS, root=root) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=root)


def test_many_corrupt_frames_in_a_memory_limited_child():
    """Thousands of seeded mutations: the child must exit 0, so no crash, no
    MemoryError and no exception other than DecodeError."""
    result = run_child("""
        rng = random.Random(1234)
        frames = test_fuzz.sample_frames()
        outcomes = {"decoded": 0, "rejected": 0}
        for i in range(3000):
            data = test_fuzz.mutate(rng.choice(frames), rng)
            outcome = test_fuzz.check_decode(data)
            outcomes["rejected" if outcome is None else "decoded"] += 1
        print(json.dumps(outcomes))
    """)
    assert result.returncode == 0, f"child exited {result.returncode}:\n{result.stderr[-3000:]}"
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes["rejected"] > 1000 and outcomes["decoded"] > 0, outcomes


def _claiming(fields: dict) -> bytes:
    """A resealed Heartbeat frame whose header claims `fields` ({index: value})
    but which holds nothing more than a Heartbeat, except 8 descriptor bytes
    (one 1 TiB storage size) when it claims 8 descriptor bytes."""
    parts = split_frame(messages.Heartbeat(id=1).encode())
    for index, value in fields.items():
        parts.header[index] = value
    descriptors = (1 << 40).to_bytes(8, "little") if fields.get(DESCRIPTORS) == 8 else b""
    return join_frame(parts._replace(descriptors=descriptors))


def _list_claiming_4g_items() -> bytes:
    """A ScriptRet whose List[int] payload claims 2**32 - 1 elements (has 1)."""
    parts = split_frame(messages.ScriptRet(value=[7]).encode())
    # u32 count 1, then kVInt (2) and the int 7: the list's length and first element.
    payload = parts.payload.replace(b"\x01\0\0\0\x02\x07", b"\xff\xff\xff\xff\x02\x07")
    return join_frame(parts._replace(payload=payload))


# Small frames that claim far more than they hold. Each must raise DecodeError
# and raise the decoding process's peak RSS by under 16 MiB.
_CLAIMS = {
    "payload": lambda: _claiming({PAYLOAD: (1 << 30) - 8}),
    "descriptors": lambda: _claiming({DESCRIPTORS: (1 << 30) - 8}),
    "tensors": lambda: _claiming({TENSORS: 1 << 20}),
    "storages": lambda: _claiming({TENSORS: 1 << 20, STORAGES: 1 << 20}),
    "storage_bytes": lambda: _claiming({STORAGES: 1, TENSORS: 1, DESCRIPTORS: 8,
                                        STORAGE_BYTES: 1 << 40}),
    "list_length": _list_claiming_4g_items,
}


@pytest.fixture(scope="module")
def claim_results():
    return lying_header_outcomes()


def lying_header_outcomes():
    """{claim: {"error": "Class: message" or None, "peak_growth": bytes}},
    decoded in one memory-limited child."""
    frames = {name: make().hex() for name, make in _CLAIMS.items()}
    result = run_child("""
        out = {}
        for name, frame in json.loads(sys.stdin.read()).items():
            open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM)
            before = status("VmHWM")
            try:
                messages.decode(bytes.fromhex(frame))
                error = None
            except Exception as e:
                error = type(e).__name__ + ": " + str(e)[:200]
            out[name] = {"error": error, "peak_growth": status("VmHWM") - before}
        print(json.dumps(out))
    """, stdin=json.dumps(frames))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])




@pytest.mark.parametrize("claim", [
    name for name in _CLAIMS])
def test_lying_header_raises_without_allocating(claim, claim_results):
    outcome = claim_results[claim]
    assert outcome["error"] and outcome["error"].startswith("DecodeError"), outcome
    assert outcome["peak_growth"] < 16 << 20, f"peak RSS grew {outcome['peak_growth'] >> 20} MiB"


def test_empty_view_past_an_empty_storage():
    result = run_child("""
        view = torch.empty(2, 0)[1:]
        decoded = messages.decode(messages.ScriptRet(value=view).encode()).value
        assert decoded.shape == view.shape
    """)
    assert result.returncode == 0, f"child exited {result.returncode}: {result.stderr[-1000:]}"
