#include "agent/faulty_transport.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <unordered_map>


namespace torchrpc {

std::vector<FaultRule> parseFaults(const std::string& spec) {
  std::vector<FaultRule> rules;
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item.empty()) continue;
    auto bad = [&](const std::string& why) {
      return RpcError(ErrorKind::kArgument, "torchrpc: bad fault '" + item + "': " + why +
                                                " (expected TYPE:drop:P, TYPE:delay:SECONDS or TYPE:dup:P)");
    };
    auto a = item.find(':');
    auto b = a == std::string::npos ? a : item.find(':', a + 1);
    if (b == std::string::npos) throw bad("needs three parts");
    std::string type = item.substr(0, a), action = item.substr(a + 1, b - a - 1), value = item.substr(b + 1);
    FaultRule r{};
    bool found = false;
    for (uint16_t t = 1; t <= kMaxMessageType; ++t) {
      if (messageTypeName(static_cast<MessageType>(t)) == type) {
        r.type = static_cast<MessageType>(t);
        found = true;
      }
    }
    if (!found) throw bad("unknown message type '" + type + "'");
    if (action == "drop") r.action = FaultRule::Action::kDrop;
    else if (action == "delay") r.action = FaultRule::Action::kDelay;
    else if (action == "dup" || action == "duplicate") r.action = FaultRule::Action::kDuplicate;
    else throw bad("unknown action '" + action + "'");
    try {
      r.value = std::stod(value);
    } catch (const std::exception&) {
      throw bad("'" + value + "' is not a number");
    }
    if (r.value < 0 || (r.action != FaultRule::Action::kDelay && r.value > 1)) throw bad("value out of range");
    rules.push_back(r);
  }
  return rules;
}

namespace {

class FaultyTransport;

class FaultyConnection : public Connection {
 public:
  FaultyConnection(std::shared_ptr<Connection> inner, FaultyTransport& transport)
      : inner_(std::move(inner)), transport_(transport) {
    peerId_ = inner_->peerId();
    serial_ = inner_->serial();
  }
  void send(const Message& message) override;
  void close() override { inner_->close(); }
  bool pollUntil(const std::function<bool()>& done, std::chrono::steady_clock::time_point until) override {
    return inner_->pollUntil(done, until);
  }
  const char* transportName() const override { return inner_->transportName(); }
  double secondsSinceHeard() const override { return inner_->secondsSinceHeard(); }
  std::vector<std::pair<std::string, int64_t>> stats() const override { return inner_->stats(); }
  const std::shared_ptr<Connection>& inner() const { return inner_; }

 private:
  std::shared_ptr<Connection> inner_;
  FaultyTransport& transport_;
};

class FaultyTransport : public Transport {
 public:
  FaultyTransport(const TransportFactory& makeInner, const TransportOptions& options, TransportCallbacks callbacks,
                  std::vector<FaultRule> rules)
      : rules_(std::move(rules)), outer_(std::move(callbacks)), rng_(std::random_device{}()) {
    TransportCallbacks inner;
    inner.onMessage = [this](const std::shared_ptr<Connection>& c, Message&& m) { outer_.onMessage(wrap(c), std::move(m)); };
    inner.onClosed = [this](const std::shared_ptr<Connection>& c, CloseReason r, const std::string& why) {
      auto w = wrap(c);
      {
        std::lock_guard<std::mutex> g(mu_);
        wrapped_.erase(c.get());
      }
      outer_.onClosed(w, r, why);
    };
    inner.onRejected = outer_.onRejected;
    inner_ = makeInner(options, std::move(inner));
    delayer_ = std::thread([this] { delayLoop(); });
  }
  ~FaultyTransport() override { shutdown(); }

  std::string scheme() const override { return inner_->scheme(); }
  std::string address() const override { return inner_->address(); }
  bool reaches(const std::string& address) const override { return inner_->reaches(address); }
  std::shared_ptr<Connection> connect(const std::string& address, int64_t peerId, const std::string& peerName) override {
    return wrap(inner_->connect(address, peerId, peerName));
  }
  void broadcast(const Message& message) override { inner_->broadcast(message); }
  void shutdown() override {
    decltype(delayed_) dropped;  // freed unlocked (see delayLoop)
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stopped_) return;
      stopped_ = true;
      dropped.swap(delayed_);
    }
    cv_.notify_all();
    if (delayer_.joinable()) delayer_.join();
    inner_->shutdown();
    std::lock_guard<std::mutex> g(mu_);
    wrapped_.clear();
  }

  // Sends `m` on `inner` with whatever the rules for its type decide.
  void send(const std::shared_ptr<Connection>& inner, const Message& m) {
    int copies = 1;
    double delay = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (const FaultRule& r : rules_) {
        if (r.type != m.type) continue;
        std::uniform_real_distribution<double> coin(0, 1);
        switch (r.action) {
          case FaultRule::Action::kDrop:
            if (coin(rng_) < r.value) return;
            break;
          case FaultRule::Action::kDuplicate:
            if (coin(rng_) < r.value) copies = 2;
            break;
          case FaultRule::Action::kDelay:
            delay = r.value;
            break;
        }
      }
      if (delay > 0) {
        auto when = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                           std::chrono::duration<double>(delay));
        for (int i = 0; i < copies; ++i) delayed_.emplace(when, std::make_pair(inner, m));
        cv_.notify_all();
        return;
      }
    }
    for (int i = 0; i < copies; ++i) inner->send(m);
  }

 private:
  std::shared_ptr<Connection> wrap(const std::shared_ptr<Connection>& inner) {
    std::lock_guard<std::mutex> g(mu_);
    auto& w = wrapped_[inner.get()];
    if (!w) w = std::make_shared<FaultyConnection>(inner, *this);
    return w;
  }

  void delayLoop() {
    std::unique_lock<std::mutex> g(mu_);
    while (!stopped_) {
      if (delayed_.empty()) {
        cv_.wait(g);
        continue;
      }
      auto first = delayed_.begin();
      if (std::chrono::steady_clock::now() < first->first) {
        cv_.wait_until(g, first->first);
        continue;
      }
      auto item = std::make_unique<std::pair<std::shared_ptr<Connection>, Message>>(std::move(first->second));
      delayed_.erase(first);
      g.unlock();
      try {
        item->first->send(item->second);
      } catch (const RpcError&) {
      }
      // Freed unlocked: the last reference to a tensor Python let go of
      // takes the GIL, and a thread holding the GIL may be waiting for mu_.
      item.reset();
      g.lock();
    }
  }

  std::vector<FaultRule> rules_;
  TransportCallbacks outer_;
  std::unique_ptr<Transport> inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopped_ = false;
  std::mt19937_64 rng_;
  std::unordered_map<Connection*, std::shared_ptr<FaultyConnection>> wrapped_;
  std::multimap<std::chrono::steady_clock::time_point, std::pair<std::shared_ptr<Connection>, Message>> delayed_;
  std::thread delayer_;
};

void FaultyConnection::send(const Message& message) { transport_.send(inner_, message); }

}  // namespace

TransportFactory withFaults(TransportFactory inner, const std::string& faults) {
  std::vector<FaultRule> rules = parseFaults(faults);
  if (rules.empty()) return inner;
  return [inner = std::move(inner), rules](const TransportOptions& options, TransportCallbacks callbacks) {
    return std::unique_ptr<Transport>(std::make_unique<FaultyTransport>(inner, options, std::move(callbacks), rules));
  };
}

}  // namespace torchrpc
