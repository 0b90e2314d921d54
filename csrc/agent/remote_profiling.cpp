#include "agent/remote_profiling.h"

#include <chrono>
#include <cstdio>

namespace torchrpc {
namespace {

thread_local std::vector<EventCollector::Event>* tlsEvents = nullptr;

struct Started : at::ObserverContext {
  int64_t ns;
};

std::unique_ptr<at::ObserverContext> onStart(const at::RecordFunction&) {
  auto ctx = std::make_unique<Started>();
  ctx->ns = wallNs();
  return ctx;
}

void onEnd(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  if (!tlsEvents || !ctx) return;
  tlsEvents->push_back({fn.name(), static_cast<Started*>(ctx)->ns, wallNs(), at::RecordFunction::currentThreadId()});
}

void appendJsonString(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += '"';
}

}  // namespace

int64_t wallNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

EventCollector::EventCollector() : outer_(tlsEvents) {
  tlsEvents = &events_;
  handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(&onStart, &onEnd).needsInputs(false));
}

EventCollector::~EventCollector() {
  at::removeCallback(handle_);
  tlsEvents = outer_;
}

std::string profileJson(const std::string& worker, int64_t receivedNs, int64_t sentNs,
                        const std::vector<EventCollector::Event>& events) {
  std::string out = "{\"worker\": ";
  appendJsonString(out, worker);
  out += ", \"received_ns\": " + std::to_string(receivedNs) + ", \"sent_ns\": " + std::to_string(sentNs) +
         ", \"events\": [";
  for (size_t i = 0; i < events.size(); ++i) {
    if (i) out += ", ";
    out += '[';
    appendJsonString(out, events[i].name);
    out += ", " + std::to_string(events[i].startNs) + ", " + std::to_string(events[i].endNs) + ", " +
           std::to_string(events[i].thread) + ']';
  }
  out += "]}";
  return out;
}

}  // namespace torchrpc
