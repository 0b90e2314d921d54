#pragma once

// Small combinators over c10 futures, shared by the layers that answer
// requests from callbacks (the agent, distributed autograd). Callbacks may
// run on any thread, and inline when the future has already completed.

#include <ATen/core/ivalue.h>

#include <atomic>
#include <memory>
#include <vector>

namespace torchrpc {

using FuturePtr = c10::intrusive_ptr<c10::ivalue::Future>;

// How long a synchronous caller spins (or polls) for its reply before it
// sleeps: a reply from a peer on this host often arrives within
// microseconds, sooner than a sleeping thread can be woken.
constexpr int64_t kSyncSpinNs = 50'000;

// Completes `to` when `from` completes, with the same value or error.
inline void completeFrom(const FuturePtr& from, const FuturePtr& to) {
  from->addCallback([to](c10::ivalue::Future& f) {
    if (f.hasError()) {
      to->setErrorIfNeeded(f.exception_ptr());
    } else {
      to->markCompleted(f.value());
    }
  });
}

// A future that completes with None when every one of `futures` has, or with
// the first error among them (when `failOnError`). Exactly one callback
// completes it.
inline FuturePtr whenAll(const std::vector<FuturePtr>& futures, bool failOnError) {
  auto all = c10::make_intrusive<c10::ivalue::Future>(c10::NoneType::get());
  if (futures.empty()) {
    all->markCompleted(c10::IValue());
    return all;
  }
  struct State {
    std::atomic<size_t> left;
    std::atomic<bool> settled{false};
    explicit State(size_t n) : left(n) {}
  };
  auto state = std::make_shared<State>(futures.size());
  for (const auto& f : futures) {
    f->addCallback([all, state, failOnError](c10::ivalue::Future& done) {
      if (failOnError && done.hasError()) {
        if (!state->settled.exchange(true)) all->setError(done.exception_ptr());
      }
      if (state->left.fetch_sub(1) == 1 && !state->settled.exchange(true)) all->markCompleted(c10::IValue());
    });
  }
  return all;
}

}  // namespace torchrpc
