"""torchrpc: TorchScript-first RPC for PyTorch."""

import torch  # noqa: F401  (loads libtorch before the extension)

from torchrpc import _C  # noqa: F401
from torchrpc.errors import *  # noqa: F401,F403
from torchrpc.errors import __all__ as _errors_all

__all__ = list(_errors_all)
