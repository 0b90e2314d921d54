// Python bindings of the Agent. Argument stacks are built from Python values
// under the GIL (checked against the schema there); everything after that,
// encoding, sending, waiting, runs with the GIL released.

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include "agent/current_agent.h"
#include "agent/remote_profiling.h"
#include "agent/shm_transport.h"
#include "agent/tcp_transport.h"
#include "messages/control.h"
#include "messages/python_call.h"
#include "messages/script_call.h"
#include "python/py_rref.h"

namespace py = pybind11;

namespace torchrpc {

RRefPtr toRRef(const py::handle& obj) {
  return torch::jit::toIValue(obj, c10::getCustomClassType<RRefPtr>()).toCustomClass<RRef>();
}

py::object fromRRef(RRefPtr rref) { return torch::jit::toPyObject(c10::IValue(std::move(rref))); }

namespace {

using torch::jit::PythonFutureWrapper;

// Waits (GIL released) when sync; returns the Python value, or a torch Future.
py::object finish(Agent& agent, const FuturePtr& fut, bool sync) {
  if (!sync) {
    // Completed on the agent's callback threads (see Agent::defer).
    auto out = c10::make_intrusive<c10::ivalue::Future>(fut->elementType());
    agent.alias(out, fut);  // torchrpc.cancel(out) finds the request
    fut->addCallback([&agent, out](c10::ivalue::Future& done) {
      agent.unalias(out);
      agent.defer([out, done = c10::intrusive_ptr<c10::ivalue::Future>::reclaim_copy(&done)] {
        if (done->hasError()) {
          out->setError(done->exception_ptr());
        } else {
          out->markCompleted(done->value());
        }
      });
    });
    return py::cast(std::make_shared<PythonFutureWrapper>(out));
  }
  if (!fut->completed()) {
    py::gil_scoped_release release;
    fut->wait();
  }
  if (fut->hasError()) std::rethrow_exception(fut->exception_ptr());
  // The reply was decoded where it arrived (a transport thread, or here
  // when this thread read it); its conversion for Python is recorded here.
  ProfilerRange range("torchrpc::receive", "");
  return torch::jit::toPyObject(fut->value());
}

// The torch Future Python holds for an asynchronous call (`out`), completed
// from the request's future by whichever comes first: the agent's callback
// threads, or the caller's own thread in wait(), which reads the reply off
// the connection itself (Agent::waitForReply) instead of waiting to be
// woken by a callback thread that a transport thread woke.
struct CallRelay {
  std::weak_ptr<Agent> agent;
  FuturePtr request, out;
  int64_t to;
  std::atomic<bool> claimed{false};

  void complete() {
    if (claimed.exchange(true)) return;
    if (request->hasError()) {
      out->setError(request->exception_ptr());
    } else {
      out->markCompleted(request->value());
    }
  }
  void wait() {
    if (auto a = agent.lock()) {
      a->waitForReply(request, to);
    } else {
      request->wait();
    }
    complete();  // out's callbacks run here, on the caller's thread
  }
};

// Sends with `start` (GIL released). A synchronous call releases the GIL
// once, for the send and the wait together, and returns the result; an
// asynchronous one given `out` (a torch Future) wires it to the request
// and returns its CallRelay; without `out`, finish()'s torch Future.
template <typename Start>
py::object finish(const std::shared_ptr<Agent>& agent, int64_t to, bool sync, const py::object& out,
                  Start&& start) {
  FuturePtr fut;
  {
    py::gil_scoped_release release;
    fut = start();
    if (sync) agent->waitForReply(fut, to);
  }
  if (sync || out.is_none()) return finish(*agent, fut, sync);
  auto relay = std::make_shared<CallRelay>();
  relay->agent = agent;
  relay->request = fut;
  relay->out = out.cast<std::shared_ptr<PythonFutureWrapper>>()->fut;
  relay->to = to;
  Agent* a = agent.get();
  a->alias(relay->out, fut);  // torchrpc.cancel(out) finds the request
  fut->addCallback([a, relay](c10::ivalue::Future&) {
    a->unalias(relay->out);
    a->defer([relay] { relay->complete(); });
  });
  return py::cast(relay);
}

[[noreturn]] void badArguments(Agent& agent, int64_t to, const std::string& name, const std::exception& e) {
  throw RpcError(ErrorKind::kArgument, "torchrpc: bad arguments for '" + name + "' on worker '" +
                                           agent.worker(to).name + "': " + e.what());
}

// The full positional stack for `schema`, defaults filled, checked here.
torch::jit::Stack scriptStack(Agent& agent, int64_t to, const std::string& name,
                              const c10::FunctionSchema& schema, const py::tuple& args, const py::dict& kwargs) {
  try {
    return torch::jit::createStackForSchema(schema, args, py::reinterpret_borrow<py::kwargs>(kwargs),
                                            std::nullopt);
  } catch (const std::exception& e) {
    badArguments(agent, to, name, e);
  }
}

// Code shipped by value, as Python passes it: (id, kind, archive) or None.
using PyCode = std::optional<std::tuple<std::string, std::string, at::Tensor>>;

std::optional<ShippedCode> shippedCode(const PyCode& code) {
  if (!code) return std::nullopt;
  return ShippedCode{std::get<0>(*code), std::get<1>(*code), std::get<2>(*code)};
}

py::object scriptCall(const std::shared_ptr<Agent>& self, int64_t to, const std::string& name,
                      const c10::FunctionSchema& schema, const py::tuple& args, const py::dict& kwargs, double timeout,
                      bool sync, const py::object& out, const PyCode& pyCode) {
  Agent& agent = *self;
  torch::jit::Stack stack = scriptStack(agent, to, name, schema, args, kwargs);
  auto code = shippedCode(pyCode);
  return finish(self, to, sync, out, [&] {
    return agent.scriptCall(to, name, std::move(stack), timeout, code ? &*code : nullptr);
  });
}

// Picks the overload of `opName` that fits the Python arguments.
std::pair<std::string, torch::jit::Stack> builtinStack(Agent& agent, int64_t to, const std::string& opName,
                                                       const py::tuple& args, const py::dict& kwargs) {
  const auto& ops = torch::jit::getAllOperatorsFor(c10::Symbol::fromQualString(opName));
  if (ops.empty()) throw RpcError(ErrorKind::kNotFound, "torchrpc: no builtin operator '" + opName + "'");
  std::shared_ptr<torch::jit::Operator> op;
  torch::jit::Stack stack;
  try {
    std::tie(op, stack) = torch::jit::getOpWithStack(ops, py::reinterpret_borrow<py::args>(args),
                                                     py::reinterpret_borrow<py::kwargs>(kwargs));
  } catch (const std::exception& e) {
    badArguments(agent, to, opName, e);
  }
  const auto& schema = op->schema();
  return {schema.name() + (schema.overload_name().empty() ? "" : "." + schema.overload_name()), std::move(stack)};
}

py::object builtinCall(const std::shared_ptr<Agent>& self, int64_t to, const std::string& opName,
                       const py::tuple& args, const py::dict& kwargs, double timeout, bool sync, const py::object& out) {
  Agent& agent = *self;
  auto [name, stack] = builtinStack(agent, to, opName, args, kwargs);
  return finish(self, to, sync, out,
                [&] { return agent.scriptCall(to, std::move(name), std::move(stack), timeout); });
}

// A Python callable kept by C++ threads: released under the GIL.
std::shared_ptr<py::object> keepPython(py::object fn) {
  return std::shared_ptr<py::object>(new py::object(std::move(fn)), [](py::object* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
}

// The torch Future of an asynchronous Python call: completed on the agent's
// callback threads with loads(reply) (the unpickled result), or with the
// call's own error. A real error, not a Future that Python completed with
// set_exception (whose value is the exception): torch.futures.wait_all and
// collect_all stop at the first failed call only for the former.
py::object unpickledFuture(Agent& agent, const FuturePtr& fut, py::object loads, py::object keep) {
  auto out = c10::make_intrusive<c10::ivalue::Future>(c10::PyObjectType::get());
  agent.alias(out, fut);  // torchrpc.cancel(out) finds the request
  auto fn = keepPython(std::move(loads));
  auto kept = keepPython(std::move(keep));  // alive until the reply (RRefs sent by id)
  fut->addCallback([&agent, out, fn, kept](c10::ivalue::Future& done) {
    agent.unalias(out);
    agent.defer([out, fn, kept, done = c10::intrusive_ptr<c10::ivalue::Future>::reclaim_copy(&done)] {
      if (done->hasError()) {
        out->setError(done->exception_ptr());
        return;
      }
      c10::IValue value;
      try {
        py::gil_scoped_acquire gil;
        value = torch::jit::toIValue((*fn)(torch::jit::toPyObject(done->value())), c10::PyObjectType::get());
      } catch (...) {
        out->setError(std::current_exception());
        return;
      }
      out->markCompleted(std::move(value));
    });
  });
  return py::cast(std::make_shared<PythonFutureWrapper>(out));
}

// sync: the reply (the pickled result, which Python unpickles). Otherwise
// unpickledFuture's torch Future, `keep` held until the reply.
py::object pythonCall(const std::shared_ptr<Agent>& self, int64_t to, const std::string& what,
                      at::Tensor pickled, std::vector<at::Tensor> tensors, double timeout, bool sync,
                      py::object loads, py::object keep) {
  Agent& agent = *self;
  auto start = [&] {
    return agent.send(to, PythonCall(PickledValue{std::move(pickled), std::move(tensors)}).toMessage(), timeout,
                      what);
  };
  if (sync) return finish(self, to, true, py::none(), start);
  FuturePtr fut;
  {
    py::gil_scoped_release release;
    fut = start();
  }
  return unpickledFuture(agent, fut, std::move(loads), std::move(keep));
}

// A c10 future for the torch.futures.Future an async_execution function
// returned.
FuturePtr futureOf(const py::handle& obj) { return obj.cast<std::shared_ptr<PythonFutureWrapper>>()->fut; }

// Installs torchrpc/python_udf.py's entry points (see PythonHooks):
// run_call(pickled, tensors) -> ("ok", pickled, tensors) | ("err", cls, msg, tb) | ("future", F);
// run_remote(pickled, tensors) -> ("ok", obj) | ("err", cls, msg, tb) | ("future", F);
// pickle(obj) -> (pickled, tensors).
// F, for async_execution functions, completes with the "ok"/"err" tuple.
void setPythonHooks(Agent& agent, py::object runCall, py::object runRemote, py::object pickle) {
  auto call = keepPython(std::move(runCall));
  auto remote = keepPython(std::move(runRemote));
  auto pick = keepPython(std::move(pickle));
  // Both take the GIL held.
  auto callReply = [](const py::tuple& r) -> Message {
    if (r[0].cast<std::string>() == "ok") {
      return PythonRet(PickledValue{r[1].cast<at::Tensor>(), r[2].cast<std::vector<at::Tensor>>()}).toMessage();
    }
    return RemoteException(r[1].cast<std::string>(), r[2].cast<std::string>(), r[3].cast<std::string>())
        .toMessage();
  };
  auto remoteValue = [](const py::tuple& r) -> c10::IValue {
    if (r[0].cast<std::string>() != "ok") {
      throw RpcError(ErrorKind::kRemote, r[2].cast<std::string>(), r[1].cast<std::string>(),
                     r[3].cast<std::string>());
    }
    // A tensor is kept as one, so RRef.backward() and TorchScript see it.
    if (THPVariable_Check(r[1].ptr())) return c10::IValue(THPVariable_Unpack(r[1].ptr()));
    return torch::jit::toIValue(r[1], c10::PyObjectType::get());
  };
  PythonHooks hooks;
  hooks.runCall = [call, callReply](Message&& request, const Responder& respond) -> std::optional<Message> {
    auto c = PythonCall::fromMessage(request);
    ReceivedForks forks;  // python_udf waits for them (wait_received_forks)
    py::gil_scoped_acquire gil;
    py::tuple r = (*call)(c->value().bytes, c->value().tensors);
    if (r[0].cast<std::string>() != "future") return callReply(r);
    futureOf(r[1])->addCallback([respond, callReply](c10::ivalue::Future& f) {
      Message m;
      {
        py::gil_scoped_acquire gil;
        m = callReply(torch::jit::toPyObject(f.value()).cast<py::tuple>());
      }
      respond(std::move(m));
    });
    return std::nullopt;
  };
  hooks.runRemote = [remote, remoteValue](PickledValue&& v) -> FuturePtr {
    auto out = c10::make_intrusive<c10::ivalue::Future>(c10::AnyType::get());
    ReceivedForks forks;
    py::gil_scoped_acquire gil;
    py::tuple r = (*remote)(v.bytes, v.tensors);
    auto settle = [out, remoteValue](const py::tuple& result) {
      try {
        out->markCompleted(remoteValue(result));
      } catch (...) {
        out->setErrorIfNeeded(std::current_exception());
      }
    };
    if (r[0].cast<std::string>() != "future") {
      settle(r);
      return out;
    }
    futureOf(r[1])->addCallback([settle](c10::ivalue::Future& f) {
      py::gil_scoped_acquire gil;
      settle(torch::jit::toPyObject(f.value()).cast<py::tuple>());
    });
    return out;
  };
  hooks.describeError = []() -> std::optional<RemoteException> {
    try {
      throw;
    } catch (python_error& e) {
      py::gil_scoped_acquire gil;
      if (!e.type) return std::nullopt;
      py::handle type(e.type);
      std::string name = py::str(type.attr("__module__")).cast<std::string>() + "." +
                         py::str(type.attr("__qualname__")).cast<std::string>();
      return RemoteException(name, e.message, e.message);
    } catch (...) {
      return std::nullopt;
    }
  };
  hooks.pickle = [pick](const c10::IValue& value) -> PickledValue {
    py::gil_scoped_acquire gil;
    py::tuple r = (*pick)(torch::jit::toPyObject(value));
    return PickledValue{r[0].cast<at::Tensor>(), r[1].cast<std::vector<at::Tensor>>()};
  };
  agent.setPythonHooks(std::move(hooks));
}

// remote(): `request` builds the message from the new ids.
py::object startRemote(Agent& agent, int64_t to, const std::string& what, bool isPython, double timeout,
                       const std::function<Message(const RRefId&, const ForkId&)>& request) {
  RRefPtr rref;
  {
    py::gil_scoped_release release;
    rref = agent.rrefs().remote(to, request, isPython, timeout, what);
  }
  return fromRRef(std::move(rref));
}

py::object remoteScript(Agent& agent, int64_t to, const std::string& name, const c10::FunctionSchema& schema,
                        const py::tuple& args, const py::dict& kwargs, double timeout, const PyCode& pyCode) {
  torch::jit::Stack stack = scriptStack(agent, to, name, schema, args, kwargs);
  auto code = shippedCode(pyCode);
  return startRemote(agent, to, name, false, timeout, [&](const RRefId& id, const ForkId& fork) {
    return agent.withCode(to, ScriptRemoteCall(name, stack, false, id, fork).toMessage(agent.rrefs().objectCodec()),
                          code ? &*code : nullptr);
  });
}

py::object remotePython(Agent& agent, int64_t to, const std::string& what, at::Tensor pickled,
                        std::vector<at::Tensor> tensors, double timeout) {
  return startRemote(agent, to, what, true, timeout, [&](const RRefId& id, const ForkId& fork) {
    return PythonRemoteCall(PickledValue{pickled, tensors}, false, id, fork).toMessage();
  });
}

// The value an RRef names: an IValue, or for a Python value on a user the
// (pickled, tensors) pair the caller unpickles.
py::object rrefFetch(Agent& agent, const py::object& obj, double timeout) {
  RRefPtr rref = toRRef(obj);
  FuturePtr fut;
  {
    py::gil_scoped_release release;
    fut = agent.rrefs().fetch(rref, timeout);
    agent.waitForReply(fut, rref->ownerId());
  }
  return finish(agent, fut, true);
}

// Functions a peer names but nobody registered are looked up, once, in the
// Python compilation unit (where @torch.jit.script puts them).
void installPythonResolver(Agent& agent) {
  agent.registry().setResolver([](const std::string& name) -> std::shared_ptr<Callable> {
    if (name.find("::") != std::string::npos) return nullptr;  // an operator name
    py::gil_scoped_acquire gil;
    try {
      auto cu = torch::jit::get_python_cu();
      if (auto* fn = cu->find_function(c10::QualifiedName(name))) return std::make_shared<Callable>(cu, fn);
    } catch (const std::exception&) {
    }
    return nullptr;
  });
}

py::dict histogramDict(const Histogram::Snapshot& h) {
  py::list buckets;  // (upper bound in seconds, cumulative count), Prometheus style
  uint64_t cumulative = 0;
  const auto& bounds = Histogram::boundsNs();
  for (size_t i = 0; i < Histogram::kBuckets; ++i) {
    cumulative += h.counts[i];
    buckets.append(py::make_tuple(bounds[i] / 1e9, cumulative));
  }
  py::dict d;
  d["buckets"] = buckets;
  d["count"] = h.count;
  d["sum_seconds"] = h.sumNs / 1e9;
  return d;
}

py::list callRows(const std::vector<Metrics::CallRow>& rows) {
  py::list out;
  for (const auto& r : rows) {
    py::dict d;
    d["function"] = r.function;
    d["peer"] = r.peer;
    d["calls"] = r.calls;
    d["errors"] = r.errors;
    d["latency"] = histogramDict(r.latency);
    out.append(d);
  }
  return out;
}

// The agent's counters and histograms; torchrpc.metrics() names peers and
// adds what lives elsewhere (bytes, RRefs, autograd contexts).
py::dict metricsDict(Agent& agent) {
  Metrics::Snapshot m;
  {
    py::gil_scoped_release release;
    m = agent.metrics().snapshot();
  }
  static const char* kinds[Metrics::kErrorKinds] = {"rpc",       "decode",    "timeout", "remote",
                                                    "peer_lost", "shutdown",  "argument", "not_found",
                                                    "forbidden", "auth",      "cancelled", "code_refused"};
  py::dict errors;
  for (size_t i = 0; i < Metrics::kErrorKinds; ++i) errors[kinds[i]] = m.errors[i];
  py::dict out;
  out["calls_sent"] = callRows(m.sent);
  out["calls_served"] = callRows(m.served);
  out["errors"] = errors;
  out["queue_wait"] = histogramDict(m.queueWait);
  out["handshake_failures"] = m.handshakeFailures;
  out["heartbeats_missed"] = m.heartbeatsMissed;
  return out;
}

}  // namespace

void initAutogradBindings(py::module_& m);

void initAgentBindings(py::module_& m) {
  py::class_<CallRelay, std::shared_ptr<CallRelay>>(m, "CallRelay", "Completes an asynchronous call's future.")
      .def("wait", &CallRelay::wait, py::call_guard<py::gil_scoped_release>(),
           "Waits for the reply, reading it itself where the transport allows, and completes the future.");
  py::class_<Agent, std::shared_ptr<Agent>>(m, "Agent", "One worker's RPC agent (see torchrpc.api).")
      .def(py::init([](const std::string& name, int64_t id, const py::dict& options) {
             AgentOptions o;
             TransportOptions& t = o.transport;
             // Every key is required: torchrpc.api builds this dict from RpcOptions.
             auto get = [&](const char* key) { return options[key]; };
             o.numWorkerThreads = get("num_worker_threads").cast<int64_t>();
             o.rpcTimeoutSeconds = get("rpc_timeout").cast<double>();
             o.pythonUdf = get("python_udf").cast<bool>();
             o.acceptCode = get("accept_code").cast<bool>();
             o.codeCacheSize = get("code_cache_size").cast<size_t>();
             o.metrics = get("metrics").cast<bool>();
             o.faults = get("faults").cast<std::string>();
             t.credentials.secret = get("secret").cast<std::string>();
             t.credentials.jobId = get("job_id").cast<std::string>();
             t.handshakeTimeout = get("handshake_timeout").cast<double>();
             t.maxPendingHandshakes = get("max_pending_handshakes").cast<size_t>();
             t.heartbeatInterval = get("heartbeat_interval").cast<double>();
             t.peerTimeout = get("peer_timeout").cast<double>();
             t.limits.maxFrameBytes = get("max_frame_bytes").cast<uint64_t>();
             for (const auto& name : get("transports").cast<std::vector<std::string>>()) {
               if (name == "tcp") {
                 TcpOptions tcp;
                 tcp.listenHost = get("listen_host").cast<std::string>();
                 tcp.advertisedHost = get("advertised_host").cast<std::string>();
                 tcp.maxInflightBytes = get("max_inflight_bytes").cast<uint64_t>();
                 o.transports.push_back(tcpTransport(tcp));
               } else if (name == "shm") {
                 ShmOptions shm;
                 shm.ringBytes = get("shm_ring_bytes").cast<uint64_t>();
                 shm.poolBytes = get("shm_pool_bytes").cast<uint64_t>();
                 o.transports.push_back(shmTransport(shm));
               } else {
                 throw RpcError(ErrorKind::kArgument, "torchrpc: unknown transport '" + name +
                                                          "' (known: 'shm', 'tcp')");
               }
             }
             auto agent = std::make_shared<Agent>(WorkerInfo{name, id, "", o.pythonUdf}, o);
             installPythonResolver(*agent);
             return agent;
           }),
           py::arg("name"), py::arg("id"), py::arg("options"))
      .def_property_readonly("address", &Agent::address)
      .def("set_workers",
           [](Agent& a, const std::vector<std::tuple<std::string, std::string, bool>>& ws) {
             std::vector<WorkerInfo> infos;
             for (size_t i = 0; i < ws.size(); ++i) {
               infos.push_back({std::get<0>(ws[i]), static_cast<int64_t>(i), std::get<1>(ws[i]), std::get<2>(ws[i])});
             }
             a.setWorkers(std::move(infos));
           })
      .def("register_function",
           [](Agent& a, const std::string& name, const torch::jit::StrongFunctionPtr& fn) {
             a.registry().add(name, std::make_shared<Callable>(fn.cu_, fn.function_));
           })
      .def("local_schema",
           [](Agent& a, const std::string& name) -> std::optional<c10::FunctionSchema> {
             py::gil_scoped_release release;  // the resolver takes the GIL itself
             auto c = a.registry().find(name);
             if (!c) return std::nullopt;
             return c->schema();
           })
      .def("register_callable",
           [](Agent& a, const std::string& name, std::shared_ptr<Callable> callable) {
             a.registry().add(name, std::move(callable));
           })
      .def("script_call", &scriptCall, py::arg("to"), py::arg("name"), py::arg("schema"), py::arg("args"),
           py::arg("kwargs"), py::arg("timeout"), py::arg("sync"), py::arg("out") = py::none(),
           py::arg("code") = py::none())
      .def("builtin_call", &builtinCall, py::arg("to"), py::arg("op_name"), py::arg("args"), py::arg("kwargs"),
           py::arg("timeout"), py::arg("sync"), py::arg("out") = py::none())
      .def("python_call", &pythonCall, py::arg("to"), py::arg("what"), py::arg("pickled"), py::arg("tensors"),
           py::arg("timeout"), py::arg("sync"), py::arg("loads") = py::none(), py::arg("keep") = py::none())
      .def("query_schema",
           [](Agent& a, int64_t to, const std::string& name, double timeout) {
             FuturePtr fut;
             {
               py::gil_scoped_release release;
               // Named apart from the function: metrics count its calls, not this look-up.
               fut = a.send(to, SchemaQuery(name).toMessage(), timeout, "schema of " + name);
             }
             return finish(a, fut, true).cast<std::string>();
           })
      .def("set_python_hooks", &setPythonHooks)
      .def("remote_script", &remoteScript, py::arg("to"), py::arg("name"), py::arg("schema"), py::arg("args"),
           py::arg("kwargs"), py::arg("timeout"), py::arg("code") = py::none())
      .def("remote_python", &remotePython)
      .def("remote_builtin",
           [](Agent& agent, int64_t to, const std::string& opName, const py::tuple& args, const py::dict& kwargs,
              double timeout) {
             auto [name, stack] = builtinStack(agent, to, opName, args, kwargs);
             return startRemote(agent, to, name, false, timeout, [&](const RRefId& id, const ForkId& fork) {
               return ScriptRemoteCall(name, stack, false, id, fork).toMessage(agent.rrefs().objectCodec());
             });
           })
      .def("rref_local",
           [](Agent& agent, const py::object& value, bool isPython) {
             c10::IValue v = isPython ? torch::jit::toIValue(value, c10::PyObjectType::get())
                                      : torch::jit::toIValue(value, c10::AnyType::get());
             return fromRRef(agent.rrefs().createLocalOwner(std::move(v), isPython));
           })
      .def("rref_fetch", &rrefFetch)
      .def("rref_info",
           [](Agent&, const py::object& obj) {
             RRefPtr r = toRRef(obj);
             return py::make_tuple(r->isOwner(), r->ownerId(), r->isPython(), r->confirmed());
           })
      .def("rref_id",
           [](Agent&, const py::object& obj) {
             const RRefId& id = toRRef(obj)->id();
             return py::make_tuple(id.createdOn, id.localId);
           })
      .def("rref_fork_id",
           [](Agent&, const py::object& obj) {
             // A user reference's own id; None for an owner.
             RRefPtr r = toRRef(obj);
             if (r->isOwner()) return py::object(py::none());
             return py::object(py::make_tuple(r->forkId().createdOn, r->forkId().localId));
           })
      .def("rref_owned",
           [](Agent& agent, const std::tuple<int64_t, int64_t>& id) {
             // Waits in to_here/local_value if the value is still being made.
             return fromRRef(agent.rrefs().ownerForFetch({std::get<0>(id), std::get<1>(id)}));
           })
      .def("rref_fork", [](Agent& agent, const py::object& obj) {
        return torch::jit::toPyObject(agent.rrefs().fork(toRRef(obj)));
      })
      .def("rref_unfork", [](Agent& agent, const py::tuple& info) {
        return fromRRef(agent.rrefs().unfork(torch::jit::toIValue(info, c10::AnyType::get())));
      })
      .def("debug_info", [](Agent& agent) {
        RRefDebugInfo d = agent.rrefs().debugInfo();
        py::dict out;
        out["owned_values"] = d.ownedValues;
        out["user_forks"] = d.userForks;
        out["pending_children"] = d.pendingChildren;
        out["unconfirmed_users"] = d.unconfirmedUsers;
        out["live_users"] = d.liveUsers;
        out["pending_requests"] = agent.pendingCount();
        out["autograd_contexts"] = agent.autograd().contexts().size();
        out["served_inline"] = agent.servedInline();
        py::dict conns;  // by peer id; torchrpc.api names them
        for (const auto& c : agent.connections()) {
          py::dict d;
          d["transport"] = c.transport;
          for (const auto& [k, v] : c.stats) d[py::str(k)] = v;
          conns[py::int_(c.peer)] = d;
        }
        out["connections"] = conns;
        py::dict traffic;  // by peer id
        for (const auto& w : agent.workers()) {
          const Agent::Traffic* t = agent.traffic(w.id);
          if (!t) continue;
          py::dict d;
          d["messages_sent"] = t->messagesSent.load();
          d["bytes_sent"] = t->bytesSent.load();
          d["messages_received"] = t->messagesReceived.load();
          d["bytes_received"] = t->bytesReceived.load();
          traffic[py::int_(w.id)] = d;
        }
        out["traffic"] = traffic;
        py::dict peers;  // by peer id
        for (const auto& p : agent.peerStates()) {
          peers[py::int_(p.peer)] = py::dict(py::arg("state") = p.state, py::arg("transport") = p.transport,
                                             py::arg("why") = p.why, py::arg("last_heard_s") = p.lastHeardSeconds);
        }
        out["peers"] = peers;
        py::list requests;
        for (const auto& r : agent.requestsInFlight()) {
          requests.append(py::dict(py::arg("direction") = r.outgoing ? "out" : "in", py::arg("id") = r.id,
                                   py::arg("peer") = r.peer, py::arg("function") = r.what,
                                   py::arg("state") = r.state, py::arg("age_s") = r.ageSeconds));
        }
        out["requests"] = requests;
        auto gid = [](const GloballyUniqueId& id) { return py::make_tuple(id.createdOn, id.localId); };
        py::list owned;
        for (const auto& o : agent.rrefs().ownedTable()) {
          py::list forks;
          for (const auto& [fork, holder] : o.forks) forks.append(py::make_tuple(gid(fork), holder));
          owned.append(py::dict(py::arg("rref") = gid(o.id), py::arg("forks") = forks,
                                py::arg("creating") = o.creating));
        }
        py::list unconfirmed;
        for (const auto& u : agent.rrefs().unconfirmedTable()) {
          unconfirmed.append(py::dict(py::arg("fork") = gid(u.fork), py::arg("rref") = gid(u.id),
                                      py::arg("owner") = u.owner));
        }
        out["rref_tables"] = py::dict(py::arg("owned") = owned, py::arg("unconfirmed_users") = unconfirmed);
        py::list contexts;
        for (const auto& [id, workers] : agent.autograd().contexts().list()) {
          contexts.append(py::dict(py::arg("context_id") = id, py::arg("workers") = workers));
        }
        out["autograd"] = contexts;
        out["code_cache"] = py::dict(py::arg("entries") = agent.codeCache().size(),
                                     py::arg("loads") = agent.codeCache().loads());
        return out;
      })
      .def("metrics", &metricsDict)
      .def("set_profile_remote", &Agent::setProfileRemote)
      .def("profile_remote", &Agent::profileRemote)
      .def("take_remote_profiles",
           [](Agent& agent) {
             py::list out;
             for (auto& p : agent.takeRemoteProfiles()) {
               out.append(py::make_tuple(p.what, p.peer, p.sentNs, p.receivedNs, p.thread, p.events));
             }
             return out;
           })
      .def("cancel", [](Agent& agent, const std::shared_ptr<PythonFutureWrapper>& fut) {
             py::gil_scoped_release release;
             return agent.cancel(fut->fut);
           })
      .def("lost_peers", &Agent::lostPeers)
      .def("left_peers", &Agent::leftPeers)
      .def("probe_peers", &Agent::probePeers, py::call_guard<py::gil_scoped_release>())
      .def("pending_count", &Agent::pendingCount)
      .def("wait_until_idle", &Agent::waitUntilIdle, py::call_guard<py::gil_scoped_release>())
      .def("shutdown", &Agent::shutdown, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("running", &Agent::running);
  m.def(
      "wait_received_forks",
      [] {
        if (!ReceivedForks::any()) return;  // keep the GIL: nothing to wait for
        py::gil_scoped_release release;
        ReceivedForks::waitConfirmed();
      },
      "Waits until the owners confirmed the RRefs the request being served carried.");
  m.def("current_agent", &currentAgent, "The running agent; RpcShutdownError if none.");
  m.def("set_current_agent", &setCurrentAgent, py::arg("agent").none(true),
        "Makes `agent` the one torch.ops.torchrpc uses (None clears it).");
  initAutogradBindings(m);
}

}  // namespace torchrpc
