#pragma once

// What a worker can be asked to run, by qualified name: registered
// TorchScript functions, functions a resolver finds (the Python bindings
// look in the Python compilation unit, once, under the GIL), and builtin
// operators ("aten::add.Tensor"). Look-ups are cached, so the hot path is
// one hash-map probe under a mutex and never touches Python.

#include <ATen/core/function_schema.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/runtime/operator.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <chrono>

namespace torchrpc {

// One thing a worker can run: a TorchScript function, a ScriptModule's
// method, an operator, or any other compiled function (an exported program,
// an AOTInductor package) given as its schema and a runner.
class Callable {
 public:
  // Runs on the full positional stack (no `self`) and leaves the outputs on it.
  using Runner = std::function<void(std::vector<c10::IValue>& stack)>;

  Callable(std::shared_ptr<torch::jit::CompilationUnit> cu, torch::jit::Function* fn);
  explicit Callable(std::shared_ptr<torch::jit::Operator> op);
  // `module`'s `method`, called with `module` as self; its schema drops self.
  Callable(const torch::jit::Module& module, const std::string& method);
  // `inlineSafe`: `run` never blocks (no GIL, no RPC, no waits).
  Callable(c10::FunctionSchema schema, Runner run, bool inlineSafe);

  const c10::FunctionSchema& schema() const { return schema_; }
  // Names it `name` in its schema (what schema queries and errors show).
  void rename(const std::string& name) { schema_ = schema_.cloneWithName(name, ""); }
  // Runs on `stack` (the full positional arguments) and returns the result:
  // the single output, None for none, a tuple for several.
  c10::IValue run(std::vector<c10::IValue>& stack) const;

  // Whether a request for it may run on the thread that received it,
  // skipping the hop to a worker thread: its code cannot block (no RPC, no
  // waits, no forks, no Python, no RRef arguments) and its recent runs were
  // short. A blocked receiving thread would stall its connection, so this
  // errs towards no.
  bool mayRunInline() const {
    return inlineSafe_ && runs_.load(std::memory_order_relaxed) >= kRunsBeforeInline &&
           recentNs_.load(std::memory_order_relaxed) < kInlineNs;
  }

 private:
  static constexpr int64_t kRunsBeforeInline = 3;
  static constexpr int64_t kInlineNs = 100'000;

  std::shared_ptr<torch::jit::CompilationUnit> cu_;  // keeps fn_ alive
  torch::jit::Function* fn_ = nullptr;
  std::shared_ptr<torch::jit::Operator> op_;
  std::optional<torch::jit::Module> module_;  // self for fn_, a method of it
  Runner runner_;
  c10::FunctionSchema schema_;
  bool inlineSafe_ = false;
  // How long it ran lately: the longer of the last run and half the one
  // before, so one slow run (a large input) keeps it off the fast path a while.
  mutable std::atomic<int64_t> recentNs_{0};
  mutable std::atomic<int64_t> runs_{0};
};

class FunctionRegistry {
 public:
  using Resolver = std::function<std::shared_ptr<Callable>(const std::string& name)>;

  void add(const std::string& name, std::shared_ptr<Callable> callable);
  // Registered name, then the resolver, then builtin operators; null if none.
  // Misses are remembered too (for a second, or until the next add()), so a
  // caller repeating an unknown name does not send every request through
  // Python, while a function compiled a moment later is still found.
  std::shared_ptr<Callable> find(const std::string& name);
  // Only what was registered or found before: never calls the resolver.
  std::shared_ptr<Callable> findKnown(const std::string& name);
  void setResolver(Resolver resolver) { resolver_ = std::move(resolver); }

 private:
  static constexpr size_t kMaxMisses = 4096;

  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<Callable>> byName_;
  std::unordered_map<std::string, std::chrono::steady_clock::time_point> misses_;
  Resolver resolver_;
};

// Raises RpcError(kArgument) naming `name`, the argument and both types if
// `stack` does not fit `schema`.
void checkArguments(const std::string& name, const c10::FunctionSchema& schema,
                    const std::vector<c10::IValue>& stack);

}  // namespace torchrpc
