#include <torch/extension.h>

namespace torchrpc {
void initAgentBindings(pybind11::module_& m) {}
}  // namespace torchrpc
