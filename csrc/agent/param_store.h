#pragma once

// Named tensors kept on a worker, so peers can put, get and accumulate into
// them by name (the scripted_ops parameter store). Owned by the Agent.

#include <ATen/core/Tensor.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "errors.h"

namespace torchrpc {

class ParamStore {
 public:
  void put(const std::string& name, const at::Tensor& value) {
    std::lock_guard<std::mutex> g(mu_);
    params_[name] = value.detach().clone();
  }
  at::Tensor get(const std::string& name) {
    std::lock_guard<std::mutex> g(mu_);
    return find(name).clone();
  }
  // Adds `delta` in place and returns the new value; atomic per store.
  at::Tensor addTo(const std::string& name, const at::Tensor& delta) {
    std::lock_guard<std::mutex> g(mu_);
    at::Tensor& p = find(name);
    p.add_(delta);
    return p.clone();
  }

 private:
  at::Tensor& find(const std::string& name) {
    auto it = params_.find(name);
    if (it == params_.end()) {
      throw RpcError(ErrorKind::kArgument, "torchrpc: no parameter named '" + name + "'");
    }
    return it->second;
  }

  std::mutex mu_;
  std::unordered_map<std::string, at::Tensor> params_;
};

}  // namespace torchrpc
