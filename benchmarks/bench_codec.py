"""Codec cost: encode and decode time through torchrpc.messages for a small
SCRIPT_CALL (a 4-element float tensor and an int) and for one 64 MiB tensor,
and how many times a large tensor's bytes are copied.

Why measure copies: for large tensors the codec should cost what moving the
bytes costs. The Python API (messages.encode/decode) is not the transport's
path: it must return bytes, so encode copies once where the transport does not:

  encode, Python: encode_message copies every chunk once, straight into the
                  bytes object it returns (copy 1).
  encode, C++ transport: encodeFrame borrows the tensor's memory and the
                  transport writev()s from it: 0 copies in user space.
  decode, Python and C++: readFrame allocates each storage once at its final
                  size and reads (memcpy / recv) straight into it: 1 copy.

The Python copies are measured below as (encode time) / (time of one plain
copy of 64 MiB into fresh memory); the C++ path is not reachable from Python
and is stated from the code (csrc/wire/frame.cpp), not measured.

Run: .venv/bin/python benchmarks/bench_codec.py [--quick]
Writes benchmarks/results/codec.json.
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import numpy
import torch

from torchrpc import messages

LARGE_BYTES = 64 << 20


def median_us(fn, iterations: int, warmup: int = 3) -> float:
    """Median wall time of fn() in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1e3


def bench_message(message, iterations: int) -> dict:
    frame = message.encode()
    return {
        "frame_bytes": len(frame),
        "encode_us": median_us(message.encode, iterations),
        "decode_us": median_us(lambda: messages.decode(frame), iterations),
    }


def copy_baselines(tensor: torch.Tensor, iterations: int) -> dict:
    """One copy of the tensor's bytes, into fresh memory (as encode and decode
    both copy into newly allocated buffers) and into warm memory (bandwidth)."""
    array = tensor.numpy()
    warm = bytearray(tensor.nbytes)
    warm_address = ctypes.addressof(ctypes.c_char.from_buffer(warm))
    return {
        "copy_fresh_us": median_us(lambda: bytes(array), iterations),  # malloc + memcpy
        "copy_warm_us": median_us(
            lambda: ctypes.memmove(warm_address, tensor.data_ptr(), tensor.nbytes), iterations),
    }


def decode_owns_its_storage(frame: bytes) -> dict:
    """The decoded tensor has its own storage (so decode copied once out of the
    frame) of exactly the tensor's size (nothing else was copied along)."""
    decoded = messages.decode(frame).args[0]
    start = numpy.frombuffer(frame, dtype=numpy.uint8).ctypes.data  # the bytes' own buffer
    data = decoded.untyped_storage().data_ptr()
    inside_frame = start <= data < start + len(frame)
    return {"decoded_storage_in_frame": inside_frame,
            "decoded_storage_bytes": decoded.untyped_storage().nbytes()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    options = parser.parse_args()
    small_iters, large_iters = (200, 3) if options.quick else (5000, 15)
    torch.set_num_threads(1)  # the codec copies on one thread; compare like with like

    small = messages.ScriptCall(qualified_name="bench.add", args=(torch.rand(4), 3), is_async=False)
    large_tensor = torch.rand(LARGE_BYTES // 4)
    large = messages.ScriptCall(qualified_name="bench.sum", args=(large_tensor,), is_async=False)

    results = {"small_script_call": bench_message(small, small_iters),
               "large_tensor_64MiB": bench_message(large, large_iters)}
    baseline = copy_baselines(large_tensor, large_iters)
    large_result = results["large_tensor_64MiB"]
    large_result.update(baseline)
    large_result["encode_copies_measured"] = large_result["encode_us"] / baseline["copy_fresh_us"]
    large_result["decode_copies_measured"] = large_result["decode_us"] / baseline["copy_fresh_us"]
    large_result["encode_GBps"] = LARGE_BYTES / large_result["encode_us"] / 1e3
    large_result["decode_GBps"] = LARGE_BYTES / large_result["decode_us"] / 1e3
    large_result.update(decode_owns_its_storage(large.encode()))
    results["copies_by_design"] = {
        "python_encode": 1, "cpp_transport_encode": 0,
        "python_decode": 1, "cpp_transport_decode": 1,
    }
    results["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__,
                          "platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "quick": options.quick}

    s, big = results["small_script_call"], large_result
    print(f"{'case':<28}{'encode':>14}{'decode':>14}{'frame':>14}")
    print(f"{'small SCRIPT_CALL':<28}{s['encode_us']:>11.1f} us{s['decode_us']:>11.1f} us"
          f"{s['frame_bytes']:>8} bytes")
    print(f"{'64 MiB tensor':<28}{big['encode_us'] / 1e3:>11.2f} ms"
          f"{big['decode_us'] / 1e3:>11.2f} ms{big['frame_bytes'] >> 20:>9} MiB")
    print(f"{'  as GB/s':<28}{big['encode_GBps']:>14.2f}{big['decode_GBps']:>14.2f}")
    print(f"{'one 64 MiB copy, fresh':<28}{baseline['copy_fresh_us'] / 1e3:>11.2f} ms")
    print(f"{'one 64 MiB copy, warm':<28}{baseline['copy_warm_us'] / 1e3:>11.2f} ms")
    print()
    print("copies of a large tensor's bytes     measured   by design")
    print(f"  Python encode (messages.encode) {big['encode_copies_measured']:>10.2f} {1:>10}")
    print(f"  Python decode (messages.decode) {big['decode_copies_measured']:>10.2f} {1:>10}")
    print(f"  C++ transport encode (writev)   {'n/a':>10} {0:>10}")
    print(f"  C++ transport decode (recv)     {'n/a':>10} {1:>10}")
    print(f"decoded tensor has its own {big['decoded_storage_bytes'] >> 20} MiB storage "
          f"(inside the frame's buffer: {big['decoded_storage_in_frame']})")

    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "codec.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
