"""Decoder fuzz run: 10^6 mutated frames, zero crashes or hangs.

    python benchmarks/fuzz_frames.py                      # 10^6 frames, seed 1234 (make fuzz)
    python benchmarks/fuzz_frames.py --frames 20000       # smoke run
    python benchmarks/fuzz_frames.py --seed 7 --replay 4711   # re-decode one frame here

Frames are the valid frames of tests/test_fuzz.py (`sample_frames()`, which
use every section of the format) plus a corpus of messages of every type drawn
from `torchrpc.testing.messages()` by hypothesis with a fixed seed, then cut,
bit-flipped, replaced by junk or rewritten and resealed by the very mutators
the test suite uses (`test_fuzz.mutate`), and decoded with
`test_fuzz.check_decode` (a decoded message's tensors must lie inside their
storages and be readable). Frame i of seed S is a pure function of (S, i), so
any failure is reproduced with `--seed S --replay i`.

The frames are split into contiguous ranges over a few child processes, each
under an address-space limit (RLIMIT_AS, --memory-limit-mib) so a lying
header that makes the decoder allocate fails there. Before each decode a child
writes the frame index into shared memory; the parent watches those indexes,
so a child that dies (segfault, abort, MemoryError, ...) or stops making
progress for --hang-timeout seconds is reported with the seed and the frame
index it was decoding, and a fresh child carries on after that frame. Every
decode must succeed or raise torchrpc.DecodeError; anything else is a failure
and the run exits 1.
"""

import argparse
import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import random
import re
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Per-child slots in the shared array.
CURRENT, DECODED, REJECTED, FAILED, FINISHED = range(5)
SLOT = 5
STARTING = -1  # CURRENT before the child decoded anything

EXIT_SETUP = 4  # a child's exit code when it could not start (reported on the queue)


# ---------------------------------------------------------------------------
# Frames: shared by the parent (replay, corpus digest) and the children.


CORPUS_SEED = 20240611  # hypothesis seed of the drawn corpus (fixed: replays need the same frames)


def build_corpus(corpus_size: int):
    """The valid frames mutations start from: test_fuzz.sample_frames() and
    `corpus_size` messages of any type, drawn by hypothesis with a fixed seed
    (the same frames on every run with the same hypothesis version; the
    children report their corpus digest and the parent checks it)."""
    import test_fuzz
    from hypothesis import HealthCheck, given, seed, settings

    frames = list(test_fuzz.sample_frames())
    if corpus_size > 0:
        drawn = []

        @seed(CORPUS_SEED)
        @settings(database=None, max_examples=corpus_size, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=["generate"])
        @given(test_fuzz.FRAMES)
        def collect(frame):
            drawn.append(frame)

        collect()
        frames += drawn
    return frames


def corpus_digest(frames) -> str:
    h = hashlib.sha256()
    for f in frames:
        h.update(len(f).to_bytes(8, "little"))
        h.update(f)
    return h.hexdigest()[:16]


def frame_rng(seed: int, index: int) -> random.Random:
    return random.Random((seed << 40) + index)


def frame_at(corpus, seed: int, index: int) -> bytes:
    """Frame `index` of the run with `seed`: a pure function of both."""
    import test_fuzz

    rng = frame_rng(seed, index)
    return test_fuzz.mutate(rng.choice(corpus), rng)


# ---------------------------------------------------------------------------
# Child


def _vm_size() -> int:
    return int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read()).group(1)) << 10


def child_main(slot, start, end, seed, corpus_size, memory_limit, shared, results):
    """Decodes frames [start, end) of `seed`, writing each index to
    shared[slot*SLOT + CURRENT] before decoding it."""
    base = slot * SLOT
    try:
        import resource

        import torch

        torch.set_num_threads(1)
        import test_fuzz

        corpus = build_corpus(corpus_size)
        mapped = _vm_size()
        if memory_limit < mapped + (256 << 20):
            raise RuntimeError(
                f"--memory-limit-mib {memory_limit >> 20} leaves no room: the child has "
                f"{mapped >> 20} MiB mapped after importing torch")
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, hard))
        results.put(("ready", slot, corpus_digest(corpus)))
    except BaseException:
        results.put(("setup", slot, start, traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(EXIT_SETUP)

    check_decode = test_fuzz.check_decode  # DecodeError -> None; any other exception raises
    for i in range(start, end):
        shared[base + CURRENT] = i
        data = frame_at(corpus, seed, i)
        try:
            outcome = check_decode(data)
        except BaseException as e:
            # Not a DecodeError: a failure. Report it and go on, so that one
            # run counts every failing frame (crashes and hangs end the child).
            shared[base + FAILED] += 1
            results.put(("exception", slot, i, f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
            continue
        if outcome is None:
            shared[base + REJECTED] += 1
        else:
            shared[base + DECODED] += 1
        del outcome, data
    shared[base + CURRENT] = end
    shared[base + FINISHED] = 1
    results.close()
    results.join_thread()
    os._exit(0)


# ---------------------------------------------------------------------------
# Parent


class Range:
    """One child's share of the frames [first, end); after a crash or hang
    a new child carries on from the next frame (`start`)."""

    def __init__(self, slot, start, end):
        self.slot, self.first, self.start, self.end = slot, start, start, end
        self.proc = None
        self.gave_up = False
        self.last_current = STARTING
        self.last_change = 0.0


def describe_exit(code) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run(args) -> int:
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    n_children = max(1, min(args.workers, args.frames))
    shared = ctx.RawArray("q", SLOT * n_children)
    results = ctx.Queue()
    memory_limit = args.memory_limit_mib << 20

    per = -(-args.frames // n_children)
    ranges = [Range(s, s * per, min(args.frames, (s + 1) * per)) for s in range(n_children)]

    ends = []  # (kind, frame index or None, detail): children that crashed, hung or never started
    exceptions = []  # (frame index, "Type: message", traceback): decodes that raised
    groups = {}  # (type, where) -> count: exceptions by kind and raising line

    def spawn(r: Range, start: int):
        r.start = start
        shared[r.slot * SLOT + CURRENT] = STARTING
        shared[r.slot * SLOT + FINISHED] = 0
        r.proc = ctx.Process(
            target=child_main,
            args=(r.slot, start, r.end, args.seed, args.corpus_size, memory_limit, shared,
                  results),
            name=f"fuzz-{r.slot}", daemon=True)
        r.proc.start()
        r.last_current = STARTING
        r.last_change = time.monotonic()

    def group_of(message, tb):
        lines = [ln.strip() for ln in tb.strip().splitlines() if ln.strip().startswith("File ")]
        return message.split(":")[0], lines[-1] if lines else "?"

    def drain_queue(wait: float = 0.0):
        deadline = time.monotonic() + wait
        while True:
            try:
                msg = results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue_mod.Empty:
                return
            if msg[0] == "exception":
                _, _, index, message, tb = msg
                exceptions.append((index, message, tb))
                key = group_of(message, tb)
                groups[key] = groups.get(key, 0) + 1
                if groups[key] == 1:
                    bar.write(f"FAIL frame {index}: {message}\n"
                              f"     replay: {replay_command(args, index)}")
            elif msg[0] == "ready":
                _, slot, child_digest = msg
                if child_digest != digest:  # frames would not replay: stop
                    ends.append(("setup", None, f"child {slot} built another corpus "
                                 f"(digest {child_digest}, here {digest})"))
            elif msg[0] == "setup":
                _, slot, _, tb = msg
                ends.append(("setup", None, f"child {slot} could not start:\n{tb}"))

    def done_frames() -> int:
        total = 0
        for r in ranges:
            cur = shared[r.slot * SLOT + CURRENT]
            if r.proc is None:  # finished or given up: its whole range was visited
                total += r.end - r.first
            else:
                total += (r.start if cur == STARTING else cur) - r.first
        return total

    def child_ended(r: Range, kind: str, cur: int, detail: str):
        """Records a crash or hang at frame `cur` and restarts after it."""
        ends.append((kind, cur, detail))
        bar.write(f"FAIL frame {cur}: {kind} ({detail})\n"
                  f"     replay: {replay_command(args, cur)}")
        r.proc = None
        restarts = sum(1 for k, _, _ in ends if k in ("crash", "hang"))
        if cur + 1 < r.end and restarts <= args.max_restarts:
            spawn(r, cur + 1)
        elif cur + 1 < r.end:
            r.gave_up = True

    print(f"fuzz_frames: {args.frames:,} frames, seed {args.seed}, {n_children} children, "
          f"RLIMIT_AS {args.memory_limit_mib} MiB each, hang timeout {args.hang_timeout:g} s")
    sys.stdout.flush()
    t_start = time.monotonic()
    for r in ranges:
        spawn(r, r.start)
    corpus = build_corpus(args.corpus_size)  # while the children start: for the summary
    digest = corpus_digest(corpus)
    t_first = None
    bar = tqdm(total=args.frames, unit="frame", unit_scale=True, dynamic_ncols=True,
               smoothing=0.1, mininterval=0.5)
    aborted = False
    try:
        while any(r.proc is not None for r in ranges) and not aborted:
            time.sleep(0.1)
            drain_queue()
            if any(kind == "setup" for kind, _, _ in ends):
                aborted = True
                break
            now = time.monotonic()
            for r in ranges:
                if r.proc is None:
                    continue
                base = r.slot * SLOT
                cur = shared[base + CURRENT]
                if cur != r.last_current:
                    if r.last_current == STARTING and t_first is None:
                        t_first = now
                    r.last_current, r.last_change = cur, now
                if not r.proc.is_alive():
                    r.proc.join()
                    code = r.proc.exitcode
                    if code == 0 and shared[base + FINISHED]:
                        r.proc = None
                    elif cur == STARTING:
                        drain_queue(wait=1.0)
                        if code != EXIT_SETUP:
                            ends.append(("setup", None, f"child {r.slot} {describe_exit(code)} "
                                         "before decoding anything"))
                        r.proc, aborted = None, True
                    else:
                        drain_queue(wait=1.0)
                        child_ended(r, "crash", cur, f"child {describe_exit(code)}")
                    continue
                limit = args.startup_timeout if cur == STARTING else args.hang_timeout
                if now - r.last_change > limit:
                    r.proc.kill()
                    r.proc.join()
                    if cur == STARTING:
                        ends.append(("setup", None, f"child {r.slot} did not start within "
                                     f"{limit:g} s"))
                        r.proc, aborted = None, True
                    else:
                        child_ended(r, "hang", cur, f"no progress for {limit:g} s, killed")
            bar.update(done_frames() - bar.n)
    except KeyboardInterrupt:
        aborted = True
        ends.append(("interrupted", None, "KeyboardInterrupt"))
    finally:
        for r in ranges:
            if r.proc is not None and r.proc.is_alive():
                r.proc.kill()
                r.proc.join()
        if not aborted:
            bar.update(done_frames() - bar.n)
        bar.close()
    drain_queue(wait=0.5)
    t_end = time.monotonic()
    elapsed = t_end - t_start
    decode_time = t_end - (t_first or t_start)

    decoded = sum(shared[r.slot * SLOT + DECODED] for r in ranges)
    rejected = sum(shared[r.slot * SLOT + REJECTED] for r in ranges)
    raised = sum(shared[r.slot * SLOT + FAILED] for r in ranges)
    crashes = [e for e in ends if e[0] == "crash"]
    hangs = [e for e in ends if e[0] == "hang"]
    other = [e for e in ends if e[0] not in ("crash", "hang")]
    checked = decoded + rejected + raised
    failures = raised + len(ends)

    print()
    print("summary")
    print(f"  frames checked    {checked:,} of {args.frames:,}"
          + (f" (+{len(crashes) + len(hangs)} that ended a child)" if crashes or hangs else ""))
    print(f"  ok: decoded       {decoded:,}")
    print(f"  ok: DecodeError   {rejected:,}")
    print(f"  other exception   {raised:,}")
    print(f"  crashes           {len(crashes)}")
    print(f"  hangs             {len(hangs)}")
    print(f"  time              {elapsed:.1f} s, {decode_time:.1f} s of it decoding "
          f"(the rest: start-up)")
    print(f"  rate              {checked / max(decode_time, 1e-9):,.0f} frames/s "
          f"({n_children} children)")
    print(f"  seed {args.seed}; corpus: {len(corpus)} valid frames, digest {digest}")
    if groups:
        print("  exceptions other than DecodeError, by kind and raising line:")
        for (kind, where), count in sorted(groups.items(), key=lambda kv: -kv[1]):
            frames = sorted(i for i, m, tb in exceptions if group_of(m, tb) == (kind, where))
            print(f"    {count:>7,}  {kind} at {where}")
            print(f"             frames {', '.join(map(str, frames[:10]))}"
                  f"{' ...' if len(frames) > 10 else ''}; "
                  f"replay: {replay_command(args, frames[0])}")
        index, message, tb = min(exceptions)
        print(f"  first exception (frame {index}): {message}")
        print("    " + tb.rstrip().replace("\n", "\n    "))
    for kind, index, detail in crashes + hangs + other:
        where = f" at frame {index}" if index is not None else ""
        print(f"  {kind}{where}: {detail}")
        if index is not None:
            print(f"    replay: {replay_command(args, index)}")
    if any(r.gave_up for r in ranges):
        print(f"  gave up restarting children after {args.max_restarts} crashes/hangs")
    ok = failures == 0 and checked == args.frames and not aborted
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def replay_command(args, index) -> str:
    extra = f" --corpus-size {args.corpus_size}" if args.corpus_size != 100 else ""
    return f"python benchmarks/fuzz_frames.py --seed {args.seed}{extra} --replay {index}"


def replay(args) -> int:
    """Regenerates one frame and decodes it in this process (no limits)."""
    import test_fuzz

    corpus = build_corpus(args.corpus_size)
    data = frame_at(corpus, args.seed, args.replay)
    print(f"frame {args.replay} of seed {args.seed}: {len(data)} bytes")
    print(data.hex())
    if args.dump:
        with open(args.dump, "wb") as f:
            f.write(data)
        print(f"written to {args.dump}")
    sys.stdout.flush()
    outcome = test_fuzz.check_decode(data)
    print("DecodeError" if outcome is None else f"decoded: {type(outcome).__name__}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to decode")
    p.add_argument("--seed", type=int, default=1234, help="seed of the mutations")
    p.add_argument("--workers", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                   help="child processes (default: CPU count, 2..8)")
    p.add_argument("--memory-limit-mib", type=int, default=4096,
                   help="RLIMIT_AS of each child, MiB (torch alone maps ~650 MiB)")
    p.add_argument("--hang-timeout", type=float, default=30.0,
                   help="seconds without progress after which a child counts as hung")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds a child may take to import torch and build the corpus")
    p.add_argument("--corpus-size", type=int, default=100,
                   help="hypothesis-drawn valid frames added to test_fuzz.sample_frames()")
    p.add_argument("--max-restarts", type=int, default=20,
                   help="children restarted after crashes or hangs, at most")
    p.add_argument("--replay", type=int, metavar="INDEX",
                   help="decode frame INDEX of --seed in this process and print it")
    p.add_argument("--dump", metavar="PATH", help="with --replay: write the frame's bytes here")
    args = p.parse_args(argv)
    if args.frames < 0:
        p.error("--frames must be >= 0")
    if args.replay is not None:
        return replay(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
