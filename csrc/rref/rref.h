#pragma once

// A remote reference. The worker that holds the value is the owner; every
// other holder is a user, identified to the owner by a fork id. One class
// serves both roles so TorchScript sees a single type,
// torch.classes.torchrpc.RRef.
//
// Protocol (see rref_context.h): the owner keeps the value while any user
// fork is registered with it; a user fork that is dropped tells the owner
// (RREF_USER_DELETE), but only once the owner has confirmed it, so a delete
// can never overtake the registration it cancels.

#include <ATen/core/ivalue.h>
#include <torch/custom_class.h>

#include <atomic>
#include <memory>

#include "messages/message.h"

namespace torchrpc {

class RRefContext;

class RRef : public torch::CustomClassHolder {
 public:
  // An owner reference; its value arrives through valueFuture().
  RRef(std::weak_ptr<RRefContext> ctx, RRefId id, int64_t ownerId, bool isPython);
  // A user reference named by `forkId`.
  RRef(std::weak_ptr<RRefContext> ctx, RRefId id, int64_t ownerId, ForkId forkId, bool isPython,
       bool confirmed);
  ~RRef() override;

  const RRefId& id() const { return id_; }
  int64_t ownerId() const { return ownerId_; }
  bool isOwner() const { return isOwner_; }
  // True if the value is a Python object (fetched pickled), not an IValue.
  bool isPython() const { return isPython_.load(); }
  // An owner made ahead of its remote() call learns the kind from that call.
  void setIsPython(bool isPython) { isPython_.store(isPython); }
  const ForkId& forkId() const { return forkId_; }
  bool confirmed() const { return isOwner_ || confirmed_.load(); }
  void setConfirmed() {
    confirmed_.store(true);
    settleConfirmation();
  }
  // Completes once the owner has confirmed this user fork, or once it is
  // known it never will (the fork request failed): a call that received the
  // fork runs after that, as in torch.
  const c10::intrusive_ptr<c10::ivalue::Future>& confirmation() const { return confirmation_; }
  void settleConfirmation() {
    if (!confirmationSettled_.exchange(true)) confirmation_->markCompleted(c10::IValue());
  }

  // Owner: completes with the value or the error that creating it raised.
  // User: completes with an error if creation failed (else stays pending).
  const c10::intrusive_ptr<c10::ivalue::Future>& valueFuture() const { return value_; }

 private:
  std::weak_ptr<RRefContext> ctx_;
  RRefId id_;
  int64_t ownerId_;
  bool isOwner_;
  std::atomic<bool> isPython_;
  ForkId forkId_;
  std::atomic<bool> confirmed_{false};
  std::atomic<bool> confirmationSettled_{false};
  c10::intrusive_ptr<c10::ivalue::Future> confirmation_;
  c10::intrusive_ptr<c10::ivalue::Future> value_;
};

using RRefPtr = c10::intrusive_ptr<RRef>;

}  // namespace torchrpc
