"""Typed bincode payloads: describe a Rust type once, read and write it as plain Python values.

Rust hosts call plugins with bincode payloads (the fast path). A Python handler
that declares the shape of its argument and result can take those calls; the
values it sees are the ones serde_json would produce for the same Rust type,
so one handler serves JSON and bincode callers alike:

=====================  ==================================  ==========================
Rust                   schema                              Python value
=====================  ==================================  ==========================
u8..u64, i8..i64       ``U8``..``U64``, ``I8``..``I64``    ``int``
f32, f64               ``F32``, ``F64``                    ``float``
bool                   ``BOOL``                            ``bool``
String                 ``STR``                             ``str``
Vec<u8> / serde_bytes  ``BYTES``                           ``bytes``
Option<T>              ``Option(T)``                       ``None`` or the value
Vec<T>                 ``Seq(T)``                          ``list``
(A, B)                 ``Tuple(A, B)``                     ``list``
struct                 ``Struct(("field", T), ...)``       ``dict``
enum                   ``Enum(("Unit", None), ("V", T))``  ``"Unit"`` or ``{"V": value}``
()                     ``UNIT``                            ``None``
=====================  ==================================  ==========================
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import types
import typing
from typing import Any

from .wire import ProtocolError, Reader, put_bytes, put_str, put_varint

__all__ = ["U8", "U16", "U32", "U64", "I8", "I16", "I32", "I64", "F32", "F64", "BOOL", "STR",
           "BYTES", "UNIT", "Option", "Seq", "Tuple", "Struct", "Enum", "Schema", "of", "from_plain",
           "to_plain", "encode", "decode", "json_schema"]


class Schema:
    """The bincode shape of a Rust type: writes and reads plain Python values."""

    def put(self, out: bytearray, value: Any) -> None:
        """Appends ``value`` in this shape."""
        raise NotImplementedError

    def get(self, r: Reader) -> Any:
        """Reads one value in this shape."""
        raise NotImplementedError


_Type = Schema


class _Unsigned(_Type):
    def __init__(self, bits: int) -> None:
        self.bits = bits

    def put(self, out: bytearray, value: Any) -> None:
        if self.bits == 8:
            out += struct.pack("<B", value)
        else:
            put_varint(out, int(value), self.bits)

    def get(self, r: Reader) -> Any:
        return r.u8() if self.bits == 8 else r.varint(self.bits)


class _Signed(_Type):
    def __init__(self, bits: int) -> None:
        self.bits = bits

    def put(self, out: bytearray, value: Any) -> None:
        value = int(value)
        if not -(1 << (self.bits - 1)) <= value < 1 << (self.bits - 1):
            raise ProtocolError("integer %d does not fit in i%d" % (value, self.bits))
        if self.bits == 8:
            out += struct.pack("<b", value)
        else:  # zigzag, then an unsigned varint
            put_varint(out, value << 1 if value >= 0 else ((-value) << 1) - 1, self.bits)

    def get(self, r: Reader) -> Any:
        if self.bits == 8:
            return struct.unpack("<b", r.take(1))[0]
        z = r.varint(self.bits)
        return (z >> 1) ^ -(z & 1)


class _Float(_Type):
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def put(self, out: bytearray, value: Any) -> None:
        out += struct.pack(self.fmt, float(value))

    def get(self, r: Reader) -> Any:
        return struct.unpack(self.fmt, r.take(struct.calcsize(self.fmt)))[0]


class _Bool(_Type):
    def put(self, out: bytearray, value: Any) -> None:
        out.append(1 if value else 0)

    def get(self, r: Reader) -> Any:
        b = r.u8()
        if b > 1:
            raise ProtocolError("invalid bool byte %d" % b)
        return b == 1


class _Str(_Type):
    def put(self, out: bytearray, value: Any) -> None:
        put_str(out, value)

    def get(self, r: Reader) -> Any:
        return r.str_()


class _Bytes(_Type):
    def put(self, out: bytearray, value: Any) -> None:
        put_bytes(out, bytes(value))

    def get(self, r: Reader) -> Any:
        return r.bytes_()


class _Unit(_Type):
    def put(self, out: bytearray, value: Any) -> None:
        pass

    def get(self, r: Reader) -> Any:
        return None


U8, U16, U32, U64 = _Unsigned(8), _Unsigned(16), _Unsigned(32), _Unsigned(64)
I8, I16, I32, I64 = _Signed(8), _Signed(16), _Signed(32), _Signed(64)
F32, F64 = _Float("<f"), _Float("<d")
BOOL, STR, BYTES, UNIT = _Bool(), _Str(), _Bytes(), _Unit()


class Option(_Type):
    """``Option<T>``: ``None`` or a value of ``T``."""

    def __init__(self, inner: Schema) -> None:
        self.inner = inner

    def put(self, out: bytearray, value: Any) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            self.inner.put(out, value)

    def get(self, r: Reader) -> Any:
        flag = r.u8()
        if flag == 0:
            return None
        if flag != 1:
            raise ProtocolError("invalid Option tag %d" % flag)
        return self.inner.get(r)


class Seq(_Type):
    """``Vec<T>``: a list."""

    def __init__(self, inner: Schema) -> None:
        self.inner = inner

    def put(self, out: bytearray, value: Any) -> None:
        put_varint(out, len(value))
        for v in value:
            self.inner.put(out, v)

    def get(self, r: Reader) -> Any:
        return [self.inner.get(r) for _ in range(r.varint())]


class Tuple(_Type):
    """A Rust tuple (or tuple struct): a list of fixed length."""

    def __init__(self, *items: Schema) -> None:
        self.items = items

    def put(self, out: bytearray, value: Any) -> None:
        if len(value) != len(self.items):
            raise ProtocolError("tuple of %d expected, got %d" % (len(self.items), len(value)))
        for t, v in zip(self.items, value):
            t.put(out, v)

    def get(self, r: Reader) -> Any:
        return [t.get(r) for t in self.items]


class Struct(_Type):
    """A struct with named fields, in declaration order: a dict."""

    def __init__(self, *fields: tuple[str, Schema]) -> None:
        self.fields = fields

    def put(self, out: bytearray, value: Any) -> None:
        for name, t in self.fields:
            if name not in value:
                raise ProtocolError("field %r is missing" % name)
            t.put(out, value[name])

    def get(self, r: Reader) -> Any:
        return {name: t.get(r) for name, t in self.fields}


class Enum(_Type):
    """An enum: unit variants are their name, others ``{name: value}`` (serde's JSON shape)."""

    def __init__(self, *variants: tuple[str, Schema | None]) -> None:
        self.variants = [(name, t) for name, t in variants]
        self.index = {name: i for i, (name, _) in enumerate(self.variants)}
        #: The Python enum this schema was made from by :func:`of`, if any.
        self.python: type[enum.Enum] | None = None

    def put(self, out: bytearray, value: Any) -> None:
        inner: Any = None
        if isinstance(value, enum.Enum):
            name = value.name
        elif isinstance(value, str):
            name = value
        elif isinstance(value, dict) and len(value) == 1:
            ((name, inner),) = value.items()
        else:
            raise ProtocolError("enum value must be a variant name or {name: value}, not %r"
                                % (value,))
        if name not in self.index:
            raise ProtocolError("unknown variant %r (known: %s)"
                                % (name, ", ".join(self.index)))
        i = self.index[name]
        put_varint(out, i, 32)
        t = self.variants[i][1]
        if t is not None:
            t.put(out, inner)

    def get(self, r: Reader) -> Any:
        i = r.varint(32)
        if i >= len(self.variants):
            raise ProtocolError("unknown variant index %d" % i)
        name, t = self.variants[i]
        if self.python is not None:
            return self.python[name]
        return name if t is None else {name: t.get(r)}


def encode(schema: Schema, value: Any) -> bytes:
    """The bincode bytes of ``value`` shaped as ``schema``."""
    out = bytearray()
    schema.put(out, value)
    return bytes(out)


def decode(schema: Schema, data: bytes) -> Any:
    """The value in ``data`` shaped as ``schema``; every byte must be used."""
    r = Reader(data)
    value = schema.get(r)
    r.done()
    return value


class _Dataclass(Schema):
    """A ``@dataclass``: its fields in declaration order, read back as an instance."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls, include_extras=True)
        self.fields = [(f.name, of(hints[f.name])) for f in dataclasses.fields(cls)]

    def put(self, out: bytearray, value: Any) -> None:
        for name, t in self.fields:
            if isinstance(value, dict):
                if name not in value:
                    raise ProtocolError("field %r is missing" % name)
                t.put(out, value[name])
            else:
                t.put(out, getattr(value, name))

    def get(self, r: Reader) -> Any:
        return self.cls(**{name: t.get(r) for name, t in self.fields})


# ``Optional[T]`` and (from Python 3.10) ``T | None``.
_UNIONS: tuple[Any, ...] = (typing.Union, getattr(types, "UnionType", typing.Union))


def of(tp: Any) -> Schema:
    """The schema of a Python type annotation, so a handler's hints can describe it.

    ``int`` is ``I64``, ``float`` ``F64``, ``str``, ``bool``, ``bytes``, ``None`` (unit),
    ``T | None`` an ``Option``, ``list[T]`` a ``Seq``, ``tuple[A, B]`` a ``Tuple``, a
    ``@dataclass`` a struct (read back as an instance), an ``enum.Enum`` an enum of unit
    variants (by member name). Other integer widths: ``Annotated[int, schema.U64]``.
    Anything else raises ``TypeError``; use the combinators for it.
    """
    if isinstance(tp, Schema):
        return tp
    if typing.get_origin(tp) is typing.Annotated:
        for extra in tp.__metadata__:
            if isinstance(extra, Schema):
                return extra
        return of(typing.get_args(tp)[0])
    simple: dict[Any, Schema] = {int: I64, float: F64, str: STR, bool: BOOL, bytes: BYTES,
                                 type(None): UNIT, None: UNIT}
    if tp in simple:
        return simple[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _Dataclass(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        e = Enum(*[(m.name, None) for m in tp])
        e.python = tp
        return e
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS and len(args) == 2 and type(None) in args:
        return Option(of(next(a for a in args if a is not type(None))))
    if origin is list and len(args) == 1:
        return Seq(of(args[0]))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return Tuple(*[of(a) for a in args])
    raise TypeError("no bincode schema for %r; describe it with plugd_plugin.schema types" % (tp,))


def json_schema(tp: Any) -> dict[str, Any] | None:
    """The JSON Schema of a type annotation (what plugd checks a JSON call's input
    against, and shows), or None where the annotation says nothing checkable.

    ``int``, ``float``, ``str``, ``bool``, ``None``, ``list[T]``, ``tuple``, ``dict[str, T]``,
    ``T | None`` and other unions, ``Literal[...]``, ``enum.Enum`` (its values), and a
    ``@dataclass`` (an object: its fields, those without a default required, no others).
    """
    if tp is None or tp is Any or isinstance(tp, Schema):
        return None
    if typing.get_origin(tp) is typing.Annotated:
        return json_schema(typing.get_args(tp)[0])
    simple = {bool: "boolean", int: "integer", float: "number", str: "string",
              type(None): "null", list: "array", tuple: "array", dict: "object"}
    if tp in simple:
        return {"type": simple[tp]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props = {f.name: json_schema(hints.get(f.name)) or {} for f in dataclasses.fields(tp)}
        required = [f.name for f in dataclasses.fields(tp)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        return {"type": "object", "properties": props, "required": required,
                "additionalProperties": False}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in _UNIONS:
        options = [json_schema(a) for a in args]
        if any(o is None for o in options):
            return None
        return {"anyOf": options}
    if origin in (list, tuple) or (isinstance(origin, type) and origin.__name__ == "Sequence"):
        item = json_schema(args[0]) if args and (origin is list or len(args) == 2
                                                  and args[1] is Ellipsis) else None
        return {"type": "array", "items": item} if item else {"type": "array"}
    if origin is dict:
        value = json_schema(args[1]) if len(args) == 2 else None
        return {"type": "object", "additionalProperties": value} if value else {"type": "object"}
    return None


def from_plain(tp: Any, value: Any) -> Any:
    """A JSON-decoded ``value`` as the annotated type: dataclasses and enums are built."""
    if typing.get_origin(tp) is typing.Annotated:
        return from_plain(typing.get_args(tp)[0], value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp, include_extras=True)
        return tp(**{f.name: from_plain(hints[f.name], value[f.name])
                     for f in dataclasses.fields(tp) if f.name in value})
    if isinstance(tp, type) and issubclass(tp, enum.Enum) and isinstance(value, str):
        return tp[value]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is not None and origin in _UNIONS:
        inner = [a for a in args if a is not type(None)]
        return from_plain(inner[0], value) if len(inner) == 1 else value
    if origin is list and len(args) == 1 and isinstance(value, list):
        return [from_plain(args[0], v) for v in value]
    return value


def to_plain(value: Any) -> Any:
    """``value`` as JSON can carry it: dataclasses as dicts, enums by member name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
