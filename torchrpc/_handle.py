"""The process-wide handle init_rpc sets up, and the helpers every module
that reaches the running worker needs. Apart from torchrpc.api so that the
modules api builds on (rref, python_udf) need not import it."""

import threading
from typing import Any, Dict, Optional

from torchrpc.errors import RpcShutdownError


class _State:
    """What init_rpc sets up: the one process-wide handle."""

    def __init__(self, agent, store, workers, options):
        self.agent = agent
        self.store = store
        self.workers = workers  # list of WorkerInfo, indexed by id
        self.by_name = {w.name: w for w in workers}
        self.python_udf = [False] * len(workers)
        self.accept_code = [False] * len(workers)
        # (worker id, qualified name) -> whether that worker has the function
        # by name; asked once, before a ScriptFunction is shipped by value.
        self.callee_has: Dict[tuple, bool] = {}
        self.options = options
        self.remote_schemas: Dict[tuple, Any] = {}
        self.self_info = None  # this worker's WorkerInfo
        self.servers = []  # metrics HTTP and inspect servers, closed by shutdown


_state: Optional[_State] = None  # set and cleared by torchrpc.api
_initializing = threading.Event()  # set while init_rpc runs
_initialized = threading.Event()  # set when init_rpc finished (or failed)


def _current() -> _State:
    if _state is None and _initializing.is_set():
        # A peer that finished rendezvous first may already be calling us.
        _initialized.wait(timeout=60)
    if _state is None:
        # Starts with torch's words: programs written for it match on them.
        raise RpcShutdownError(
            "RPC has not been initialized, or has been shut down: call torchrpc.init_rpc first"
        )
    return _state


def _timeout(timeout: Optional[float]) -> float:
    """Seconds for the agent: None or negative (torch's UNSET_RPC_TIMEOUT is
    -1) take RpcOptions.rpc_timeout; 0 waits forever."""
    if timeout is None or timeout < 0:
        return -1.0  # the agent's default
    return float(timeout)
