#pragma once

// An AOTInductor package (a .pt2 from torch._inductor.aoti_compile_and_package)
// as a Callable: loaded by torch::inductor::AOTIModelPackageLoader and run in
// C++, so serving it never takes the GIL.

#include <memory>
#include <string>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "agent/function_registry.h"

namespace torchrpc {

using AotiLoader = torch::inductor::AOTIModelPackageLoader;

// Loads the package at `packagePath` (`numRunners` calls run at once).
// Throws RpcError(kArgument) if it does not load.
std::shared_ptr<AotiLoader> loadAotiPackage(const std::string& packagePath, const std::string& modelName,
                                            size_t numRunners);

// The loaded package as a Callable. `schema`: its name, its inputs (tensors,
// in the package's flattened input order; its call spec gives them) and its
// return type. `outputPlan` rebuilds that return value from the flat tensors
// the package returns: "L" is the next tensor, "T(a,b)" a tuple and "S(a,b)"
// a list of what a and b build, "D(k=a,j=b)" a dict with string keys.
std::shared_ptr<Callable> aotiCallable(std::shared_ptr<AotiLoader> loader, c10::FunctionSchema schema,
                                       const std::string& outputPlan);

}  // namespace torchrpc
