#pragma once

// The RPC agent: owns this worker's transport, its table of requests in
// flight, its function registry and its thread pool. Nothing here is global;
// the Python layer holds the one Agent that init_rpc creates.
//
// Contract: every future send() returns completes exactly once, with the
// response's value or an RpcError (timeout, peer lost, remote error,
// shutdown).

#include <ATen/core/ivalue.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <unordered_set>
#include <optional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "agent/code_cache.h"
#include "agent/function_registry.h"
#include "agent/metrics.h"
#include "agent/remote_profiling.h"
#include "agent/param_store.h"
#include "autograd/dist_autograd.h"
#include "messages/control.h"
#include "messages/python_call.h"
#include "messages/script_call.h"
#include "messages/with_code.h"
#include "agent/thread_pool.h"
#include "agent/transport.h"
#include "agent/transport_set.h"
#include "rref/rref_context.h"

namespace torchrpc {


struct WorkerInfo {
  std::string name;
  int64_t id = -1;
  std::string address;
  bool pythonUdf = false;
};

struct AgentOptions {
  int64_t numWorkerThreads = 16;
  double rpcTimeoutSeconds = 60.0;  // default for calls that pass none
  bool pythonUdf = false;           // run PYTHON_CALLs from peers
  bool acceptCode = false;          // load code shipped by value (WITH_CODE)
  size_t codeCacheSize = 64;        // shipped code kept loaded, least recently used out
  bool metrics = true;              // count calls and time them (Metrics)
  // The job's credentials, handshake, liveness and size limits, common to
  // every transport (selfName and credentials.selfId are filled in by the
  // agent).
  TransportOptions transport;
  // The transports to listen on and dial with, in order of preference
  // (tcpTransport(...), shmTransport(...)).
  std::vector<TransportFactory> transports;
  // Fault injection for tests, e.g. "RREF_USER_DELETE:drop:0.2" (faulty_transport.h).
  std::string faults;
};

// What only Python can do, installed by the Python bindings (each takes the
// GIL itself): run a PYTHON_CALL and return its PYTHON_RET or EXCEPTION, or
// nullopt when the function is async_execution and `respond` will be called
// once its future completes; run a PYTHON_REMOTE_CALL and return a future of
// the Python object (as an IValue) to own, failing with RpcError(kRemote) if
// it raised; pickle an owned Python object.
using Responder = std::function<void(Message&&)>;
struct PythonHooks {
  std::function<std::optional<Message>(Message&& request, const Responder& respond)> runCall;
  std::function<FuturePtr(PickledValue&& call)> runRemote;
  std::function<PickledValue(const c10::IValue& value)> pickle;
  // Called inside a catch block: the Python class, message and traceback of
  // the exception being handled if it came from Python code run by C++
  // (a Python autograd function in a backward pass), else nullopt.
  std::function<std::optional<RemoteException>()> describeError;
};

class Agent {
 public:
  Agent(WorkerInfo self, AgentOptions options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Where peers dial this agent (publish it at rendezvous).
  std::string address() const { return transport_->address(); }
  // The world, indexed by worker id; called once after rendezvous.
  void setWorkers(std::vector<WorkerInfo> workers);
  const WorkerInfo& self() const { return self_; }
  const WorkerInfo& worker(int64_t id) const;
  const std::vector<WorkerInfo>& workers() const { return workers_; }
  const AgentOptions& options() const { return options_; }
  FunctionRegistry& registry() { return registry_; }
  ParamStore& params() { return params_; }
  void setPythonHooks(PythonHooks hooks) { python_ = std::move(hooks); }
  RRefContext& rrefs() { return *rrefs_; }
  DistAutograd& autograd() { return *autograd_; }

  // Sends a request; the future completes with the response's value.
  // timeoutSeconds < 0 takes the default, 0 waits forever. `what` names the
  // call in errors (a function's name).
  FuturePtr send(int64_t to, Message&& request, double timeoutSeconds, const std::string& what);
  // send() for control messages that must arrive (RRef protocol, autograd
  // cleanup): resent with a new id after each timeout (1 s, doubling to
  // 8 s) until answered, the peer is lost or the agent stops. The receiver
  // must treat repeats as no-ops.
  FuturePtr sendReliably(int64_t to, Message&& request, const std::string& what);
  // A SCRIPT_CALL. With `code`, of code shipped by value (qualifiedName is
  // code->id): the archive goes along until `to` confirmed holding it, and a
  // call the callee no longer holds the code for (evicted) is sent again
  // with it.
  FuturePtr scriptCall(int64_t to, std::string qualifiedName, std::vector<c10::IValue> stack,
                       double timeoutSeconds, const ShippedCode* code = nullptr);
  // `call` (a SCRIPT_CALL or SCRIPT_REMOTE_CALL) as it goes to `to`: wrapped
  // with `code` unless `to` is known to hold it.
  Message withCode(int64_t to, Message&& call, const ShippedCode* code);
  // A registered function, builtin operator or shipped code; null if none.
  std::shared_ptr<Callable> findCallable(const std::string& name) {
    return isCodeId(name) ? code_->find(name) : registry_.find(name);
  }
  CodeCache& codeCache() { return *code_; }
  Metrics& metrics() { return metrics_; }
  // Calls sent while a profiler is on travel as RUN_WITH_PROFILING_REQ.
  void setProfileRemote(bool on) { profileRemote_.store(on); }
  bool profileRemote() const { return profileRemote_.load(); }
  // The profiles responses brought back since the last take.
  std::vector<RemoteProfile> takeRemoteProfiles() {
    std::lock_guard<std::mutex> g(profilesMu_);
    std::vector<RemoteProfile> out(std::make_move_iterator(profiles_.begin()),
                                   std::make_move_iterator(profiles_.end()));
    profiles_.clear();
    return out;
  }
  // Waits for `future`, the reply to a request sent to `to`: for up to
  // kSyncSpinNs it reads the connection itself where the transport allows
  // (Connection::poll), else spins, then sleeps until completion.
  void waitForReply(const FuturePtr& future, int64_t to);

  // Backward from the tensor `owner` holds (waiting for it if still being
  // created): within autograd context `contextId`, or a plain local backward
  // for -1. RREF_BACKWARD_REQ and RRef.backward() on the owner.
  FuturePtr rrefBackward(const RRefPtr& owner, int64_t contextId, bool retainGraph);

  // Runs `task` on the agent's callback threads: futures handed to Python
  // complete there, never on a connection's reader thread, so a callback
  // that makes another call and waits for it cannot block the thread that
  // would read the reply.
  // Runs it inline once the agent is shutting down.
  void defer(std::function<void()> task) {
    if (!callbacks_->submit(task)) task();
  }

  // Gives up a pending call: fails its future with RpcError(kCancelled) and
  // asks the callee to drop it. True if the callee says it never ran; false
  // if it ran, already answered, or the callee could not be asked.
  bool cancel(const FuturePtr& future);
  // A future handed out in place of a request's own (completed from it):
  // cancel() accepts it too.
  void alias(const FuturePtr& visible, const FuturePtr& request) {
    std::lock_guard<std::mutex> g(mu_);
    aliases_[visible.get()] = request;
  }
  void unalias(const FuturePtr& visible) {
    std::lock_guard<std::mutex> g(mu_);
    aliases_.erase(visible.get());
  }

  // Peers declared lost (their connection broke or went silent without a
  // SHUTDOWN_NOTICE), with why; and peers that said they shut down.
  std::map<int64_t, std::string> lostPeers();
  std::vector<int64_t> leftPeers();
  // Dials every peer we have no connection to, in the background, so a peer
  // that died before ever talking to us is noticed (refused, or silent).
  void probePeers();

  // The connections this agent dialed: peer id, transport, its counters.
  struct ConnectionInfo {
    int64_t peer;
    std::string transport;
    std::vector<std::pair<std::string, int64_t>> stats;
  };
  std::vector<ConnectionInfo> connections();
  // Requests served on the thread that received them (mayServeInline).
  uint64_t servedInline() const { return servedInline_.load(); }
  // Messages and their bytes (payload plus tensor data) to and from each
  // peer, requests and responses alike.
  struct Traffic {
    std::atomic<uint64_t> messagesSent{0}, bytesSent{0}, messagesReceived{0}, bytesReceived{0};
    std::atomic<int64_t> lastReceivedNs{0};  // steady clock; heartbeats count
  };
  // Requests this worker waits on (outgoing) and serves (incoming), with
  // their age in seconds: what a stuck worker is waiting for.
  struct InFlight {
    bool outgoing;
    int64_t id, peer;
    std::string what, state;  // state: waiting | queued | running | cancelled
    double ageSeconds;
  };
  std::vector<InFlight> requestsInFlight();
  // Each peer's connection as this worker sees it.
  struct PeerState {
    int64_t peer;
    std::string state;  // idle (never dialed) | connecting | connected | left | lost
    std::string transport, why;
    double lastHeardSeconds;  // since its last message (heartbeats included); -1: never
  };
  std::vector<PeerState> peerStates();
  const Traffic* traffic(int64_t peer) const {
    return peer >= 0 && static_cast<size_t>(peer) < trafficSize_.load(std::memory_order_acquire)
               ? &traffic_[peer] : nullptr;
  }

  // Requests of ours still waiting for a response.
  size_t pendingCount();
  // Waits until pendingCount() is 0; false if the timeout passed first.
  bool waitUntilIdle(double timeoutSeconds);
  // Closes every connection now; pending and later calls fail with
  // RpcError(kShutdown). Idempotent; never blocks on peers.
  void shutdown();
  bool running() const { return !stopped_.load(); }

 private:
  struct Pending {
    FuturePtr future;
    int64_t peer;
    std::string what;
    std::multimap<std::chrono::steady_clock::time_point, int64_t>::iterator deadline;
    double timeoutSeconds;  // 0: none
    std::string codeId;     // of the code a WITH_CODE request carried
    CallStats* stats = nullptr;  // this function with this peer (metrics_)
    std::chrono::steady_clock::time_point sentAt;
    int64_t profiledSentNs = 0;  // wall clock, for a RUN_WITH_PROFILING_REQ
    uint64_t profiledThread = 0;  // the sending thread, whose profiler range the events belong to
  };
  // Records how a pending request ended: its latency, and its error if any.
  void settled(const Pending& p, const ErrorKind* error);

  void onMessage(const std::shared_ptr<Connection>& conn, Message&& message);
  void onClosed(const std::shared_ptr<Connection>& conn, CloseReason reason, const std::string& why);
  void markLost(int64_t peer, const std::string& why);
  // CANCEL from a peer: drop or disown request `id`; true if it never ran.
  bool onCancel(const Connection* conn, int64_t id);
  // Sends CANCEL for our request `id` if a connection to `peer` is open.
  void sendCancel(int64_t peer, int64_t id);
  void completeResponse(Message&& response);
  void serveRequest(const std::shared_ptr<Connection>& conn, Message&& request,
                    std::chrono::steady_clock::time_point received);
  // Whether `request` may be served on the transport thread that received
  // it (a short, non-blocking script call; see Callable::mayRunInline).
  bool mayServeInline(const Message& request);
  // The response, or nullopt when `respond` will be called later.
  std::optional<Message> runRequest(Message& request, int64_t from, const Responder& respond);
  c10::IValue runScript(ScriptCall& call);
  // WITH_CODE: refuses (before loading anything) unless acceptCode, else
  // installs the code and returns the call it wraps.
  Message acceptCode(Message&& request);
  FuturePtr sendScript(int64_t to, const std::string& name, std::vector<c10::IValue> stack, double timeoutSeconds,
                       const ShippedCode* code);
  void count(int64_t peer, const Message& m, bool sent);
  RpcError pythonDisabled() const;
  // The EXCEPTION to send for the exception being handled.
  Message describeError() const;
  void reply(const std::shared_ptr<Connection>& conn, Message&& response, int64_t id);
  std::shared_ptr<Connection> connectionTo(int64_t to);
  void failPending(const std::function<bool(const Pending&)>& which, ErrorKind kind,
                   const std::string& why);
  void timeoutLoop();
  std::string describe(const Pending& p) const;

  WorkerInfo self_;
  AgentOptions options_;
  std::vector<WorkerInfo> workers_;
  FunctionRegistry registry_;
  std::unique_ptr<CodeCache> code_;
  Metrics metrics_;
  std::atomic<bool> profileRemote_{false};
  std::mutex profilesMu_;
  std::deque<RemoteProfile> profiles_;  // bounded by kMaxProfiles
  CodeLedger ledger_;
  std::unique_ptr<Traffic[]> traffic_;
  std::atomic<size_t> trafficSize_{0};
  ParamStore params_;
  PythonHooks python_;
  std::shared_ptr<RRefContext> rrefs_;
  std::unique_ptr<DistAutograd> autograd_;
  std::atomic<bool> stopped_{false};
  std::atomic<int64_t> nextMessageId_{1};
  std::atomic<uint64_t> servedInline_{0};

  std::mutex connMu_;  // guards outgoing_, connecting_, lost_, left_
  std::condition_variable connCv_;
  std::unordered_map<int64_t, std::shared_ptr<Connection>> outgoing_;
  std::unordered_set<int64_t> connecting_;  // dials in progress
  std::map<int64_t, std::string> lost_;
  std::atomic<size_t> lostCount_{0};  // lost_.size(), read without the lock per message
  std::unordered_set<int64_t> left_;

  // Requests from peers being served, by (connection, peer, message id):
  // CANCEL finds them here, and a duplicate of one is ignored. Recently
  // finished ones are remembered a while, so a late duplicate is ignored too.
  // Keyed by connection, not peer alone: ids are unique per sending agent,
  // and only a connection is sure to carry one agent's messages.
  enum class Serving : uint8_t { kQueued, kRunning, kCancelled };
  struct PeerMessage {
    uint64_t conn;  // Connection::serial()
    int64_t peer, id;
    bool operator==(const PeerMessage& o) const { return conn == o.conn && peer == o.peer && id == o.id; }
  };
  struct PeerMessageHash {
    size_t operator()(const PeerMessage& k) const {
      return std::hash<int64_t>()(k.id * 131 + k.peer) ^ std::hash<uint64_t>()(k.conn * 0x9E3779B97F4A7C15ull);
    }
  };
  // False if this request is a duplicate of one seen recently.
  bool startServing(const PeerMessage& key);
  // True if the request was cancelled meanwhile (its reply is dropped).
  bool finishServing(const PeerMessage& key);
  std::mutex servingMu_;
  struct ServingEntry {
    Serving state;
    std::chrono::steady_clock::time_point since;  // arrival
    std::string what;                             // set when it starts running
  };
  std::unordered_map<PeerMessage, ServingEntry, PeerMessageHash> serving_;
  std::unordered_set<PeerMessage, PeerMessageHash> recent_;
  std::deque<PeerMessage> recentOrder_;

  std::mutex mu_;  // guards pending_ and deadlines_
  std::condition_variable idleCv_;
  std::condition_variable timerCv_;
  std::unordered_map<int64_t, Pending> pending_;
  std::multimap<std::chrono::steady_clock::time_point, int64_t> deadlines_;
  std::unordered_map<const c10::ivalue::Future*, FuturePtr> aliases_;

  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<ThreadPool> callbacks_;
  // Requests may arrive between publishing our address and learning the
  // world (setWorkers); they wait here, since serving them may need to
  // address other workers (RRef forks).
  std::mutex workersMu_;
  std::condition_variable workersCv_;
  std::atomic<bool> workersSet_{false};  // read without the lock on every request
  std::unique_ptr<TransportSet> transport_;
  std::thread timer_;
};

}  // namespace torchrpc
