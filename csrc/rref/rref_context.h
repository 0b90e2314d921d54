#pragma once

// The RRef protocol's state on one worker, owned by its Agent, which gives it
// the worker's identity and a way to send (the RRef layer sits below the
// agent and knows nothing else of it).
//
// Tables:
//   owners_        value this worker owns -> the user forks registered for it.
//                  An entry lives while it has forks or a remote() is still
//                  creating its value; then the owner lets go of the value.
//   children_      forks this worker (a user) sent to another worker: the
//                  parent keeps its reference alive until the child is
//                  confirmed (RREF_CHILD_ACCEPT), so the owner never sees
//                  zero forks while a child is in flight.
//   unconfirmed_   user forks not yet confirmed by the owner; a drop is
//                  deferred until confirmation.
//
// Messages: the creator's fork is registered by SCRIPT/PYTHON_REMOTE_CALL and
// confirmed by REMOTE_RET. A fork sent by a user: the child asks the owner
// (RREF_FORK_REQUEST, answered RREF_ACK), then tells the parent
// (RREF_CHILD_ACCEPT). A fork sent by the owner is registered when sent. A
// fork that lands on the owner just tells the parent. Drops: RREF_USER_DELETE.

#include <functional>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "futures.h"
#include "rref/rref.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {

// While a request is decoded in this scope, the user RRefs it carries that
// the owner has not confirmed yet are noted; waitConfirmed() then waits for
// their confirmations, so the call sees confirmed_by_owner() as in torch.
class ReceivedForks {
 public:
  ReceivedForks();
  ~ReceivedForks();
  ReceivedForks(const ReceivedForks&) = delete;
  ReceivedForks& operator=(const ReceivedForks&) = delete;
  // Waits for the forks noted on this thread since the scope began.
  static void waitConfirmed();
  // True if any were noted (the common case is none: nothing to wait for).
  static bool any();

 private:
  bool previous_;
};

// While a request to worker `to` is encoded in this scope, user RRefs that
// `to` owns travel by id, with no fork and no protocol messages: the scope
// keeps them (take()), and the caller holds them until the reply, which
// keeps the owner's value alive as a fork in flight would.
class SendingTo {
 public:
  explicit SendingTo(int64_t to);
  ~SendingTo();
  SendingTo(const SendingTo&) = delete;
  SendingTo& operator=(const SendingTo&) = delete;
  std::vector<RRefPtr> take();

 private:
  int64_t previous_;
};

struct RRefDebugInfo {
  int64_t ownedValues;    // owners_ entries
  int64_t userForks;      // forks registered with this owner, over all values
  int64_t pendingChildren;
  int64_t unconfirmedUsers;
  int64_t liveUsers;      // user RRef objects alive on this worker
};

class RRefContext : public std::enable_shared_from_this<RRefContext> {
 public:
  // `send` sends a request and returns the future of its response
  // (Agent::send); `sendReliably` resends a control message until it is
  // answered (Agent::sendReliably).
  using Send =
      std::function<FuturePtr(int64_t to, Message&& request, double timeoutSeconds, const std::string& what)>;
  using SendReliably = std::function<FuturePtr(int64_t to, Message&& request, const std::string& what)>;
  RRefContext(int64_t selfId, std::string selfName, Send send, SendReliably sendReliably);

  // How this worker's messages carry RRefs: forked on the way out (fork),
  // registered on the way in (unfork). Never null; lives as long as *this.
  const ObjectCodec* objectCodec() const { return &objectCodec_; }

  GloballyUniqueId newId();
  // RRef(value): a local owner reference with its value set.
  RRefPtr createLocalOwner(c10::IValue value, bool isPython);
  // remote(): `request` is built from the new ids; the result is a user
  // reference, or the owner reference when `to` is this worker.
  RRefPtr remote(int64_t to, const std::function<Message(const RRefId&, const ForkId&)>& request,
                 bool isPython, double timeoutSeconds, const std::string& what);

  // Sending an RRef inside a message: registers the new fork and returns the
  // tuple the receiver passes to unfork().
  c10::IValue fork(const RRefPtr& rref);
  RRefPtr unfork(const c10::IValue& info);

  // Owner side of the protocol. Each returns the reply to send.
  // SCRIPT/PYTHON_REMOTE_CALL: the owner entry that will hold the value.
  // `holder` is the worker that holds the fork (the caller).
  RRefPtr ownerForRemoteCall(const RRefId& id, const ForkId& forkId, bool isPython, int64_t holder);
  // The owner entry to fetch from, created if the remote() that makes it
  // has not been served yet.
  RRefPtr ownerForFetch(const RRefId& id);
  void onForkRequest(const RRefId& id, const ForkId& forkId, int64_t holder);
  // `peer` was declared lost: the forks it held of our values are released,
  // and so are the references we kept for it (children it would confirm,
  // users of values it owns awaiting confirmation).
  void onPeerLost(int64_t peer);
  void onUserDelete(const RRefId& id, const ForkId& forkId);
  void onChildAccept(const ForkId& forkId);

  // Called by a user RRef's destructor.
  void userDropped(const RRefId& id, int64_t ownerId, const ForkId& forkId);
  void userCreated() { liveUsers_.fetch_add(1); }

  // Fetches a value: to_here(). Completes with the IValue, or for Python
  // values with (pickled, tensors).
  c10::intrusive_ptr<c10::ivalue::Future> fetch(const RRefPtr& rref, double timeoutSeconds);

  RRefDebugInfo debugInfo();
  // The tables themselves, for torchrpc.debug_info() and inspect.
  struct OwnedRow {
    RRefId id;
    std::vector<std::pair<ForkId, int64_t>> forks;  // fork, worker holding it (-1: unknown)
    int64_t creating;
  };
  struct UserRow {
    ForkId fork;
    RRefId id;
    int64_t owner;
  };
  std::vector<OwnedRow> ownedTable();
  std::vector<UserRow> unconfirmedTable();
  // Drops every owned value and held fork (at shutdown).
  void clear();

 private:
  struct OwnerEntry {
    RRefPtr rref;
    // Each fork and the worker holding it (-1 where the owner sent the fork
    // itself and did not learn where it went).
    std::unordered_map<ForkId, int64_t, GloballyUniqueIdHash> forks;
    int64_t creating = 0;  // remote() calls still producing the value
    // Made by a fork request or fetch that overtook the remote() call which
    // creates the value (requests run concurrently); kept until that call.
    bool awaitingRemoteCall = false;
  };
  RRefPtr getOrCreateOwnerLocked(const RRefId& id, bool isPython);
  // For messages about a value a remote() call may not have created yet.
  RRefPtr ownerAheadOfCreationLocked(const RRefId& id);
  // Erases an entry nobody needs any more; returns the ref to drop unlocked.
  RRefPtr maybeEraseLocked(const RRefId& id);
  void confirmUser(const ForkId& forkId);
  void sendControl(int64_t to, Message&& message, const std::string& what,
                   std::function<void()> onAck = nullptr, std::function<void()> onFail = nullptr);

  const int64_t selfId_;
  const std::string selfName_;
  Send send_;
  SendReliably sendReliably_;
  ObjectCodec objectCodec_;
  std::mutex mu_;
  // RRef and fork ids share one counter from 0, as in torch, so an RRef
  // prints with the ids a torch program sees (kNoFork and kSentToOwner are
  // negative, never issued).
  std::atomic<int64_t> nextLocalId_{0};
  std::atomic<int64_t> liveUsers_{0};
  std::unordered_map<RRefId, OwnerEntry, GloballyUniqueIdHash> owners_;
  std::unordered_map<ForkId, RRefPtr, GloballyUniqueIdHash> children_;
  // Forks whose USER_DELETE arrived, remembered so that a late duplicate of
  // their FORK_REQUEST is ignored (bounded; oldest forgotten first).
  static constexpr size_t kRememberedDeletes = 1 << 14;
  std::unordered_set<ForkId, GloballyUniqueIdHash> deletedForks_;
  std::deque<ForkId> deletedOrder_;
  struct Unconfirmed {
    RRefId id;
    int64_t ownerId = -1;
    c10::weak_intrusive_ptr<RRef> user{c10::intrusive_ptr<RRef>()};
    bool dropped = false;
  };
  std::unordered_map<ForkId, Unconfirmed, GloballyUniqueIdHash> unconfirmed_;
};

}  // namespace torchrpc
