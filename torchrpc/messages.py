"""Every torchrpc message type, constructible and encodable from Python.

The message catalog lives in C++ (csrc/messages/message.cpp); this module
builds one small class per message type from it, so the two cannot drift.
Tests and tools use these to make frames and read them back:

    >>> msg = ScriptCall(qualified_name="f", args=(torch.ones(2), 3), is_async=False)
    >>> decode(msg.encode()) == msg
"""

import enum
import functools
from typing import Any, Dict, Optional

import torch

from torchrpc import _C

__all__ = ["MessageType", "Message", "encode", "decode", "MESSAGE_CLASSES"]

_SPECS = _C.message_specs()

MessageType = enum.IntEnum("MessageType", [(name, value) for value, name, _, _ in _SPECS])
MessageType.__doc__ = "The numbered message types of the wire format (csrc/wire/message_type.h)."


class Message:
    """Base of the generated message classes.

    `fields` maps field name to value. `types` optionally overrides the
    TorchScript type a field is converted with (e.g. {"args": "Tuple[int, List[int]]"});
    after decode it holds the type annotation of each decoded value.
    """

    TYPE: MessageType
    FIELDS: Dict[str, str]  # field name -> TorchScript type, "Message" for a wrapped message

    def __init__(self, *, id: int = 0, types: Optional[Dict[str, Any]] = None, **fields):
        missing = set(self.FIELDS) - set(fields)
        extra = set(fields) - set(self.FIELDS)
        if missing or extra:
            raise TypeError(
                f"{type(self).__name__} takes fields {list(self.FIELDS)}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        self.id = id
        self.fields = fields
        self.types = dict(types or {})

    def __getattr__(self, name):
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def _wire_fields(self):
        out = []
        for name, kind in self.FIELDS.items():
            value = self.fields[name]
            if kind == "Message":
                value = (int(value.TYPE), value._wire_fields())
            override = self.types.get(name)
            out.append((value, _as_jit_type(override) if isinstance(override, str) else override))
        return out

    def encode(self) -> bytes:
        """One complete frame (header, payload, descriptors, tensor bytes)."""
        return _C.encode_message(int(self.TYPE), self.id, self._wire_fields())

    def __repr__(self):
        body = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"{type(self).__name__}(id={self.id}, {body})"


@functools.lru_cache(maxsize=None)
def _as_jit_type(annotation: str):
    """The JIT type an annotation string names, parsed by the TorchScript compiler."""
    cu = torch.jit.CompilationUnit(f"def f(x: {annotation}):\n    return x\n")
    return cu.f.schema.arguments[0].type


def _from_wire(type_value: int, msg_id: int, wire_fields) -> Message:
    cls = MESSAGE_CLASSES[MessageType(type_value)]
    fields, types = {}, {}
    for (name, kind), (value, annotation) in zip(cls.FIELDS.items(), wire_fields):
        if kind == "Message":
            value = _from_wire(value[0], 0, value[1])
        else:
            types[name] = annotation
        fields[name] = value
    return cls(id=msg_id, types=types, **fields)


def encode(message: Message) -> bytes:
    """Encodes `message` as one frame."""
    return message.encode()


def decode(data) -> Message:
    """Decodes one frame; raises torchrpc.DecodeError naming what is wrong."""
    type_value, msg_id, wire_fields = _C.decode_message(data)
    return _from_wire(type_value, msg_id, wire_fields)


MESSAGE_CLASSES: Dict[MessageType, type] = {}
for _value, _name, _class_name, _fields in _SPECS:
    _cls = type(
        _class_name,
        (Message,),
        {
            "TYPE": MessageType(_value),
            "FIELDS": dict(_fields),
            "__doc__": f"{_name} message; fields: "
            + ", ".join(f"{n}: {t}" for n, t in _fields),
            "__module__": __name__,
        },
    )
    MESSAGE_CLASSES[MessageType(_value)] = _cls
    globals()[_class_name] = _cls
    __all__.append(_class_name)
