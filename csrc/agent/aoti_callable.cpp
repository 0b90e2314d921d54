#include "agent/aoti_callable.h"

#include "errors.h"

namespace torchrpc {
namespace {

// Builds the value `plan` (from `pos`) describes, taking tensors from `flat`.
class Rebuild {
 public:
  Rebuild(const std::string& plan, std::vector<at::Tensor>& flat) : plan_(plan), flat_(flat) {}

  c10::IValue all() {
    c10::IValue v = next();
    if (pos_ != plan_.size() || used_ != flat_.size()) fail("does not use every output exactly once");
    return v;
  }
  // Checks the plan's shape without outputs: how many tensors it takes.
  static size_t leaves(const std::string& plan) {
    size_t n = 0;
    for (char c : plan) n += c == 'L';
    return n;
  }

 private:
  c10::IValue next() {
    if (pos_ >= plan_.size()) fail("ends early");
    char c = plan_[pos_++];
    if (c == 'L') {
      if (used_ >= flat_.size()) fail("needs more outputs than the package returns");
      return c10::IValue(std::move(flat_[used_++]));
    }
    if ((c != 'T' && c != 'S' && c != 'D') || pos_ >= plan_.size() || plan_[pos_++] != '(') fail("is malformed");
    std::vector<c10::IValue> items;
    c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
    while (pos_ < plan_.size() && plan_[pos_] != ')') {
      if (c == 'D') {
        size_t eq = plan_.find('=', pos_);
        if (eq == std::string::npos) fail("has a dict entry without a key");
        std::string key = plan_.substr(pos_, eq - pos_);
        pos_ = eq + 1;
        dict.insert(key, next());
      } else {
        items.push_back(next());
      }
      if (pos_ < plan_.size() && plan_[pos_] == ',') ++pos_;
    }
    if (pos_ >= plan_.size()) fail("is missing a ')'");
    ++pos_;
    if (c == 'D') return c10::IValue(std::move(dict));
    if (c == 'T') return c10::IValue(c10::ivalue::Tuple::create(std::move(items)));
    c10::List<at::Tensor> list;
    for (auto& v : items) {
      if (!v.isTensor()) fail("has a list holding something other than tensors");
      list.push_back(v.toTensor());
    }
    return c10::IValue(std::move(list));
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw RpcError(ErrorKind::kRpc, "torchrpc: AOTInductor output plan '" + plan_ + "' " + why);
  }

  const std::string& plan_;
  std::vector<at::Tensor>& flat_;
  size_t pos_ = 0;
  size_t used_ = 0;
};

}  // namespace

std::shared_ptr<AotiLoader> loadAotiPackage(const std::string& packagePath, const std::string& modelName,
                                            size_t numRunners) {
  try {
    return std::make_shared<AotiLoader>(packagePath, modelName, false, std::max<size_t>(1, numRunners));
  } catch (const std::exception& e) {
    throw RpcError(ErrorKind::kArgument,
                   "torchrpc: cannot load AOTInductor package '" + packagePath + "': " + e.what());
  }
}

std::shared_ptr<Callable> aotiCallable(std::shared_ptr<AotiLoader> loader, c10::FunctionSchema schema,
                                       const std::string& outputPlan) {
  for (const auto& arg : schema.arguments()) {
    if (arg.type()->kind() != c10::TypeKind::TensorType) {
      throw RpcError(ErrorKind::kArgument, "torchrpc: an AOTInductor package takes tensors only; '" +
                                               arg.name() + "' is " + arg.type()->annotation_str());
    }
  }
  const size_t outputs = Rebuild::leaves(outputPlan);
  auto run = [loader, outputPlan, outputs, name = schema.name()](std::vector<c10::IValue>& stack) {
    std::vector<at::Tensor> inputs;
    inputs.reserve(stack.size());
    for (auto& v : stack) inputs.push_back(std::move(v).toTensor());
    stack.clear();
    std::vector<at::Tensor> flat;
    try {
      flat = loader->boxed_run(std::move(inputs));
    } catch (const std::exception& e) {
      // AOTInductor's input checks (AOTI_RUNTIME_CHECK_INPUTS) land here.
      throw RpcError(ErrorKind::kArgument, "torchrpc: '" + name + "' (AOTInductor) rejected its inputs: " + e.what());
    }
    if (flat.size() != outputs) {
      throw RpcError(ErrorKind::kRpc, "torchrpc: '" + name + "' returned " + std::to_string(flat.size()) +
                                          " tensors, its output plan expects " + std::to_string(outputs));
    }
    stack.push_back(Rebuild(outputPlan, flat).all());
  };
  return std::make_shared<Callable>(std::move(schema), std::move(run), false);
}

}  // namespace torchrpc
