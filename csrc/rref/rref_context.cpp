#include "rref/rref_context.h"

#include <chrono>
#include <condition_variable>

#include "messages/python_call.h"
#include "messages/rref_proto.h"

namespace torchrpc {
namespace {

const ForkId kNoFork{-1, -1};
// The fork id of a user RRef sent to its owner by id (see SendingTo).
const ForkId kSentToOwner{-2, -2};

thread_local int64_t tlsSendingTo = -1;
thread_local std::vector<RRefPtr> tlsHeld;
thread_local bool tlsCollecting = false;
constexpr auto kConfirmationWait = std::chrono::seconds(30);
thread_local std::vector<RRefPtr> tlsReceived;

c10::intrusive_ptr<c10::ivalue::Future> newFuture() {
  return c10::make_intrusive<c10::ivalue::Future>(c10::AnyType::get());
}

}  // namespace

RRef::RRef(std::weak_ptr<RRefContext> ctx, RRefId id, int64_t ownerId, bool isPython)
    : ctx_(std::move(ctx)), id_(id), ownerId_(ownerId), isOwner_(true), isPython_(isPython),
      forkId_(kNoFork), confirmation_(newFuture()), value_(newFuture()) {
  confirmed_.store(true);
  settleConfirmation();
}

RRef::RRef(std::weak_ptr<RRefContext> ctx, RRefId id, int64_t ownerId, ForkId forkId, bool isPython,
           bool confirmed)
    : ctx_(std::move(ctx)), id_(id), ownerId_(ownerId), isOwner_(false), isPython_(isPython),
      forkId_(forkId), confirmation_(newFuture()), value_(newFuture()) {
  confirmed_.store(confirmed);
  if (confirmed) settleConfirmation();
  if (auto c = ctx_.lock()) c->userCreated();
}

RRef::~RRef() {
  if (isOwner_) return;
  if (auto c = ctx_.lock()) c->userDropped(id_, ownerId_, forkId_);
}

RRefContext::RRefContext(int64_t selfId, std::string selfName, Send send, SendReliably sendReliably)
    : selfId_(selfId),
      selfName_(std::move(selfName)),
      send_(std::move(send)),
      sendReliably_(std::move(sendReliably)),
      objectCodec_{"__torch__.torch.classes.torchrpc.RRef",
                   [this](const c10::IValue& obj) { return fork(obj.toCustomClass<RRef>()); },
                   [this](const c10::IValue& encoded) { return c10::IValue(unfork(encoded)); }} {}

GloballyUniqueId RRefContext::newId() { return {selfId_, nextLocalId_.fetch_add(1)}; }

RRefPtr RRefContext::createLocalOwner(c10::IValue value, bool isPython) {
  auto rref = c10::make_intrusive<RRef>(weak_from_this(), newId(), selfId_, isPython);
  rref->valueFuture()->markCompleted(std::move(value));
  return rref;
}

RRefPtr RRefContext::getOrCreateOwnerLocked(const RRefId& id, bool isPython) {
  OwnerEntry& e = owners_[id];
  if (!e.rref) e.rref = c10::make_intrusive<RRef>(weak_from_this(), id, selfId_, isPython);
  return e.rref;
}

RRefPtr RRefContext::ownerAheadOfCreationLocked(const RRefId& id) {
  auto it = owners_.find(id);
  if (it != owners_.end()) return it->second.rref;
  if (id.createdOn == selfId_) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: RRef " + id.str() + " is unknown to its owner '" +
                                        selfName_ + "' (already released?)");
  }
  RRefPtr owner = getOrCreateOwnerLocked(id, false);
  owners_[id].awaitingRemoteCall = true;
  return owner;
}

RRefPtr RRefContext::maybeEraseLocked(const RRefId& id) {
  auto it = owners_.find(id);
  if (it == owners_.end() || !it->second.forks.empty() || it->second.creating > 0 ||
      it->second.awaitingRemoteCall) {
    return {};
  }
  RRefPtr r = std::move(it->second.rref);
  owners_.erase(it);
  return r;  // dropped by the caller after unlocking: RRef destructors take locks
}

RRefPtr RRefContext::remote(int64_t to, const std::function<Message(const RRefId&, const ForkId&)>& request,
                            bool isPython, double timeoutSeconds, const std::string& what) {
  const RRefId id = newId();
  std::weak_ptr<RRefContext> weakSelf = weak_from_this();
  if (to == selfId_) {
    // The caller is the owner: no user fork; the entry stays while creating.
    RRefPtr owner;
    {
      std::lock_guard<std::mutex> g(mu_);
      owner = getOrCreateOwnerLocked(id, isPython);
      owners_[id].creating += 1;
    }
    auto fut = send_(to, request(id, kNoFork), timeoutSeconds, what);
    fut->addCallback([weakSelf, owner, id](c10::ivalue::Future& f) {
      if (f.hasError()) owner->valueFuture()->setErrorIfNeeded(f.exception_ptr());
      auto self = weakSelf.lock();
      if (!self) return;
      RRefPtr drop;
      {
        std::lock_guard<std::mutex> g(self->mu_);
        auto it = self->owners_.find(id);
        if (it != self->owners_.end()) it->second.creating -= 1;
        drop = self->maybeEraseLocked(id);
      }
    });
    return owner;
  }
  const ForkId forkId = newId();
  auto user = c10::make_intrusive<RRef>(weakSelf, id, to, forkId, isPython, false);
  {
    std::lock_guard<std::mutex> g(mu_);
    unconfirmed_[forkId] = Unconfirmed{id, to, c10::weak_intrusive_ptr<RRef>(user), false};
  }
  auto fut = send_(to, request(id, forkId), timeoutSeconds, what);
  c10::weak_intrusive_ptr<RRef> weakUser(user);
  fut->addCallback([weakSelf, weakUser, forkId](c10::ivalue::Future& f) {
    if (f.hasError()) {
      if (auto u = weakUser.lock()) u->valueFuture()->setErrorIfNeeded(f.exception_ptr());
    }
    // Registered by the owner before it ran the call, success or not.
    if (auto self = weakSelf.lock()) self->confirmUser(forkId);
  });
  return user;
}

void RRefContext::confirmUser(const ForkId& forkId) {
  Unconfirmed u;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = unconfirmed_.find(forkId);
    if (it == unconfirmed_.end()) return;
    u = std::move(it->second);
    unconfirmed_.erase(it);
  }
  if (auto user = u.user.lock()) user->setConfirmed();
  if (u.dropped) sendControl(u.ownerId, RRefUserDelete(u.id, forkId).toMessage(), "RRef delete");
}

void RRefContext::userDropped(const RRefId& id, int64_t ownerId, const ForkId& forkId) {
  liveUsers_.fetch_sub(1);
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = unconfirmed_.find(forkId);
    if (it != unconfirmed_.end()) {
      it->second.dropped = true;  // sent once the owner confirms the fork
      return;
    }
  }
  sendControl(ownerId, RRefUserDelete(id, forkId).toMessage(), "RRef delete");
}

ReceivedForks::ReceivedForks() : previous_(tlsCollecting) {
  tlsCollecting = true;
  tlsReceived.clear();
}
ReceivedForks::~ReceivedForks() {
  tlsCollecting = previous_;
  tlsReceived.clear();
}
bool ReceivedForks::any() { return !tlsReceived.empty(); }

void ReceivedForks::waitConfirmed() {
  std::vector<RRefPtr> received = std::move(tlsReceived);
  tlsReceived.clear();
  if (received.empty()) return;
  // Bounded: an owner that neither answers nor drops the connection (a
  // frozen process) must not hold this thread forever; the call then runs
  // with the fork unconfirmed.
  struct Signal {
    std::mutex mu;
    std::condition_variable cv;
    size_t left;
  };
  auto signal = std::make_shared<Signal>();
  signal->left = received.size();
  for (const auto& r : received) {
    r->confirmation()->addCallback([signal](c10::ivalue::Future&) {
      std::lock_guard<std::mutex> g(signal->mu);
      if (--signal->left == 0) signal->cv.notify_all();
    });
  }
  std::unique_lock<std::mutex> g(signal->mu);
  signal->cv.wait_for(g, kConfirmationWait, [&] { return signal->left == 0; });
}

SendingTo::SendingTo(int64_t to) : previous_(tlsSendingTo) { tlsSendingTo = to; }
SendingTo::~SendingTo() {
  tlsSendingTo = previous_;
  tlsHeld.clear();
}
std::vector<RRefPtr> SendingTo::take() { return std::move(tlsHeld); }

c10::IValue RRefContext::fork(const RRefPtr& rref) {
  const int64_t self = selfId_;
  if (!rref->isOwner() && rref->ownerId() == tlsSendingTo) {
    tlsHeld.push_back(rref);
    return c10::IValue(c10::ivalue::Tuple::create(
        {c10::IValue(rref->ownerId()), rref->id().toIValue(), kSentToOwner.toIValue(), c10::IValue(self),
         c10::IValue(rref->isPython())}));
  }
  const ForkId forkId = newId();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (rref->isOwner()) {
      OwnerEntry& e = owners_[rref->id()];
      if (!e.rref) e.rref = rref;
      e.forks.emplace(forkId, tlsSendingTo);
    } else {
      children_[forkId] = rref;  // kept alive until the child is confirmed
    }
  }
  return c10::IValue(c10::ivalue::Tuple::create(
      {c10::IValue(rref->ownerId()), rref->id().toIValue(), forkId.toIValue(), c10::IValue(self),
       c10::IValue(rref->isPython())}));
}

RRefPtr RRefContext::unfork(const c10::IValue& info) {
  const auto& e = info.toTupleRef().elements();
  if (e.size() != 5 || !e[0].isInt() || !e[3].isInt() || !e[4].isBool()) {
    throwDecode("malformed RRef fork");
  }
  const int64_t ownerId = e[0].toInt();
  const RRefId id = GloballyUniqueId::fromIValue(e[1]);
  const ForkId forkId = GloballyUniqueId::fromIValue(e[2]);
  const int64_t parent = e[3].toInt();
  const bool isPython = e[4].toBool();
  const int64_t self = selfId_;
  if (ownerId == self) {
    RRefPtr owner, drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      // The remote() creating the value may still be queued behind this message.
      owner = ownerAheadOfCreationLocked(id);
      if (forkId == kSentToOwner) return owner;  // the sender holds its own fork meanwhile
      if (parent == self) {
        owners_[id].forks.erase(forkId);  // a fork we sent ourselves: nobody will delete it
        drop = maybeEraseLocked(id);
      }
    }
    if (parent != self) sendControl(parent, RRefChildAccept(forkId).toMessage(), "RRef child accept");
    return owner;
  }
  bool confirmed = parent == ownerId;  // the owner registered it when sending
  auto user = c10::make_intrusive<RRef>(weak_from_this(), id, ownerId, forkId, isPython, confirmed);
  if (!confirmed) {
    {
      std::lock_guard<std::mutex> g(mu_);
      unconfirmed_[forkId] = Unconfirmed{id, ownerId, c10::weak_intrusive_ptr<RRef>(user), false};
    }
    if (tlsCollecting) tlsReceived.push_back(user);
    std::weak_ptr<RRefContext> weakSelf = weak_from_this();
    sendControl(ownerId, RRefForkRequest(id, forkId).toMessage(), "RRef fork request",
                [weakSelf, forkId, parent] {
                  if (auto self = weakSelf.lock()) {
                    self->confirmUser(forkId);
                    self->sendControl(parent, RRefChildAccept(forkId).toMessage(), "RRef child accept");
                  }
                },
                [weak = c10::weak_intrusive_ptr<RRef>(user)] {
                  // Never confirmed (the owner is gone): calls waiting for it
                  // run anyway, and fail where they use it.
                  if (auto u = weak.lock()) u->settleConfirmation();
                });
  }
  return user;
}

RRefPtr RRefContext::ownerForRemoteCall(const RRefId& id, const ForkId& forkId, bool isPython, int64_t holder) {
  std::lock_guard<std::mutex> g(mu_);
  RRefPtr owner = getOrCreateOwnerLocked(id, isPython);
  OwnerEntry& e = owners_[id];
  e.awaitingRemoteCall = false;
  owner->setIsPython(isPython);
  // A USER_DELETE that overtook this call (the caller timed out and dropped
  // its RRef) already released the fork: do not hold the value for it.
  if (!(forkId == kNoFork)) {
    if (deletedForks_.count(forkId)) {
      maybeEraseLocked(id);  // nobody else wants it: it lives until this call answers
    } else {
      e.forks.emplace(forkId, holder);
    }
  }
  return owner;
}

RRefPtr RRefContext::ownerForFetch(const RRefId& id) {
  // Requests run concurrently, so a fetch may overtake the remote() call that
  // creates the value: wait for that value rather than fail.
  std::lock_guard<std::mutex> g(mu_);
  return ownerAheadOfCreationLocked(id);
}

void RRefContext::onForkRequest(const RRefId& id, const ForkId& forkId, int64_t holder) {
  std::lock_guard<std::mutex> g(mu_);
  // A retried or duplicated request for a fork already deleted must not
  // bring its value back.
  if (deletedForks_.count(forkId)) return;
  ownerAheadOfCreationLocked(id);
  owners_[id].forks.emplace(forkId, holder);
}

void RRefContext::onUserDelete(const RRefId& id, const ForkId& forkId) {
  RRefPtr drop;
  std::lock_guard<std::mutex> g(mu_);
  if (deletedForks_.insert(forkId).second) {
    deletedOrder_.push_back(forkId);
    if (deletedOrder_.size() > kRememberedDeletes) {
      deletedForks_.erase(deletedOrder_.front());
      deletedOrder_.pop_front();
    }
  }
  auto it = owners_.find(id);
  if (it == owners_.end()) return;
  it->second.forks.erase(forkId);
  drop = maybeEraseLocked(id);
  // `drop` is an owner reference: its destructor takes no lock.
}

void RRefContext::onChildAccept(const ForkId& forkId) {
  RRefPtr drop;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = children_.find(forkId);
    if (it == children_.end()) return;
    drop = std::move(it->second);
    children_.erase(it);
  }
  // A user reference may die here and send its own delete: outside the lock.
}

void RRefContext::sendControl(int64_t to, Message&& message, const std::string& what,
                              std::function<void()> onAck, std::function<void()> onFail) {
  try {
    // Retried until acknowledged: every RRef control message is idempotent.
    auto fut = sendReliably_(to, std::move(message), what);
    if (onAck || onFail) {
      fut->addCallback([onAck = std::move(onAck), onFail](c10::ivalue::Future& f) {
        if (!f.hasError()) {
          if (onAck) onAck();
        } else if (onFail) {
          onFail();
        }
      });
    }
  } catch (const std::exception&) {
    // Shut down or peer gone: the protocol ends with the connection.
    if (onFail) onFail();
  }
}

c10::intrusive_ptr<c10::ivalue::Future> RRefContext::fetch(const RRefPtr& rref, double timeoutSeconds) {
  if (rref->isOwner()) return rref->valueFuture();
  if (rref->valueFuture()->hasError()) return rref->valueFuture();  // creation failed
  const int64_t self = selfId_;
  Message m = rref->isPython() ? PythonRRefFetchCall(rref->id(), self).toMessage()
                               : ScriptRRefFetchCall(rref->id(), self).toMessage();
  return send_(rref->ownerId(), std::move(m), timeoutSeconds, "RRef.to_here");
}

void RRefContext::onPeerLost(int64_t peer) {
  std::vector<RRefPtr> drop;
  {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<RRefId> touched;
    for (auto& [id, e] : owners_) {
      for (auto it = e.forks.begin(); it != e.forks.end();) {
        if (it->second == peer) {
          it = e.forks.erase(it);
        } else {
          ++it;
        }
      }
      touched.push_back(id);
    }
    for (const RRefId& id : touched) {
      if (auto r = maybeEraseLocked(id)) drop.push_back(std::move(r));
    }
    for (auto it = children_.begin(); it != children_.end();) {
      if (it->second->ownerId() == peer) {
        drop.push_back(std::move(it->second));
        it = children_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = unconfirmed_.begin(); it != unconfirmed_.end();) {
      it = it->second.ownerId == peer ? unconfirmed_.erase(it) : std::next(it);
    }
  }
  // Dropped outside the lock: RRef destructors take it.
}

void RRefContext::clear() {
  std::unordered_map<RRefId, OwnerEntry, GloballyUniqueIdHash> owners;
  std::unordered_map<ForkId, RRefPtr, GloballyUniqueIdHash> children;
  {
    std::lock_guard<std::mutex> g(mu_);
    owners.swap(owners_);
    children.swap(children_);
    unconfirmed_.clear();
  }
}

RRefDebugInfo RRefContext::debugInfo() {
  std::lock_guard<std::mutex> g(mu_);
  int64_t forks = 0;
  for (const auto& [id, e] : owners_) forks += static_cast<int64_t>(e.forks.size());
  return {static_cast<int64_t>(owners_.size()), forks, static_cast<int64_t>(children_.size()),
          static_cast<int64_t>(unconfirmed_.size()), liveUsers_.load()};
}

std::vector<RRefContext::OwnedRow> RRefContext::ownedTable() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<OwnedRow> rows;
  rows.reserve(owners_.size());
  for (const auto& [id, e] : owners_) {
    rows.push_back({id, {e.forks.begin(), e.forks.end()}, e.creating});
  }
  return rows;
}

std::vector<RRefContext::UserRow> RRefContext::unconfirmedTable() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<UserRow> rows;
  for (const auto& [fork, u] : unconfirmed_) rows.push_back({fork, u.id, u.ownerId});
  return rows;
}

}  // namespace torchrpc
