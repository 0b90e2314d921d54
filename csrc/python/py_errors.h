#pragma once

namespace torchrpc {

// Installs a pybind11 translator turning RpcError into torchrpc/errors.py's
// classes (and a remote error into its own class where it can be found).
void registerErrorTranslator();

}  // namespace torchrpc
