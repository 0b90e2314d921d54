#pragma once

// RRefs between Python and C++: torchrpc.RRef holds a
// torch.classes.torchrpc.RRef script object, which these convert.

#include <pybind11/pybind11.h>

#include "rref/rref.h"

namespace torchrpc {

RRefPtr toRRef(const pybind11::handle& obj);
pybind11::object fromRRef(RRefPtr rref);

}  // namespace torchrpc
