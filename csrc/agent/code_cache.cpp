#include "agent/code_cache.h"

#include <openssl/evp.h>
#include <torch/csrc/jit/serialization/import.h>

#include <sstream>

#include "errors.h"

namespace torchrpc {

std::string codeId(const void* data, size_t size) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(data, size, digest, &n, EVP_sha256(), nullptr) != 1) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: SHA-256 failed");
  }
  static const char* hex = "0123456789abcdef";
  std::string out = "sha256:";
  for (unsigned int i = 0; i < n; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

void CodeCache::setLoader(Loader loader) {
  std::lock_guard<std::mutex> g(mu_);
  loader_ = std::move(loader);
}

std::shared_ptr<Callable> CodeCache::find(const std::string& id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = byId_.find(id);
  if (it == byId_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

size_t CodeCache::size() {
  std::lock_guard<std::mutex> g(mu_);
  return lru_.size();
}

std::shared_ptr<Callable> CodeCache::install(const std::string& id, const std::string& kind,
                                             const at::Tensor& archive) {
  if (auto held = find(id)) return held;  // a concurrent first call loaded it
  if (archive.dim() != 1 || archive.scalar_type() != at::kByte || !archive.is_contiguous() ||
      !archive.device().is_cpu()) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: code archive " + id + " is not a 1-D uint8 CPU tensor");
  }
  if (codeId(archive.data_ptr(), archive.numel()) != id) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: code archive does not match its name " + id +
                                             " (corrupted or truncated in transit)");
  }
  auto callable = load(id, kind, archive);
  loads_.fetch_add(1);
  std::lock_guard<std::mutex> g(mu_);
  auto it = byId_.find(id);
  if (it != byId_.end()) return it->second->second;
  lru_.emplace_front(id, callable);
  byId_[id] = lru_.begin();
  while (lru_.size() > capacity_) {
    byId_.erase(lru_.back().first);
    lru_.pop_back();
  }
  return callable;
}

std::shared_ptr<Callable> CodeCache::load(const std::string& id, const std::string& kind,
                                          const at::Tensor& archive) {
  if (kind == "script") {
    try {
      // TorchScript's own unpickler builds only TorchScript values: loading
      // runs no Python and constructs no arbitrary objects.
      std::istringstream in(std::string(static_cast<const char*>(archive.data_ptr()), archive.numel()));
      torch::jit::Module module = torch::jit::load(in, c10::Device(c10::kCPU));
      if (!module.find_method("forward")) {
        throw RpcError(ErrorKind::kArgument, "it has no forward method");
      }
      auto callable = std::make_shared<Callable>(module, "forward");
      callable->rename(id);
      return callable;
    } catch (const std::exception& e) {
      throw RpcError(ErrorKind::kArgument, "torchrpc: code archive " + id +
                                               " is not a loadable TorchScript archive: " + e.what());
    }
  }
  Loader loader;
  {
    std::lock_guard<std::mutex> g(mu_);
    loader = loader_;
  }
  if (kind != "export" || !loader) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: code archive " + id + " is of unknown kind '" + kind + "'");
  }
  auto callable = loader(kind, archive, id);
  callable->rename(id);
  return callable;
}

}  // namespace torchrpc
