#pragma once

// What a worker can be asked to run, by qualified name: registered
// TorchScript functions, functions a resolver finds (the Python bindings
// look in the Python compilation unit, once, under the GIL), and builtin
// operators ("aten::add.Tensor"). Look-ups are cached, so the hot path is
// one hash-map probe under a mutex and never touches Python.

#include <ATen/core/function_schema.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/runtime/operator.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace torchrpc {

class Callable {
 public:
  Callable(std::shared_ptr<torch::jit::CompilationUnit> cu, torch::jit::Function* fn)
      : cu_(std::move(cu)), fn_(fn), schema_(fn->getSchema()) {}
  explicit Callable(std::shared_ptr<torch::jit::Operator> op) : op_(std::move(op)), schema_(op_->schema()) {}

  const c10::FunctionSchema& schema() const { return schema_; }
  // Runs on `stack` (the full positional arguments) and returns the result:
  // the single output, None for none, a tuple for several.
  c10::IValue run(std::vector<c10::IValue>& stack) const;

 private:
  std::shared_ptr<torch::jit::CompilationUnit> cu_;  // keeps fn_ alive
  torch::jit::Function* fn_ = nullptr;
  std::shared_ptr<torch::jit::Operator> op_;
  c10::FunctionSchema schema_;
};

class FunctionRegistry {
 public:
  using Resolver = std::function<std::shared_ptr<Callable>(const std::string& name)>;

  void add(const std::string& name, std::shared_ptr<Callable> callable);
  // Registered name, then the resolver, then builtin operators; null if none.
  std::shared_ptr<Callable> find(const std::string& name);
  void setResolver(Resolver resolver) { resolver_ = std::move(resolver); }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<Callable>> byName_;
  Resolver resolver_;
};

// Raises RpcError(kArgument) naming `name`, the argument and both types if
// `stack` does not fit `schema`.
void checkArguments(const std::string& name, const c10::FunctionSchema& schema,
                    const std::vector<c10::IValue>& stack);

}  // namespace torchrpc
