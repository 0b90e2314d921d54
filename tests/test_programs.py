"""Training programs written for torch.distributed.rpc (tests/programs/), run
on torchrpc with only their imports changed: parameter server, pipeline,
RNN with a remote embedding table, batching parameter server
(async_execution), agent with remote observers.

Each program runs on fresh worker processes (tests/programs/launch.py) and
its rank-0 result is checked against a local computation of the same
training (the program's `reference()`, run in its own process with the same
one-thread setting).

The torchrpc runs need torchrpc.autograd, torchrpc.optim and
torchrpc.functions; they are skipped while torchrpc.autograd does not
exist. Set TORCHRPC_TEST_TORCH_PROGRAMS=1 to also run every program on
torch.distributed.rpc (checks the programs and references themselves).
"""

import importlib.util
import math
import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `tests.programs` is imported from the repository root
    sys.path.insert(0, _ROOT)

from tests.programs.launch import PROGRAMS, mismatches, run_local, run_program  # noqa: E402

HAVE_TORCHRPC_AUTOGRAD = importlib.util.find_spec("torchrpc.autograd") is not None
TIMEOUT = 180.0  # seconds per program run; most of it is importing torch on a loaded machine
RTOL, ATOL = 1e-4, 1e-5

BACKENDS = [
    pytest.param("torchrpc", marks=pytest.mark.skipif(
        not HAVE_TORCHRPC_AUTOGRAD,
        reason="torchrpc.autograd (distributed autograd) is not there yet")),
]
if os.environ.get("TORCHRPC_TEST_TORCH_PROGRAMS") == "1":
    BACKENDS.append(pytest.param("torch"))

_references = {}


def reference(program: str, backend: str):
    """program.reference(world_size), computed once per test session. It uses
    no RPC; `backend` only picks what the program's imports load (the tested
    one: torch.distributed.optim alone takes seconds to import)."""
    if program not in _references:
        _references[program] = run_local(program, "reference", (PROGRAMS[program],),
                                         backend=backend, timeout=TIMEOUT)
    return _references[program]


def run(program: str, backend: str):
    results = run_program(program, PROGRAMS[program], backend, timeout=TIMEOUT)
    assert all(r is None for r in results[1:]), "only rank 0 reports"
    return results[0]


def assert_matches(program: str, backend: str, got: dict, keys=None):
    want = reference(program, backend)
    if keys is not None:
        want = {k: want[k] for k in keys}
    bad = mismatches(got, want, rtol=RTOL, atol=ATOL)
    assert not bad, f"{program} differs from its local reference:\n" + "\n".join(bad)


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_server(backend):
    got = run("param_server", backend)
    # Lockstep phase: exactly the local training.
    assert_matches("param_server", backend, got, ["lockstep_losses", "lockstep_params"])
    # Concurrent phase: trainers ran at once; the order of their steps varies.
    assert got["concurrent_losses"].shape == (PROGRAMS["param_server"] - 1, 4)
    assert _finite([got["concurrent_losses"]] + got["final_params"])
    assert got["eval_after"] < got["eval_before"], (got["eval_before"], got["eval_after"])
    assert any(not torch.equal(a, b) for a, b in zip(got["final_params"], got["lockstep_params"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline(backend):
    got = run("pipeline", backend)
    assert_matches("pipeline", backend, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn(backend):
    got = run("rnn", backend)
    assert_matches("rnn", backend, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batching_ps(backend):
    """8 trainer calls in flight at a 2-thread server must not deadlock."""
    got = run("batching_ps", backend)
    assert got["updates"] == reference("batching_ps", backend)["updates"]
    assert_matches("batching_ps", backend, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rl_observers(backend):
    got = run("rl_observers", backend)
    assert_matches("rl_observers", backend, got)
    assert all(math.isfinite(v) for v in got["losses"].tolist())
