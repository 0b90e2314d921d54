#pragma once

// Remote profiling (torchrpc.profile_remote): a caller under the profiler
// sends its calls as RUN_WITH_PROFILING_REQ; the callee records the
// RecordFunction events (operators, TorchScript functions, record_function
// ranges) of that request on the thread serving it, and answers with them
// as RUN_WITH_PROFILING_RESP. Times are wall-clock nanoseconds; with the
// callee's receive and send times the caller corrects for the offset
// between the two clocks (torchrpc/profiling.py).

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/record_function.h>

namespace torchrpc {

int64_t wallNs();

// A profiler range "<prefix><what>" over a scope, when a profiler is on (the
// name is built only then).
class ProfilerRange {
 public:
  ProfilerRange(const char* prefix, const std::string& what) : guard_(at::RecordScope::USER_SCOPE) {
    if (guard_.isActive()) {
      std::string name = prefix + what;
      guard_.before(std::string_view(name), c10::ArrayRef<const c10::IValue>{});
    }
  }

 private:
  at::RecordFunction guard_;
};

// What a profiled call's response brought back, for torchrpc/profiling.py.
struct RemoteProfile {
  std::string what;  // the call
  int64_t peer;
  int64_t sentNs, receivedNs;  // this worker's clock: request sent, response received
  uint64_t thread;             // the sending thread (RecordFunction's id, as profilers name threads)
  std::string events;          // the callee's JSON (profileJson)
};

// Records the events of the current thread while alive (a thread-local
// RecordFunction callback: other threads are not slowed).
class EventCollector {
 public:
  EventCollector();
  ~EventCollector();
  EventCollector(const EventCollector&) = delete;
  EventCollector& operator=(const EventCollector&) = delete;

  struct Event {
    std::string name;
    int64_t startNs, endNs;
    uint64_t thread;  // RecordFunction's id: the caller's profiler keeps each thread's nesting apart
  };
  // The events so far (and no more after this).
  std::vector<Event> take() { return std::move(events_); }

 private:
  std::vector<Event> events_;
  std::vector<Event>* outer_;  // a collector already active on this thread (nested requests)
  at::CallbackHandle handle_;
};

// What a RUN_WITH_PROFILING_RESP carries: {"worker": ..., "received_ns": ...,
// "sent_ns": ..., "events": [[name, start_ns, end_ns, thread], ...]}.
std::string profileJson(const std::string& worker, int64_t receivedNs, int64_t sentNs,
                        const std::vector<EventCollector::Event>& events);

}  // namespace torchrpc
