"""The two RpcTest classes benchmarks/torch_suite.py runs, and the redirect
that makes the second one run on torchrpc.

`TensorPipeRpcTest` is torch's own: RpcTest mixed with
TensorPipeRpcAgentTestFixture and the SpawnHelper launcher, as torch's
test_tensorpipe_agent.py builds it (rpc_utils.generate_tests).

`TorchrpcRpcTest` is the same RpcTest with a fixture that hands init_rpc
torchrpc's BackendType and TensorPipeRpcBackendOptions. In each worker
process it is built only after `redirect()` has pointed
torch.distributed.rpc's public names at torchrpc's, so that everything the
test module binds at import (`from torch.distributed.rpc import RRef`,
`@rpc.functions.async_execution`, subclasses of rpc.RpcBackendOptions) and
every `rpc.<name>` it looks up at run time is torchrpc's: a torch program
with its import changed, which is what the README's migration section
promises.

The classes are made on first use, never at import: MultiProcessTestCase
spawns each worker with `cls._run` as its target, pickled by name, so the
worker imports this module and asks for the class by name (the module's
__getattr__), and must redirect before torch's test module is imported.
"""

import os

# torch.distributed.rpc's public names a torch program uses, pointed to
# torchrpc's in torchrpc's workers (the names in torch.distributed.rpc.api
# too, where torch's own code and tests reach them as rpc.api.<name>). A
# name torchrpc lacks fails redirect(), rather than fall back to torch's agent.
PUBLIC_NAMES = (
    "init_rpc",
    "shutdown",
    "rpc_sync",
    "rpc_async",
    "remote",
    "get_worker_info",
    "get_rpc_timeout",
    "WorkerInfo",
    "RRef",
    "BackendType",
    "RpcBackendOptions",
    "TensorPipeRpcBackendOptions",
)

TENSORPIPE, TORCHRPC = "TensorPipeRpcTest", "TorchrpcRpcTest"
_built = {}


def redirect():
    """Points torch.distributed.rpc's public names (and
    rpc.functions.async_execution) at torchrpc's, in this process, and opts
    it in to Python calls (torch runs them unasked)."""
    import torch.distributed.rpc as trpc
    import torch.distributed.rpc.api as tapi
    import torch.distributed.rpc.functions as tfunctions

    import torchrpc

    os.environ["TORCHRPC_PYTHON_UDF"] = "1"
    missing = [name for name in PUBLIC_NAMES if not hasattr(torchrpc, name)]
    if missing:
        # Not AttributeError: unpickling turns that into "Can't get attribute".
        raise RuntimeError(f"torchrpc lacks torch.distributed.rpc's {missing}")
    for name in PUBLIC_NAMES:
        value = getattr(torchrpc, name)
        setattr(trpc, name, value)
        if hasattr(tapi, name):
            setattr(tapi, name, value)
    tfunctions.async_execution = torchrpc.functions.async_execution


def _torchrpc_fixture():
    from torch.testing._internal.distributed.rpc.rpc_agent_test_fixture import (
        RpcAgentTestFixture,
    )

    import torchrpc

    class TorchrpcRpcAgentTestFixture(RpcAgentTestFixture):
        """torch's fixture interface, answered with torchrpc's types. The
        init method is torch's (RpcAgentTestFixture.init_method)."""

        @property
        def rpc_backend(self):
            return torchrpc.BackendType.TENSORPIPE

        @property
        def rpc_backend_options(self):
            return torchrpc.TensorPipeRpcBackendOptions(init_method=self.init_method)

        def get_shutdown_error_regex(self):
            return ".*"  # as TensorPipe's fixture: any error

        def get_timeout_error_regex(self):
            return "timed out"  # RpcTimeoutError's words

    return TorchrpcRpcAgentTestFixture


# Imported once by the forkserver, so that each worker starts with torch
# loaded: a spawned worker spends ~5 s of CPU importing torch and torch's test
# utilities, 4 workers per method. torch's RPC test module is not among them
# (see redirect()).
_PRELOAD = ["torch", "torch.distributed.rpc", "torch.testing._internal.common_distributed"]
# What a worker reads from the environment that the harness sets per method.
_PER_METHOD_ENV = ("MASTER_ADDR", "MASTER_PORT")


def _with_environ(environ, target, *args, **kwargs):
    """A worker's entry point: forkserver workers do not inherit the
    harness's environment, so the per-method part travels as an argument."""
    os.environ.update(environ)
    target(*args, **kwargs)


def _spawn_helper():
    """torch.testing._internal.distributed.rpc_utils.SpawnHelper, restated
    (importing rpc_utils imports every RPC suite torch has, in every worker),
    with workers started by a forkserver that has torch imported instead of
    spawned bare. With RPC_INIT_WITH_TCP=1 the parent picks
    MASTER_ADDR/MASTER_PORT once per method, so every worker meets there."""
    import multiprocessing

    from torch.testing._internal.common_distributed import MultiProcessTestCase
    from torch.testing._internal.common_utils import find_free_port

    class SpawnHelper(MultiProcessTestCase):
        def setUp(self):
            super().setUp()
            if os.environ.get("RPC_INIT_WITH_TCP") == "1":
                os.environ["MASTER_ADDR"] = "127.0.0.1"
                os.environ["MASTER_PORT"] = str(find_free_port())
            self._spawn_processes()

        def _spawn_processes(self):
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            environ = {k: os.environ[k] for k in _PER_METHOD_ENV if k in os.environ}

            def process(target, name, args, kwargs):
                return ctx.Process(target=_with_environ, name=name,
                                   args=(environ, target, *args), kwargs=kwargs)

            self._start_processes(process)

        def tearDown(self):
            if os.environ.get("RPC_INIT_WITH_TCP") == "1":
                del os.environ["MASTER_ADDR"]
                del os.environ["MASTER_PORT"]
            super().tearDown()

    return SpawnHelper


def _build(name, in_worker):
    if name == TORCHRPC and in_worker:
        redirect()  # before torch's test module is imported
    from torch.testing._internal.distributed.rpc.rpc_test import RpcTest
    from torch.testing._internal.distributed.rpc.tensorpipe_rpc_agent_test_fixture import (
        TensorPipeRpcAgentTestFixture,
    )

    fixture = TensorPipeRpcAgentTestFixture if name == TENSORPIPE else _torchrpc_fixture()
    cls = type(name, (RpcTest, fixture, _spawn_helper()), {})
    cls.__module__ = __name__
    return cls


def suite(name):
    """The class called `name` (TENSORPIPE or TORCHRPC), for the harness
    process: built without redirecting, since that process runs no test
    body itself and runs both backends."""
    if name not in _built:
        _built[name] = _build(name, in_worker=False)
    return _built[name]


def __getattr__(name):
    # How a worker gets its class: unpickling its target, `cls._run`, looks
    # the class up here by name. The harness process finds the class suite()
    # built (pickling checks that the name gives the same object back); a
    # worker has none yet, and builds it redirected.
    if name not in (TENSORPIPE, TORCHRPC):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        _built[name] = _build(name, in_worker=True)
    return _built[name]
