"""Shared fixtures.

`transport`: tests that take it run once per transport, as torchvision runs
its tests once per backend. Pass it on to `run_workers(..., transport=)` or
`World(..., transport=)`, which give every rank
RpcOptions(transports=[transport]) and (run_workers) check, through
debug_info()["connections"], that the workers really talked over it.
"""

import pytest

TRANSPORTS = ["tcp", "shm"]


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param
