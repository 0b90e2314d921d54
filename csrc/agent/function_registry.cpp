#include "agent/function_registry.h"

#include "errors.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {

c10::IValue Callable::run(std::vector<c10::IValue>& stack) const {
  if (fn_ != nullptr) {
    fn_->run(stack);
  } else {
    op_->getOperation()(stack);
  }
  if (stack.size() == 1) return std::move(stack[0]);
  if (stack.empty()) return c10::IValue();
  return c10::IValue(c10::ivalue::Tuple::create(std::move(stack)));
}

void FunctionRegistry::add(const std::string& name, std::shared_ptr<Callable> callable) {
  std::lock_guard<std::mutex> g(mu_);
  byName_[name] = std::move(callable);
}

std::shared_ptr<Callable> FunctionRegistry::find(const std::string& name) {
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = byName_.find(name);
    if (it != byName_.end()) return it->second;
  }
  std::shared_ptr<Callable> found;
  if (resolver_) found = resolver_(name);
  if (!found && name.find("::") != std::string::npos) {
    auto dot = name.find('.', name.find("::"));
    c10::OperatorName op(name.substr(0, dot), dot == std::string::npos ? "" : name.substr(dot + 1));
    if (auto jitOp = torch::jit::findOperatorFor(op)) found = std::make_shared<Callable>(jitOp);
  }
  if (found) add(name, found);
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
