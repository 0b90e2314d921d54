#include "agent/function_registry.h"

#include <torch/csrc/jit/api/function_impl.h>

#include <chrono>

#include "errors.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {

namespace {

// Types a value of which may make the code wait: RRefs (to_here, forks
// awaiting confirmation), futures, and anything Python.
bool mayBlockOnType(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::FutureType || type->kind() == c10::TypeKind::PyObjectType ||
      type->kind() == c10::TypeKind::RRefType || type->kind() == c10::TypeKind::AnyType ||
      type->kind() == c10::TypeKind::AwaitType) {
    return true;
  }
  if (auto cls = type->cast<c10::ClassType>()) return true;  // custom classes: torchrpc.RRef and the like
  for (const auto& t : type->containedTypes()) {
    if (mayBlockOnType(t)) return true;
  }
  return false;
}

bool mayBlock(const torch::jit::Block* block) {
  using torch::jit::Node;
  for (const Node* n : block->nodes()) {
    const c10::Symbol k = n->kind();
    if (k == c10::prim::fork || k == c10::aten::wait || k == c10::prim::CallFunction ||
        k == c10::prim::CallMethod || k == c10::prim::PythonOp || k == c10::Symbol::fromQualString("aten::sleep") ||
        std::string(k.ns().toUnqualString()) == "torchrpc") {
      return true;
    }
    for (const torch::jit::Value* v : n->outputs()) {
      if (mayBlockOnType(v->type())) return true;
    }
    for (const torch::jit::Block* b : n->blocks()) {
      if (mayBlock(b)) return true;
    }
  }
  return false;
}

bool schemaMayBlock(const c10::FunctionSchema& schema) {
  for (const auto& a : schema.arguments()) {
    if (mayBlockOnType(a.type())) return true;
  }
  for (const auto& r : schema.returns()) {
    if (mayBlockOnType(r.type())) return true;
  }
  return false;
}

}  // namespace

Callable::Callable(std::shared_ptr<torch::jit::CompilationUnit> cu, torch::jit::Function* fn)
    : cu_(std::move(cu)), fn_(fn), schema_(fn->getSchema()) {
  auto* graphFn = dynamic_cast<torch::jit::GraphFunction*>(fn_);
  inlineSafe_ = graphFn != nullptr && !schemaMayBlock(schema_) && !mayBlock(graphFn->graph()->block());
}

Callable::Callable(std::shared_ptr<torch::jit::Operator> op) : op_(std::move(op)), schema_(op_->schema()) {
  inlineSafe_ = schema_.name().rfind("aten::", 0) == 0 && !schemaMayBlock(schema_) &&
                schema_.name() != "aten::wait" && schema_.name() != "aten::sleep";
}

Callable::Callable(const torch::jit::Module& module, const std::string& method)
    : fn_(&module.get_method(method).function()), module_(module), schema_(fn_->getSchema()) {
  auto args = schema_.arguments();
  args.erase(args.begin());  // self, which run() supplies
  schema_ = schema_.cloneWithArguments(std::move(args));
  // Methods read module state (class-typed values): never inline.
  inlineSafe_ = false;
}

Callable::Callable(c10::FunctionSchema schema, Runner run, bool inlineSafe)
    : runner_(std::move(run)), schema_(std::move(schema)) {
  inlineSafe_ = inlineSafe;
}

c10::IValue Callable::run(std::vector<c10::IValue>& stack) const {
  const auto start = std::chrono::steady_clock::now();
  if (module_) {
    stack.insert(stack.begin(), module_->_ivalue());
    fn_->run(stack);
  } else if (fn_ != nullptr) {
    fn_->run(stack);
  } else if (runner_) {
    runner_(stack);
  } else {
    op_->getOperation()(stack);
  }
  const int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::steady_clock::now() - start).count();
  recentNs_.store(std::max(took, recentNs_.load(std::memory_order_relaxed) / 2), std::memory_order_relaxed);
  runs_.fetch_add(1, std::memory_order_relaxed);
  if (stack.size() == 1) return std::move(stack[0]);
  if (stack.empty()) return c10::IValue();
  return c10::IValue(c10::ivalue::Tuple::create(std::move(stack)));
}

void FunctionRegistry::add(const std::string& name, std::shared_ptr<Callable> callable) {
  std::lock_guard<std::mutex> g(mu_);
  byName_[name] = std::move(callable);
  misses_.clear();  // a name missed before may resolve now
}

std::shared_ptr<Callable> FunctionRegistry::findKnown(const std::string& name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = byName_.find(name);
  return it == byName_.end() ? nullptr : it->second;
}

std::shared_ptr<Callable> FunctionRegistry::find(const std::string& name) {
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = byName_.find(name);
    if (it != byName_.end()) return it->second;
    auto miss = misses_.find(name);
    if (miss != misses_.end() && std::chrono::steady_clock::now() - miss->second < std::chrono::seconds(1)) {
      return nullptr;
    }
  }
  std::shared_ptr<Callable> found;
  if (resolver_) found = resolver_(name);
  if (!found && name.find("::") != std::string::npos) {
    auto dot = name.find('.', name.find("::"));
    c10::OperatorName op(name.substr(0, dot), dot == std::string::npos ? "" : name.substr(dot + 1));
    if (auto jitOp = torch::jit::findOperatorFor(op)) found = std::make_shared<Callable>(jitOp);
  }
  std::lock_guard<std::mutex> g(mu_);
  if (found) {
    byName_[name] = found;
  } else {
    if (misses_.size() >= kMaxMisses) misses_.clear();
    misses_[name] = std::chrono::steady_clock::now();
  }
  return found;
}

void checkArguments(const std::string& name, const c10::FunctionSchema& schema,
                    const std::vector<c10::IValue>& stack) {
  const auto& args = schema.arguments();
  if (stack.size() != args.size()) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: '" + name + "' takes " +
                                             std::to_string(args.size()) + " arguments (" +
                                             toString(schema) + "), got " +
                                             std::to_string(stack.size()));
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (!valueMatchesType(stack[i], args[i].type())) {
      throw RpcError(ErrorKind::kArgument,
                     "torchrpc: '" + name + "' expects argument '" + args[i].name() + "' of type " +
                         args[i].type()->annotation_str() + ", got " +
                         stack[i].type()->annotation_str());
    }
  }
}

}  // namespace torchrpc
