#include "agent/agent.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/jit_exception.h>
#include <torch/csrc/profiler/api.h>

#include "agent/current_agent.h"
#include "agent/faulty_transport.h"
#include "messages/profiling_wrap.h"
#include "messages/control.h"

namespace torchrpc {
namespace {

// How many finished requests per agent are remembered to ignore duplicates.
constexpr size_t kRecentRequests = 4096;
// Requests larger than this always go to a worker thread.
constexpr uint64_t kInlineRequestBytes = 64 * 1024;
// Requests that run something on the callee: what remote profiling wraps.
bool isCall(MessageType t) {
  return t == MessageType::kScriptCall || t == MessageType::kPythonCall || t == MessageType::kScriptRemoteCall ||
         t == MessageType::kPythonRemoteCall || t == MessageType::kWithCode;
}

std::string servedName(const Message& request) {
  if (auto name = ScriptCall::peekName(request)) return *name;
  return messageTypeName(request.type);
}

// Remote profiles kept until Python takes them; beyond, the oldest are dropped.
constexpr size_t kMaxProfiles = 100000;
// Threads that complete futures handed to Python (see Agent::defer).
constexpr size_t kCallbackThreads = 4;
// How long a request that arrived before setWorkers waits for it.
constexpr auto kWorkersWait = std::chrono::seconds(120);

const char* kindName(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kDecode: return "torchrpc.DecodeError";
    case ErrorKind::kTimeout: return "torchrpc.RpcTimeoutError";
    case ErrorKind::kPeerLost: return "torchrpc.PeerLostError";
    case ErrorKind::kShutdown: return "torchrpc.RpcShutdownError";
    case ErrorKind::kArgument: return "torchrpc.ArgumentError";
    case ErrorKind::kNotFound: return "torchrpc.FunctionNotFoundError";
    case ErrorKind::kForbidden: return "torchrpc.PythonCallDisabledError";
    case ErrorKind::kAuth: return "torchrpc.AuthenticationError";
    case ErrorKind::kCancelled: return "torchrpc.RpcCancelledError";
    case ErrorKind::kCodeRefused: return "torchrpc.CodeRefusedError";
    case ErrorKind::kRemote:
    case ErrorKind::kRpc: break;
  }
  return "torchrpc.RpcError";
}

// Agent-level failures travel as "torchrpc.<Class>" and come back as that
// kind, so a caller sees ArgumentError, not a generic remote error.
bool kindFromName(const std::string& name, ErrorKind& kind) {
  for (ErrorKind k : {ErrorKind::kDecode, ErrorKind::kTimeout, ErrorKind::kPeerLost,
                      ErrorKind::kShutdown, ErrorKind::kArgument, ErrorKind::kNotFound,
                      ErrorKind::kForbidden, ErrorKind::kAuth, ErrorKind::kCancelled, ErrorKind::kCodeRefused,
                      ErrorKind::kRpc}) {
    if (name == kindName(k)) {
      kind = k;
      return true;
    }
  }
  return false;
}

// Turns whatever a request threw into the EXCEPTION message sent back.
RemoteException describeCurrentException() {
  try {
    throw;
  } catch (const RpcError& e) {
    if (e.kind() == ErrorKind::kRemote) return {e.remoteType(), e.what(), e.remoteTraceback()};
    return {kindName(e.kind()), e.what(), e.remoteTraceback()};
  } catch (const torch::jit::JITException& e) {
    std::string type = e.getPythonClassName().value_or("builtins.RuntimeError");
    return {type, e.getOriginalMsg().value_or(e.what()), e.what()};
  } catch (const c10::ValueError& e) {
    return {"builtins.ValueError", e.what_without_backtrace(), e.what()};
  } catch (const c10::TypeError& e) {
    return {"builtins.TypeError", e.what_without_backtrace(), e.what()};
  } catch (const c10::IndexError& e) {
    return {"builtins.IndexError", e.what_without_backtrace(), e.what()};
  } catch (const c10::NotImplementedError& e) {
    return {"builtins.NotImplementedError", e.what_without_backtrace(), e.what()};
  } catch (const c10::Error& e) {
    return {"builtins.RuntimeError", e.what_without_backtrace(), e.what()};
  } catch (const std::exception& e) {
    return {"builtins.RuntimeError", e.what(), ""};
  } catch (...) {
    return {"builtins.RuntimeError", "unknown C++ exception", ""};
  }
}

// A Python result as the future's value: (pickled, tensors), unpickled by
// the Python layer under the GIL.
c10::IValue pickledTuple(PickledValue& v) {
  return c10::IValue(c10::ivalue::Tuple::create(c10::IValue(std::move(v.bytes)),
                                                c10::IValue(c10::List<at::Tensor>(std::move(v.tensors)))));
}

}  // namespace

Agent::Agent(WorkerInfo self, AgentOptions options)
    : self_(std::move(self)), options_(std::move(options)) {
  self_.pythonUdf = options_.pythonUdf;
  code_ = std::make_unique<CodeCache>(options_.codeCacheSize);
  pool_ = std::make_unique<ThreadPool>(static_cast<size_t>(std::max<int64_t>(1, options_.numWorkerThreads)));
  callbacks_ = std::make_unique<ThreadPool>(kCallbackThreads);
  TransportCallbacks callbacks;
  callbacks.onMessage = [this](const std::shared_ptr<Connection>& c, Message&& m) { onMessage(c, std::move(m)); };
  callbacks.onClosed = [this](const std::shared_ptr<Connection>& c, CloseReason reason, const std::string& why) {
    onClosed(c, reason, why);
  };
  callbacks.onRejected = [this] { metrics_.handshakeFailed(); };
  TransportOptions transport = options_.transport;
  transport.selfName = self_.name;
  transport.credentials.selfId = self_.id;
  if (transport.credentials.secret.empty()) {
    throw RpcError(ErrorKind::kAuth, "torchrpc: an agent needs a secret to authenticate its peers");
  }
  std::vector<std::unique_ptr<Transport>> transports;
  for (const TransportFactory& make : options_.transports) {
    transports.push_back(withFaults(make, options_.faults)(transport, callbacks));
  }
  transport_ = std::make_unique<TransportSet>(std::move(transports));
  self_.address = transport_->address();
  rrefs_ = std::make_shared<RRefContext>(
      self_.id, self_.name,
      [this](int64_t to, Message&& m, double timeout, const std::string& what) {
        return send(to, std::move(m), timeout, what);
      },
      [this](int64_t to, Message&& m, const std::string& what) { return sendReliably(to, std::move(m), what); });
  autograd_ = std::make_unique<DistAutograd>(
      self_.id, [this](int64_t to, Message&& m, const std::string& what) {
        if (m.type == MessageType::kCleanupAutogradContextReq) return sendReliably(to, std::move(m), what);
        return send(to, std::move(m), -1, what);
      });
  timer_ = std::thread([this] { timeoutLoop(); });
}

Agent::~Agent() { shutdown(); }

void Agent::setWorkers(std::vector<WorkerInfo> workers) {
  for (size_t i = 0; i < workers.size(); ++i) {
    TORCH_CHECK(workers[i].id == static_cast<int64_t>(i), "workers must be indexed by id");
  }
  if (trafficSize_.load() == 0) {
    traffic_ = std::make_unique<Traffic[]>(workers.size());
    trafficSize_.store(workers.size(), std::memory_order_release);
  }
  {
    std::lock_guard<std::mutex> g(workersMu_);
    workers_ = std::move(workers);
    workersSet_ = true;
  }
  workersCv_.notify_all();
}

const WorkerInfo& Agent::worker(int64_t id) const {
  if (id < 0 || id >= static_cast<int64_t>(workers_.size())) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: no worker with id " + std::to_string(id));
  }
  return workers_[id];
}

std::shared_ptr<Connection> Agent::connectionTo(int64_t to) {
  const WorkerInfo& peer = worker(to);
  std::unique_lock<std::mutex> g(connMu_);
  for (;;) {
    auto it = outgoing_.find(to);
    if (it != outgoing_.end()) return it->second;
    if (!connecting_.count(to)) break;
    connCv_.wait(g);  // one dial per peer at a time
  }
  connecting_.insert(to);
  g.unlock();
  std::shared_ptr<Connection> conn;
  std::exception_ptr failure;
  std::string why;
  try {
    if (stopped_.load()) throw RpcError(ErrorKind::kShutdown, "torchrpc: RPC is shut down");
    conn = transport_->connect(peer.address, to, peer.name);
  } catch (const RpcError& e) {
    if (e.kind() == ErrorKind::kPeerLost) {
      why = e.what();
      failure = std::make_exception_ptr(RpcError(
          ErrorKind::kPeerLost, "torchrpc: cannot reach worker '" + peer.name + "' at " + peer.address + ": " + why));
    } else {
      failure = std::current_exception();
    }
  }
  g.lock();
  connecting_.erase(to);
  if (conn) {
    outgoing_[to] = conn;
    lost_.erase(to);  // reachable again (a healed partition)
  } else if (!why.empty() && !left_.count(to) && !stopped_.load()) {
    lost_.emplace(to, why);
  }
  lostCount_ = lost_.size();
  const bool lost = !conn && lost_.count(to);
  connCv_.notify_all();
  g.unlock();
  if (lost) rrefs_->onPeerLost(to);
  if (failure) std::rethrow_exception(failure);
  return conn;
}

std::string Agent::describe(const Pending& p) const {
  const std::string& peer = p.peer < static_cast<int64_t>(workers_.size()) ? workers_[p.peer].name : "?";
  return "'" + p.what + "' on worker '" + peer + "'";
}

FuturePtr Agent::send(int64_t to, Message&& request, double timeoutSeconds, const std::string& what) {
  if (stopped_.load()) {
    throw RpcError(ErrorKind::kShutdown, "torchrpc: cannot call '" + what + "': RPC is shut down");
  }
  const WorkerInfo& peer = worker(to);
  auto future = c10::make_intrusive<c10::ivalue::Future>(c10::AnyType::get());
  if (timeoutSeconds < 0) timeoutSeconds = options_.rpcTimeoutSeconds;
  ProfilerRange range("torchrpc::send#", what);
  // A call carrying code: once answered, `to` holds that code.
  std::string codeId = request.type == MessageType::kWithCode ? shippedCodeId(request) : std::string();
  const bool profiled = profileRemote_.load(std::memory_order_relaxed) && isCall(request.type) &&
                        torch::profiler::impl::profilerEnabled();
  const int64_t contextId = AutogradContexts::current();
  if (contextId >= 0 && DistAutograd::carriesContext(request.type)) {
    request = autograd_->wrapRequest(contextId, to, std::move(request));
  }
  const int64_t id = nextMessageId_.fetch_add(1);
  if (profiled) request = wrapForProfiling(MessageType::kRunWithProfilingReq, "", {self_.id, id}, std::move(request));
  request.id = id;
  {
    std::lock_guard<std::mutex> g(mu_);
    Pending p{future, to, what, deadlines_.end(), timeoutSeconds, std::move(codeId)};
    p.sentAt = std::chrono::steady_clock::now();
    if (options_.metrics) {
      p.stats = &metrics_.sent(what, to);
      p.stats->calls.fetch_add(1, std::memory_order_relaxed);
    }
    if (profiled) {
      p.profiledSentNs = wallNs();
      p.profiledThread = at::RecordFunction::currentThreadId();
    }
    if (timeoutSeconds > 0) {
      auto when = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeoutSeconds));
      p.deadline = deadlines_.emplace(when, id);
      if (p.deadline == deadlines_.begin()) timerCv_.notify_one();
    }
    pending_.emplace(id, std::move(p));
  }
  std::shared_ptr<Connection> conn;
  try {
    conn = connectionTo(to);
    conn->send(request);
    count(to, request, true);
  } catch (const RpcError& e) {
    std::unique_lock<std::mutex> g(mu_);
    auto it = pending_.find(id);
    const bool failed = it == pending_.end();  // already, by onClosed
    Pending p;
    if (!failed) {
      if (it->second.timeoutSeconds > 0) deadlines_.erase(it->second.deadline);
      p = std::move(it->second);
      pending_.erase(it);
      if (pending_.empty()) idleCv_.notify_all();
    }
    g.unlock();
    if (conn && e.kind() == ErrorKind::kPeerLost) {
      // The connection broke under us, maybe before its transport reported
      // it: closed here as that report would close it (the peer is judged
      // lost, every other call waiting on it fails now). The report, when
      // it comes, no longer finds the connection ours; forgetting it without
      // failing those calls left them waiting for their timeouts, or for
      // ever without one, and graceful shutdowns waiting for them.
      std::string why = e.what();
      onClosed(conn, CloseReason::kBroken, why.rfind("torchrpc: ", 0) == 0 ? why.substr(10) : why);
    }
    if (failed) return future;
    ErrorKind kind = e.kind();
    settled(p, &kind);
    if (e.kind() == ErrorKind::kPeerLost || e.kind() == ErrorKind::kAuth || e.kind() == ErrorKind::kShutdown) {
      std::string why = e.what();
      if (why.rfind("torchrpc: ", 0) == 0) why = why.substr(10);
      future->setError(std::make_exception_ptr(
          RpcError(e.kind(), "torchrpc: calling '" + what + "' on worker '" + peer.name + "': " + why)));
    } else {
      throw;  // the request itself could not be encoded: the caller's mistake
    }
  }
  return future;
}

namespace {
// One reliable send: attempts until answered or a non-timeout error.
struct Retry : std::enable_shared_from_this<Retry> {
  Agent* agent;
  int64_t to;
  Message request;
  std::string what;
  FuturePtr result = c10::make_intrusive<c10::ivalue::Future>(c10::AnyType::get());

  void attempt(double timeoutSeconds) {
    FuturePtr f;
    try {
      f = agent->send(to, Message(request), timeoutSeconds, what);
    } catch (...) {
      result->setErrorIfNeeded(std::current_exception());
      return;
    }
    f->addCallback([self = shared_from_this(), timeoutSeconds](c10::ivalue::Future& done) {
      if (!done.hasError()) {
        self->result->markCompleted(done.value());
        return;
      }
      bool timedOut = false;
      try {
        std::rethrow_exception(done.exception_ptr());
      } catch (const RpcError& e) {
        timedOut = e.kind() == ErrorKind::kTimeout;
      } catch (...) {
      }
      if (timedOut && self->agent->running()) {
        self->agent->defer([self, timeoutSeconds] { self->attempt(std::min(timeoutSeconds * 2, 8.0)); });
      } else {
        self->result->setErrorIfNeeded(done.exception_ptr());
      }
    });
  }
};
}  // namespace

FuturePtr Agent::sendReliably(int64_t to, Message&& request, const std::string& what) {
  auto retry = std::make_shared<Retry>();
  retry->agent = this;
  retry->to = to;
  retry->request = std::move(request);
  retry->what = what;
  retry->attempt(1.0);
  return retry->result;
}

FuturePtr Agent::sendScript(int64_t to, const std::string& name, std::vector<c10::IValue> stack,
                            double timeoutSeconds, const ShippedCode* code) {
  Message request;
  std::vector<RRefPtr> held;
  {
    SendingTo scope(to);
    request = ScriptCall(name, std::move(stack)).toMessage(rrefs_->objectCodec());
    held = scope.take();
  }
  if (code) request = withCode(to, std::move(request), code);
  FuturePtr fut = send(to, std::move(request), timeoutSeconds, name);
  if (!held.empty()) fut->addCallback([held = std::move(held)](c10::ivalue::Future&) {});
  return fut;
}

FuturePtr Agent::scriptCall(int64_t to, std::string qualifiedName, std::vector<c10::IValue> stack,
                            double timeoutSeconds, const ShippedCode* code) {
  if (!code) return sendScript(to, qualifiedName, std::move(stack), timeoutSeconds, nullptr);
  // With the archive (until `to` answered one such call, see completeResponse).
  if (!ledger_.holds(to, code->id)) return sendScript(to, qualifiedName, std::move(stack), timeoutSeconds, code);
  auto retryStack = stack;  // tensors are shared, not copied
  FuturePtr first = sendScript(to, qualifiedName, std::move(stack), timeoutSeconds, code);
  // Sent by name alone: if the callee evicted the code meanwhile, send it again.
  auto result = c10::make_intrusive<c10::ivalue::Future>(first->elementType());
  alias(result, first);
  first->addCallback([this, to, name = std::move(qualifiedName), retryStack = std::move(retryStack), code = *code,
                      timeoutSeconds, result](c10::ivalue::Future& f) mutable {
    bool evicted = false;
    if (f.hasError()) {
      try {
        std::rethrow_exception(f.exception_ptr());
      } catch (const RpcError& e) {
        evicted = e.kind() == ErrorKind::kNotFound;
      } catch (...) {
      }
    }
    unalias(result);
    if (!evicted) {
      completeFrom(c10::intrusive_ptr<c10::ivalue::Future>::reclaim_copy(&f), result);
      return;
    }
    try {  // completeResponse forgot that `to` held the code: this call carries it
      completeFrom(scriptCall(to, std::move(name), std::move(retryStack), timeoutSeconds, &code), result);
    } catch (...) {
      result->setErrorIfNeeded(std::current_exception());
    }
  });
  return result;
}

Message Agent::withCode(int64_t to, Message&& call, const ShippedCode* code) {
  if (!code || ledger_.holds(to, code->id)) return std::move(call);
  return wrapWithCode(*code, std::move(call));
}

Message Agent::acceptCode(Message&& request) {
  if (!options_.acceptCode) {
    throw RpcError(ErrorKind::kCodeRefused, "torchrpc: worker '" + self_.name +
                                                "' does not accept code shipped by value (start it with "
                                                "RpcOptions(accept_code=True)); nothing was loaded");
  }
  ShippedCode code;
  Message call = unwrapCode(std::move(request), code);
  code_->install(code.id, code.kind, code.archive);
  return call;
}

void Agent::count(int64_t peer, const Message& m, bool sent) {
  if (peer < 0 || static_cast<size_t>(peer) >= trafficSize_.load(std::memory_order_acquire)) return;
  uint64_t bytes = m.payload.size();
  for (const auto& t : m.tensors) bytes += t.nbytes();
  Traffic& t = traffic_[peer];
  (sent ? t.messagesSent : t.messagesReceived).fetch_add(1, std::memory_order_relaxed);
  (sent ? t.bytesSent : t.bytesReceived).fetch_add(bytes, std::memory_order_relaxed);
  if (!sent) t.lastReceivedNs.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
}

void Agent::onMessage(const std::shared_ptr<Connection>& conn, Message&& message) {
  count(conn->peerId(), message, false);
  if (isResponse(message.type)) {
    try {
      completeResponse(std::move(message));
    } catch (const std::exception& e) {
      // A callback of the completed future threw. The frame was fine, so
      // the connection stays open; the callback's owner has its error.
      TORCH_WARN("torchrpc: a callback on a response failed: ", e.what());
    }
    return;
  }
  const int64_t peer = conn->peerId();
  if (lostCount_.load(std::memory_order_relaxed) > 0) {
    std::lock_guard<std::mutex> g(connMu_);
    lost_.erase(peer);  // it is alive after all
    lostCount_ = lost_.size();
  }
  switch (message.type) {
    case MessageType::kShutdownNotice: {
      std::lock_guard<std::mutex> g(connMu_);
      left_.insert(peer);
      return;
    }
    case MessageType::kCancel: {
      bool neverRan = onCancel(conn.get(), Cancel::fromMessage(message)->value());
      if (message.id != 0) reply(conn, CancelRet(neverRan).toMessage(), message.id);
      return;
    }
    default:
      if (!startServing({conn->serial(), peer, message.id})) return;  // a duplicate
      const auto received = std::chrono::steady_clock::now();
      if (mayServeInline(message)) {
        servedInline_.fetch_add(1, std::memory_order_relaxed);
        serveRequest(conn, std::move(message), received);
        return;
      }
      pool_->submit([this, conn, m = std::move(message), received]() mutable {
        serveRequest(conn, std::move(m), received);
      });
  }
}

bool Agent::mayServeInline(const Message& request) {
  if (!workersSet_.load(std::memory_order_relaxed)) return false;
  if (request.type == MessageType::kSchemaQuery) {
    // A caller asks before its first call of a function: answered at once
    // where the name is known here, never queued behind calls that hold every
    // worker thread (a name not known yet goes to the resolver, which takes
    // the GIL, on a worker thread).
    try {
      auto query = SchemaQuery::fromMessage(request);
      const auto& name = query->value();
      return (isCodeId(name) ? code_->find(name) : registry_.findKnown(name)) != nullptr;
    } catch (const std::exception&) {
      return false;  // malformed: the worker thread answers with the error
    }
  }
  if (request.type != MessageType::kScriptCall) return false;
  uint64_t bytes = request.payload.size();
  for (const auto& t : request.tensors) bytes += t.nbytes();
  if (bytes > kInlineRequestBytes) return false;  // a large input may take long
  auto name = ScriptCall::peekName(request);
  if (!name) return false;
  // Never the resolver: it takes the GIL.
  auto callable = isCodeId(*name) ? code_->find(*name) : registry_.findKnown(*name);
  return callable && callable->mayRunInline();
}

bool Agent::startServing(const PeerMessage& key) {
  std::lock_guard<std::mutex> g(servingMu_);
  if (recent_.count(key)) return false;
  return serving_.emplace(key, ServingEntry{Serving::kQueued, std::chrono::steady_clock::now(), ""}).second;
}

bool Agent::finishServing(const PeerMessage& key) {
  std::lock_guard<std::mutex> g(servingMu_);
  auto it = serving_.find(key);
  bool cancelled = it != serving_.end() && it->second.state == Serving::kCancelled;
  if (it != serving_.end()) serving_.erase(it);
  if (recent_.insert(key).second) {
    recentOrder_.push_back(key);
    if (recentOrder_.size() > kRecentRequests) {
      recent_.erase(recentOrder_.front());
      recentOrder_.pop_front();
    }
  }
  return cancelled;
}

bool Agent::onCancel(const Connection* conn, int64_t id) {
  std::lock_guard<std::mutex> g(servingMu_);
  auto it = serving_.find(PeerMessage{conn->serial(), conn->peerId(), id});
  if (it == serving_.end()) return false;  // finished (or answered) already
  bool neverRan = it->second.state == Serving::kQueued;
  it->second.state = Serving::kCancelled;
  return neverRan;
}

void Agent::serveRequest(const std::shared_ptr<Connection>& conn, Message&& request,
                         std::chrono::steady_clock::time_point received) {
  const int64_t id = request.id;
  const int64_t peer = conn->peerId();
  const auto started = std::chrono::steady_clock::now();
  if (options_.metrics) {
    metrics_.queueWait(std::chrono::duration_cast<std::chrono::nanoseconds>(started - received).count());
  }
  // What it runs, for metrics and inspect: the function a call names, else
  // the message type (looked at again below if the request is wrapped).
  std::string what = servedName(request);
  const MessageType arrivedAs = request.type;
  bool cancelled = false;
  {
    std::lock_guard<std::mutex> g(servingMu_);
    auto it = serving_.find(PeerMessage{conn->serial(), peer, id});
    if (it != serving_.end()) {
      cancelled = it->second.state == Serving::kCancelled;
      it->second.state = Serving::kRunning;
      it->second.what = what;
    }
  }
  if (cancelled) {
    // The caller gave up before it started: never run, and remembered as
    // finished so that a late duplicate does not run it either.
    finishServing({conn->serial(), peer, id});
    return;
  }
  std::optional<AutogradHeader> autograd;
  std::optional<Message> response;
  // Set for a RUN_WITH_PROFILING_REQ: the events of the request, sent back
  // with its response (filled once the synchronous part has run).
  struct Profiled {
    GloballyUniqueId key;
    int64_t receivedNs;
    std::mutex mu;
    std::vector<EventCollector::Event> events;
    // While the synchronous part runs, a response given meanwhile (remote()'s
    // owner answers from inside the call) waits here for its events.
    bool running = false;
    std::optional<Message> early;
  };
  std::shared_ptr<Profiled> profiled;
  try {
    if (request.type == MessageType::kRunWithProfilingReq) {
      profiled = std::make_shared<Profiled>();
      std::string config;
      request = unwrapProfiling(std::move(request), config, profiled->key);
      profiled->receivedNs =
          wallNs() - std::chrono::duration_cast<std::chrono::nanoseconds>(started - received).count();
    }
    if (request.type == MessageType::kForwardAutogradReq) {
      autograd.emplace();
      request = autograd_->unwrap(std::move(request), *autograd);
    }
    if (request.type == MessageType::kWithCode) request = acceptCode(std::move(request));
  } catch (...) {
    response = describeCurrentException().toMessage();
  }
  if (request.type != arrivedAs) {  // unwrapped: name the call inside
    what = servedName(request);
    std::lock_guard<std::mutex> g(servingMu_);
    auto it = serving_.find(PeerMessage{conn->serial(), peer, id});
    if (it != serving_.end()) it->second.what = what;
  }
  CallStats* stats = nullptr;
  if (options_.metrics) {
    stats = &metrics_.served(what, peer);
    stats->calls.fetch_add(1, std::memory_order_relaxed);
  }
  // The response goes back wrapped when the request came wrapped; may be
  // called later, from another thread (async replies).
  Responder respond = [this, conn, id, peer, autograd, stats, started, profiled](Message&& response) {
    if (profiled) {
      std::lock_guard<std::mutex> g(profiled->mu);
      if (profiled->running) {
        profiled->early = std::move(response);
        return;
      }
    }
    if (stats) {
      stats->latency.observe(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count());
      if (response.type == MessageType::kException) stats->errors.fetch_add(1, std::memory_order_relaxed);
    }
    if (finishServing({conn->serial(), peer, id})) return;  // cancelled while running: the caller wants no answer
    if (autograd) {
      try {
        response = autograd_->wrapResponse(*autograd, std::move(response));
      } catch (...) {
        response = describeCurrentException().toMessage();
      }
    }
    if (profiled) {
      std::lock_guard<std::mutex> g(profiled->mu);
      response = wrapForProfiling(MessageType::kRunWithProfilingResp,
                                  profileJson(self_.name, profiled->receivedNs, wallNs(), profiled->events),
                                  profiled->key, std::move(response));
    }
    reply(conn, std::move(response), id);
  };
  if (!response && !workersSet_.load()) {
    std::unique_lock<std::mutex> g(workersMu_);
    if (!workersCv_.wait_for(g, kWorkersWait, [this] { return workersSet_.load() || stopped_.load(); })) {
      response = RemoteException(kindName(ErrorKind::kShutdown),
                                 "torchrpc: worker '" + self_.name + "' never finished init_rpc", "")
                     .toMessage();
    }
  }
  if (!response) {
    // Nested calls made by this request belong to its autograd context.
    CurrentContextGuard context(autograd ? autograd->contextId : -1);
    std::optional<EventCollector> collector;
    if (profiled) {
      collector.emplace();
      std::lock_guard<std::mutex> g(profiled->mu);
      profiled->running = true;
    }
    try {
      response = runRequest(request, conn->peerId(), respond);
    } catch (...) {
      response = describeError();
    }
    if (collector) {
      auto events = collector->take();
      collector.reset();
      std::optional<Message> early;
      {
        std::lock_guard<std::mutex> g(profiled->mu);
        profiled->events = std::move(events);
        profiled->running = false;
        early = std::move(profiled->early);
      }
      if (early) respond(std::move(*early));
    }
  }
  if (response) respond(std::move(*response));
}

c10::IValue Agent::runScript(ScriptCall& call) {
  auto callable = findCallable(call.qualifiedName());
  if (!callable && isCodeId(call.qualifiedName())) {
    throw RpcError(ErrorKind::kNotFound, "torchrpc: worker '" + self_.name + "' does not hold code " +
                                             call.qualifiedName() + " (never sent, or evicted from its cache)");
  }
  if (!callable) {
    throw RpcError(ErrorKind::kNotFound, "torchrpc: no function '" + call.qualifiedName() +
                                             "' is registered on worker '" + self_.name + "'");
  }
  checkArguments(call.qualifiedName(), callable->schema(), call.stack());
  return callable->run(call.stack());
}

namespace {
// Answers once `future` completes: with makeReply(its value), or its error.
// For fetches of a value still being created, async_execution functions and
// distributed backward: no thread waits meanwhile.
void respondWhenDone(const FuturePtr& future, Responder respond,
                     std::function<Message(const c10::IValue&)> makeReply) {
  future->addCallback([respond = std::move(respond), makeReply = std::move(makeReply)](
                                        c10::ivalue::Future& f) {
    Message m;
    try {
      if (f.hasError()) std::rethrow_exception(f.exception_ptr());
      m = makeReply(f.value());
    } catch (...) {
      m = describeCurrentException().toMessage();
    }
    respond(std::move(m));
  });
}
}  // namespace

// The owner's value once `result` is ready: a script function decorated
// with async_execution returns a Future, whose value is the one to own.
void completeOwnerWith(const RRefPtr& owner, const c10::IValue& result) {
  if (result.isFuture()) {
    completeFrom(result.toFuture(), owner->valueFuture());
  } else {
    owner->valueFuture()->markCompleted(result);
  }
}

// A remote call's owner side: `produce` starts the value's computation
// (an error it throws also fails the owner's value); REMOTE_RET answers once
// the value is ready.
template <typename Produce>
void own(const RRefPtr& owner, const RRefId& rrefId, const ForkId& forkId, const Responder& respond,
         Produce&& produce) {
  try {
    produce();
  } catch (...) {
    owner->valueFuture()->setErrorIfNeeded(std::current_exception());
    throw;
  }
  respondWhenDone(owner->valueFuture(), respond,
                  [rrefId, forkId](const c10::IValue&) { return RemoteRet(rrefId, forkId).toMessage(); });
}

std::optional<Message> Agent::runRequest(Message& request, int64_t from, const Responder& respond) {
  const ObjectCodec* objects = rrefs_->objectCodec();  // RRefs in the request and its reply
  switch (request.type) {
    case MessageType::kScriptCall: {
      ReceivedForks forks;
      auto call = ScriptCall::fromMessage(request, objects);
      forks.waitConfirmed();
      c10::IValue result = runScript(*call);
      if (!result.isFuture()) return ScriptRet(std::move(result)).toMessage(objects);
      respondWhenDone(result.toFuture(), respond,
                      [objects](const c10::IValue& v) { return ScriptRet(v).toMessage(objects); });
      return std::nullopt;
    }
    case MessageType::kPythonCall:
      if (!options_.pythonUdf || !python_.runCall) throw pythonDisabled();
      return python_.runCall(std::move(request), respond);
    case MessageType::kScriptRemoteCall: {
      ReceivedForks forks;
      auto call = ScriptRemoteCall::fromMessage(request, objects);
      forks.waitConfirmed();
      auto owner = rrefs_->ownerForRemoteCall(call->rrefId(), call->forkId(), false, from);
      own(owner, call->rrefId(), call->forkId(), respond, [&] { completeOwnerWith(owner, runScript(*call)); });
      return std::nullopt;
    }
    case MessageType::kPythonRemoteCall: {
      if (!options_.pythonUdf || !python_.runRemote) throw pythonDisabled();
      auto call = PythonRemoteCall::fromMessage(request);
      auto owner = rrefs_->ownerForRemoteCall(call->rrefId(), call->forkId(), true, from);
      own(owner, call->rrefId(), call->forkId(), respond,
          [&] { completeFrom(python_.runRemote(std::move(call->value())), owner->valueFuture()); });
      return std::nullopt;
    }
    case MessageType::kScriptRRefFetchCall: {
      auto owner = rrefs_->ownerForFetch(ScriptRRefFetchCall::fromMessage(request)->rrefId());
      respondWhenDone(owner->valueFuture(), respond,
                      [objects](const c10::IValue& v) { return ScriptRRefFetchRet(v).toMessage(objects); });
      return std::nullopt;
    }
    case MessageType::kPythonRRefFetchCall: {
      auto owner = rrefs_->ownerForFetch(PythonRRefFetchCall::fromMessage(request)->rrefId());
      if (!python_.pickle) throw pythonDisabled();
      auto pickle = python_.pickle;
      respondWhenDone(owner->valueFuture(), respond,
                      [pickle](const c10::IValue& v) { return PythonRRefFetchRet(pickle(v)).toMessage(); });
      return std::nullopt;
    }
    case MessageType::kBackwardAutogradReq: {
      auto done = autograd_->onBackwardRequest(*BackwardAutogradReq::fromMessage(request));
      respondWhenDone(done, respond, [](const c10::IValue&) { return BackwardAutogradResp().toMessage(); });
      return std::nullopt;
    }
    case MessageType::kCleanupAutogradContextReq: {
      auto done = autograd_->release(CleanupAutogradContextReq::fromMessage(request)->value(), from);
      respondWhenDone(done, respond, [](const c10::IValue&) { return CleanupAutogradContextResp().toMessage(); });
      return std::nullopt;
    }
    case MessageType::kRRefBackwardReq: {
      auto m = RRefBackwardReq::fromMessage(request);
      auto owner = rrefs_->ownerForFetch(m->rrefId());
      auto done = rrefBackward(owner, m->contextId(), m->retainGraph());
      respondWhenDone(done, respond, [](const c10::IValue&) { return RRefBackwardResp().toMessage(); });
      return std::nullopt;
    }
    case MessageType::kRRefForkRequest: {
      auto m = RRefForkRequest::fromMessage(request);
      rrefs_->onForkRequest(m->rrefId(), m->forkId(), from);
      return RRefAck().toMessage();
    }
    case MessageType::kRRefUserDelete: {
      auto m = RRefUserDelete::fromMessage(request);
      rrefs_->onUserDelete(m->rrefId(), m->forkId());
      return RRefAck().toMessage();
    }
    case MessageType::kRRefChildAccept:
      rrefs_->onChildAccept(RRefChildAccept::fromMessage(request)->forkId());
      return RRefAck().toMessage();
    case MessageType::kSchemaQuery: {
      auto query = SchemaQuery::fromMessage(request);
      auto callable = findCallable(query->value());
      return SchemaRet(callable ? toString(callable->schema()) : "").toMessage();
    }
    default:
      throw RpcError(ErrorKind::kRpc, "torchrpc: worker '" + self_.name + "' cannot serve " +
                                          messageTypeName(request.type) + " requests");
  }
}

FuturePtr Agent::rrefBackward(const RRefPtr& owner, int64_t contextId, bool retainGraph) {
  auto done = c10::make_intrusive<c10::ivalue::Future>(c10::NoneType::get());
  owner->valueFuture()->addCallback([this, done, contextId, retainGraph](c10::ivalue::Future& value) {
    try {
      if (value.hasError()) std::rethrow_exception(value.exception_ptr());
      if (!value.value().isTensor()) {
        throw RpcError(ErrorKind::kArgument, "torchrpc: RRef.backward() needs an RRef to a tensor, this one holds " +
                                                 value.value().type()->annotation_str());
      }
      at::Tensor root = value.value().toTensor();
      if (contextId < 0) {
        torch::autograd::backward({root}, {}, retainGraph);
        done->markCompleted(c10::IValue());
        return;
      }
      completeFrom(autograd_->backward(contextId, {root}, retainGraph), done);
    } catch (...) {
      done->setErrorIfNeeded(std::current_exception());
    }
  });
  return done;
}

Message Agent::describeError() const {
  if (python_.describeError) {
    if (auto fromPython = python_.describeError()) return std::move(*fromPython).toMessage();
  }
  return describeCurrentException().toMessage();
}

RpcError Agent::pythonDisabled() const {
  return RpcError(ErrorKind::kForbidden,
                  "torchrpc: worker '" + self_.name +
                      "' does not run Python callables (start it with RpcOptions(python_udf=True))");
}

void Agent::reply(const std::shared_ptr<Connection>& conn, Message&& response, int64_t id) {
  response.id = id;
  try {
    conn->send(response);
    count(conn->peerId(), response, true);
  } catch (const RpcError& e) {
    if (e.kind() == ErrorKind::kPeerLost) return;  // the caller is gone; nobody to tell
    // The result could not be encoded (an unsendable type): say so instead.
    Message err = RemoteException(kindName(e.kind()), e.what(), "").toMessage();
    err.id = id;
    try {
      conn->send(err);
    } catch (const RpcError&) {
    }
  }
}

void Agent::completeResponse(Message&& response) {
  Pending p;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = pending_.find(response.id);
    if (it == pending_.end()) return;  // timed out earlier: drop the late reply
    p = std::move(it->second);
    if (p.timeoutSeconds > 0) deadlines_.erase(p.deadline);
    pending_.erase(it);
    if (pending_.empty()) idleCv_.notify_all();
  }
  const ObjectCodec* objects = rrefs_->objectCodec();  // RRefs in the response
  ProfilerRange range("torchrpc::receive#", p.what);
  try {
    if (response.type == MessageType::kRunWithProfilingResp) {
      std::string events;
      GloballyUniqueId key;
      response = unwrapProfiling(std::move(response), events, key);
      std::lock_guard<std::mutex> g(profilesMu_);
      if (profiles_.size() >= kMaxProfiles) profiles_.pop_front();
      profiles_.push_back({p.what, p.peer, p.profiledSentNs, wallNs(), p.profiledThread, std::move(events)});
    }
    if (response.type == MessageType::kForwardAutogradResp) {
      AutogradHeader header;
      response = autograd_->unwrap(std::move(response), header);
    }
    if (!p.codeId.empty() && response.type != MessageType::kException) ledger_.confirm(p.peer, p.codeId);
    if (response.type != MessageType::kException) settled(p, nullptr);
    switch (response.type) {
      case MessageType::kScriptRet:
        p.future->markCompleted(std::move(ScriptRet::fromMessage(response, objects)->value()));
        return;
      case MessageType::kPythonRet:
        p.future->markCompleted(pickledTuple(PythonRet::fromMessage(response)->value()));
        return;
      case MessageType::kSchemaRet:
        p.future->markCompleted(c10::IValue(SchemaRet::fromMessage(response)->value()));
        return;
      case MessageType::kCancelRet:
        p.future->markCompleted(c10::IValue(CancelRet::fromMessage(response)->neverRan()));
        return;
      case MessageType::kScriptRRefFetchRet:
        p.future->markCompleted(std::move(ScriptRRefFetchRet::fromMessage(response, objects)->value()));
        return;
      case MessageType::kPythonRRefFetchRet:
        p.future->markCompleted(pickledTuple(PythonRRefFetchRet::fromMessage(response)->value()));
        return;
      case MessageType::kRemoteRet:
      case MessageType::kRRefAck:
      case MessageType::kBackwardAutogradResp:
      case MessageType::kCleanupAutogradContextResp:
      case MessageType::kRRefBackwardResp:
        decodeFields(response, response.type);  // validate, nothing to keep
        p.future->markCompleted(c10::IValue());
        return;
      case MessageType::kException: {
        auto ex = RemoteException::fromMessage(response);
        ErrorKind kind = ErrorKind::kRemote;
        const bool known = kindFromName(ex->errorType(), kind);
        settled(p, &kind);
        // Shipped code called by name that the callee no longer holds
        // (evicted): the next call carries it again.
        if (kind == ErrorKind::kNotFound && isCodeId(p.what)) ledger_.forget(p.peer, p.what);
        if (known) {
          p.future->setError(std::make_exception_ptr(RpcError(kind, ex->message())));
        } else {
          std::string shortType = ex->errorType().substr(ex->errorType().rfind('.') + 1);
          p.future->setError(std::make_exception_ptr(
              RpcError(ErrorKind::kRemote, shortType + " raised by " + describe(p) + ": " + ex->message(),
                       ex->errorType(), ex->traceback())));
        }
        return;
      }
      default:
        throw RpcError(ErrorKind::kDecode, "unexpected " + messageTypeName(response.type) + " response");
    }
  } catch (const RpcError& e) {
    p.future->setErrorIfNeeded(std::make_exception_ptr(
        RpcError(ErrorKind::kDecode, "torchrpc: bad response to " + describe(p) + ": " + e.what())));
  }
}

std::vector<Agent::InFlight> Agent::requestsInFlight() {
  const auto now = std::chrono::steady_clock::now();
  auto age = [now](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(now - t).count();
  };
  std::vector<InFlight> out;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [id, p] : pending_) out.push_back({true, id, p.peer, p.what, "waiting", age(p.sentAt)});
  }
  std::lock_guard<std::mutex> g(servingMu_);
  for (const auto& [key, e] : serving_) {
    const char* state = e.state == Serving::kQueued ? "queued" : e.state == Serving::kRunning ? "running" : "cancelled";
    out.push_back({false, key.id, key.peer, e.what, state, age(e.since)});
  }
  return out;
}

std::vector<Agent::PeerState> Agent::peerStates() {
  std::vector<PeerState> out;
  const int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
  std::lock_guard<std::mutex> g(connMu_);
  for (const auto& w : workers_) {
    if (w.id == self_.id) continue;
    PeerState p{w.id, "idle", "", "", -1.0};
    auto conn = outgoing_.find(w.id);
    if (conn != outgoing_.end()) {
      p.state = "connected";
      p.transport = conn->second->transportName();
      p.lastHeardSeconds = conn->second->secondsSinceHeard();
    }
    if (connecting_.count(w.id)) p.state = "connecting";
    if (left_.count(w.id)) p.state = "left";
    auto lost = lost_.find(w.id);
    if (lost != lost_.end()) {
      p.state = "lost";
      p.why = lost->second;
    }
    const Traffic* t = traffic(w.id);
    if (p.lastHeardSeconds < 0 && t && t->lastReceivedNs.load(std::memory_order_relaxed) > 0) {
      p.lastHeardSeconds = (now - t->lastReceivedNs.load(std::memory_order_relaxed)) / 1e9;  // on its connection to us
    }
    out.push_back(std::move(p));
  }
  return out;
}

void Agent::settled(const Pending& p, const ErrorKind* error) {
  if (!p.stats) return;  // metrics off
  p.stats->latency.observe(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - p.sentAt).count());
  if (error) {
    p.stats->errors.fetch_add(1, std::memory_order_relaxed);
    metrics_.error(*error);
  }
}

void Agent::failPending(const std::function<bool(const Pending&)>& which, ErrorKind kind,
                        const std::string& why) {
  std::vector<Pending> failed;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (which(it->second)) {
        if (it->second.timeoutSeconds > 0) deadlines_.erase(it->second.deadline);
        failed.push_back(std::move(it->second));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    if (pending_.empty()) idleCv_.notify_all();
  }
  for (auto& p : failed) {
    settled(p, &kind);
    p.future->setErrorIfNeeded(
        std::make_exception_ptr(RpcError(kind, "torchrpc: " + describe(p) + " failed: " + why)));
  }
}

void Agent::onClosed(const std::shared_ptr<Connection>& conn, CloseReason reason, const std::string& why) {
  const int64_t peer = conn->peerId();
  if (reason == CloseReason::kSilent) metrics_.peerSilent();
  bool outgoing = false;
  bool newlyLost = false;
  {
    std::lock_guard<std::mutex> g(connMu_);
    auto it = outgoing_.find(peer);
    if (it != outgoing_.end() && it->second == conn) {
      outgoing_.erase(it);
      outgoing = true;
    }
    // A lost peer stays lost until it shows life again (a message, or a
    // connection we dial succeeds).
    // Any connection going silent means the peer froze or the network
    // broke; a hang-up or a corrupt stream counts only on the connection we
    // dialed (another connection claiming the same id closing says nothing
    // about the worker we talk to).
    bool counts = reason == CloseReason::kSilent || (outgoing && reason != CloseReason::kLocal);
    if (counts && !left_.count(peer) && !stopped_.load()) {
      lost_[peer] = why;
      lostCount_ = lost_.size();
      newlyLost = true;
    }
  }
  if (newlyLost) rrefs_->onPeerLost(peer);
  // Only calls on the connection that broke fail: another connection from
  // the same id closing (a second dial, a misbehaving client holding the
  // secret) says nothing about ours.
  if (!outgoing) return;
  const std::string name = peer >= 0 && peer < static_cast<int64_t>(workers_.size()) ? workers_[peer].name : "?";
  if (stopped_.load()) {
    failPending([peer](const Pending& p) { return p.peer == peer; }, ErrorKind::kShutdown, "RPC was shut down");
  } else {
    failPending([peer](const Pending& p) { return p.peer == peer; }, ErrorKind::kPeerLost,
                "lost worker '" + name + "' (" + why + ")");
  }
}

void Agent::sendCancel(int64_t peer, int64_t id) {
  std::shared_ptr<Connection> conn;
  {
    std::lock_guard<std::mutex> g(connMu_);
    auto it = outgoing_.find(peer);
    if (it == outgoing_.end()) return;
    conn = it->second;
  }
  Message m = Cancel(id).toMessage();
  m.id = 0;  // no answer wanted
  try {
    conn->send(m);
  } catch (const RpcError&) {
  }
}

bool Agent::cancel(const FuturePtr& future) {
  Pending p;
  int64_t id = -1;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto alias = aliases_.find(future.get());
    const FuturePtr& target = alias != aliases_.end() ? alias->second : future;
    for (auto it = pending_.begin(); it != pending_.end(); ++it) {
      if (it->second.future != target) continue;
      id = it->first;
      p = std::move(it->second);
      if (p.timeoutSeconds > 0) deadlines_.erase(p.deadline);
      pending_.erase(it);
      if (pending_.empty()) idleCv_.notify_all();
      break;
    }
  }
  if (id < 0) return false;  // answered, failed or timed out already
  const ErrorKind cancelled = ErrorKind::kCancelled;
  settled(p, &cancelled);
  p.future->setErrorIfNeeded(std::make_exception_ptr(
      RpcError(ErrorKind::kCancelled, "torchrpc: call to " + describe(p) + " was cancelled")));
  try {
    FuturePtr answer = send(p.peer, Cancel(id).toMessage(), options_.transport.peerTimeout + 1.0, "cancel");
    answer->wait();
    return !answer->hasError() && answer->value().toBool();
  } catch (const std::exception&) {
    return false;
  }
}

std::map<int64_t, std::string> Agent::lostPeers() {
  std::lock_guard<std::mutex> g(connMu_);
  return lost_;
}

std::vector<int64_t> Agent::leftPeers() {
  std::lock_guard<std::mutex> g(connMu_);
  return {left_.begin(), left_.end()};
}

void Agent::probePeers() {
  for (const WorkerInfo& w : workers_) {
    if (w.id == self_.id) continue;
    {
      std::lock_guard<std::mutex> g(connMu_);
      if (outgoing_.count(w.id) || connecting_.count(w.id) || left_.count(w.id)) continue;
    }
    const int64_t id = w.id;
    callbacks_->submit([this, id] {
      try {
        connectionTo(id);
      } catch (const std::exception&) {
        // connectionTo recorded why the peer is unreachable.
      }
    });
  }
}

void Agent::timeoutLoop() {
  std::unique_lock<std::mutex> g(mu_);
  while (!stopped_.load()) {
    if (deadlines_.empty()) {
      timerCv_.wait(g);
      continue;
    }
    auto first = deadlines_.begin();
    auto now = std::chrono::steady_clock::now();
    if (now < first->first) {
      timerCv_.wait_until(g, first->first);
      continue;
    }
    const int64_t first_id = first->second;
    auto it = pending_.find(first_id);
    deadlines_.erase(first);
    if (it == pending_.end()) continue;
    Pending p = std::move(it->second);
    pending_.erase(it);
    if (pending_.empty()) idleCv_.notify_all();
    g.unlock();
    const ErrorKind timedOut = ErrorKind::kTimeout;
    settled(p, &timedOut);
    p.future->setErrorIfNeeded(std::make_exception_ptr(
        RpcError(ErrorKind::kTimeout, "torchrpc: call to " + describe(p) + " timed out after " +
                                          c10::str(p.timeoutSeconds) + " s")));
    sendCancel(p.peer, first_id);  // the callee drops it if it has not started
    g.lock();
  }
}

void Agent::waitForReply(const FuturePtr& future, int64_t to) {
  if (future->completed()) return;
  ProfilerRange range("torchrpc::wait", "");
  std::shared_ptr<Connection> conn;
  {
    std::lock_guard<std::mutex> g(connMu_);
    auto it = outgoing_.find(to);
    if (it != outgoing_.end()) conn = it->second;
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSyncSpinNs);
  auto done = [&] { return future->completed(); };
  if (!conn || !conn->pollUntil(done, until)) {
    while (!done() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
  }
  future->wait();
}

std::vector<Agent::ConnectionInfo> Agent::connections() {
  std::vector<std::pair<int64_t, std::shared_ptr<Connection>>> conns;
  {
    std::lock_guard<std::mutex> g(connMu_);
    conns.assign(outgoing_.begin(), outgoing_.end());
  }
  std::vector<ConnectionInfo> out;
  for (auto& [peer, c] : conns) out.push_back({peer, c->transportName(), c->stats()});
  return out;
}

size_t Agent::pendingCount() {
  std::lock_guard<std::mutex> g(mu_);
  return pending_.size();
}

bool Agent::waitUntilIdle(double timeoutSeconds) {
  std::unique_lock<std::mutex> g(mu_);
  auto until = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double>(timeoutSeconds));
  return idleCv_.wait_until(g, until, [this] { return pending_.empty(); });
}

void Agent::shutdown() {
  if (stopped_.exchange(true)) return;
  // Peers learn we left on purpose, so they do not count us as lost.
  Message notice = ShutdownNotice(self_.id).toMessage();
  transport_->broadcast(notice);
  {
    std::lock_guard<std::mutex> g(mu_);
    timerCv_.notify_all();
  }
  if (timer_.joinable()) timer_.join();
  transport_->shutdown();
  {
    std::lock_guard<std::mutex> g(workersMu_);
    workersCv_.notify_all();
  }
  pool_->stop();
  callbacks_->stop();
  rrefs_->clear();
  autograd_->contexts().clear();
  failPending([](const Pending&) { return true; }, ErrorKind::kShutdown, "RPC was shut down");
}

}  // namespace torchrpc

namespace torchrpc {
namespace {
std::mutex currentMu;
std::shared_ptr<Agent> current;
}  // namespace

void setCurrentAgent(std::shared_ptr<Agent> agent) {
  std::lock_guard<std::mutex> g(currentMu);
  current = std::move(agent);
}

std::shared_ptr<Agent> currentAgent() {
  std::lock_guard<std::mutex> g(currentMu);
  if (!current || !current->running()) {
    // torch's words first: programs written for it match on them.
    throw RpcError(ErrorKind::kShutdown,
                   "Current RPC agent is not set! Did you initialize the RPC framework "
                   "(torchrpc.init_rpc)? RPC has not been initialized here, or has been shut down");
  }
  return current;
}

}  // namespace torchrpc
