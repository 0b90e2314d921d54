#pragma once

// Little-endian writer and bounds-checked reader over a byte range. Every
// read checks the remaining length first, so a decoder built on Reader can
// never read past its input, whatever the input says.

#include <cstdint>
#include <cstring>
#include <string>

#include "errors.h"

namespace torchrpc {

class Writer {
 public:
  explicit Writer(std::string& out) : out_(out) {}
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u16(uint16_t v) { raw(&v, 2); }
  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void i64(int64_t v) { raw(&v, 8); }
  void f64(double v) { raw(&v, 8); }
  void bytes(const std::string& s) {
    u32(checkedLength(s.size()));
    out_.append(s);
  }
  void raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  size_t size() const { return out_.size(); }

  static uint32_t checkedLength(size_t n) {
    if (n > UINT32_MAX) {
      throw RpcError(ErrorKind::kRpc, "torchrpc: value too large to encode (" +
                                          std::to_string(n) + " items or bytes)");
    }
    return static_cast<uint32_t>(n);
  }

 private:
  std::string& out_;
};

// Assumes a little-endian host (x86-64, aarch64); frame.cpp checks this once.
class Reader {
 public:
  Reader(const char* begin, size_t size) : p_(begin), end_(begin + size), begin_(begin) {}
  uint8_t u8() { return take<uint8_t>(); }
  uint16_t u16() { return take<uint16_t>(); }
  uint32_t u32() { return take<uint32_t>(); }
  uint64_t u64() { return take<uint64_t>(); }
  int64_t i64() { return take<int64_t>(); }
  double f64() { return take<double>(); }
  std::string bytes() {
    uint32_t n = u32();
    need(n, "string");
    std::string s(p_, n);
    p_ += n;
    return s;
  }
  // A count of items that each take at least `minItemBytes` more bytes; checked
  // against what is left so a corrupt count cannot cause a huge reservation.
  uint32_t count(size_t minItemBytes, const char* what) {
    uint32_t n = u32();
    if (minItemBytes > 0 && n > remaining() / minItemBytes) {
      throwDecode(std::string(what) + " claims " + std::to_string(n) + " items but only " +
                  std::to_string(remaining()) + " bytes remain");
    }
    return n;
  }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }
  size_t offset() const { return static_cast<size_t>(p_ - begin_); }

 private:
  void need(size_t n, const char* what) {
    if (n > remaining()) {
      throwDecode(std::string("truncated ") + what + " at offset " + std::to_string(offset()) +
                  ": needs " + std::to_string(n) + " bytes, " + std::to_string(remaining()) +
                  " remain");
    }
  }
  template <typename T>
  T take() {
    need(sizeof(T), "field");
    T v;
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    return v;
  }

  const char* p_;
  const char* end_;
  const char* begin_;
};

}  // namespace torchrpc
