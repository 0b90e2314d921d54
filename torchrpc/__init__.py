"""torchrpc: TorchScript-first RPC for PyTorch.

Workers call each other's registered TorchScript functions by qualified name
with schema-checked arguments; see README.md.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from torchrpc import _C  # noqa: F401
from torchrpc.api import *  # noqa: F401,F403
from torchrpc.api import __all__ as _api_all
from torchrpc.errors import *  # noqa: F401,F403
from torchrpc.errors import __all__ as _errors_all

__all__ = list(_api_all) + list(_errors_all)

# Submodules with torch.distributed's names (torchrpc.autograd for
# torch.distributed.autograd, ...). Imported here so that every worker can
# serve the TorchScript functions they define (optimizer steps) by name,
# whatever the program itself imported.
from torchrpc import autograd, functions, optim  # noqa: E402,F401
