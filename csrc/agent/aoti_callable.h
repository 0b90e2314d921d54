#pragma once

// An AOTInductor package (a .pt2 from torch._inductor.aoti_compile_and_package)
// as a Callable: loaded by torch::inductor::AOTIModelPackageLoader and run in
// C++, so serving it never takes the GIL.

#include <memory>
#include <string>

#include "agent/function_registry.h"

namespace torchrpc {

// `schema`: its name, its inputs (tensors, in the package's flattened input
// order) and its return type. `outputPlan` rebuilds that return value from
// the flat tensors the package returns: "L" is the next tensor, "T(a,b)" a
// tuple and "S(a,b)" a list of what a and b build, "D(k=a,j=b)" a dict with
// string keys. Throws RpcError(kArgument) if the package does not load or
// the plan is malformed.
std::shared_ptr<Callable> aotiCallable(const std::string& packagePath, const std::string& modelName,
                                       c10::FunctionSchema schema, const std::string& outputPlan,
                                       size_t numRunners);

}  // namespace torchrpc
