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

import struct

from .wire import ProtocolError, Reader, put_bytes, put_str, put_varint

__all__ = ["U8", "U16", "U32", "U64", "I8", "I16", "I32", "I64", "F32", "F64", "BOOL", "STR",
           "BYTES", "UNIT", "Option", "Seq", "Tuple", "Struct", "Enum", "encode", "decode"]


class _Type:
    def put(self, out, value):
        raise NotImplementedError

    def get(self, r):
        raise NotImplementedError


class _Unsigned(_Type):
    def __init__(self, bits):
        self.bits = bits

    def put(self, out, value):
        if self.bits == 8:
            out += struct.pack("<B", value)
        else:
            put_varint(out, int(value), self.bits)

    def get(self, r):
        return r.u8() if self.bits == 8 else r.varint(self.bits)


class _Signed(_Type):
    def __init__(self, bits):
        self.bits = bits

    def put(self, out, value):
        value = int(value)
        if not -(1 << (self.bits - 1)) <= value < 1 << (self.bits - 1):
            raise ProtocolError("integer %d does not fit in i%d" % (value, self.bits))
        if self.bits == 8:
            out += struct.pack("<b", value)
        else:  # zigzag, then an unsigned varint
            put_varint(out, value << 1 if value >= 0 else ((-value) << 1) - 1, self.bits)

    def get(self, r):
        if self.bits == 8:
            return struct.unpack("<b", r.take(1))[0]
        z = r.varint(self.bits)
        return (z >> 1) ^ -(z & 1)


class _Float(_Type):
    def __init__(self, fmt):
        self.fmt = fmt

    def put(self, out, value):
        out += struct.pack(self.fmt, float(value))

    def get(self, r):
        return struct.unpack(self.fmt, r.take(struct.calcsize(self.fmt)))[0]


class _Bool(_Type):
    def put(self, out, value):
        out.append(1 if value else 0)

    def get(self, r):
        b = r.u8()
        if b > 1:
            raise ProtocolError("invalid bool byte %d" % b)
        return b == 1


class _Str(_Type):
    def put(self, out, value):
        put_str(out, value)

    def get(self, r):
        return r.str_()


class _Bytes(_Type):
    def put(self, out, value):
        put_bytes(out, bytes(value))

    def get(self, r):
        return r.bytes_()


class _Unit(_Type):
    def put(self, out, value):
        pass

    def get(self, r):
        return None


U8, U16, U32, U64 = _Unsigned(8), _Unsigned(16), _Unsigned(32), _Unsigned(64)
I8, I16, I32, I64 = _Signed(8), _Signed(16), _Signed(32), _Signed(64)
F32, F64 = _Float("<f"), _Float("<d")
BOOL, STR, BYTES, UNIT = _Bool(), _Str(), _Bytes(), _Unit()


class Option(_Type):
    """``Option<T>``: ``None`` or a value of ``T``."""

    def __init__(self, inner):
        self.inner = inner

    def put(self, out, value):
        if value is None:
            out.append(0)
        else:
            out.append(1)
            self.inner.put(out, value)

    def get(self, r):
        flag = r.u8()
        if flag == 0:
            return None
        if flag != 1:
            raise ProtocolError("invalid Option tag %d" % flag)
        return self.inner.get(r)


class Seq(_Type):
    """``Vec<T>``: a list."""

    def __init__(self, inner):
        self.inner = inner

    def put(self, out, value):
        put_varint(out, len(value))
        for v in value:
            self.inner.put(out, v)

    def get(self, r):
        return [self.inner.get(r) for _ in range(r.varint())]


class Tuple(_Type):
    """A Rust tuple (or tuple struct): a list of fixed length."""

    def __init__(self, *items):
        self.items = items

    def put(self, out, value):
        if len(value) != len(self.items):
            raise ProtocolError("tuple of %d expected, got %d" % (len(self.items), len(value)))
        for t, v in zip(self.items, value):
            t.put(out, v)

    def get(self, r):
        return [t.get(r) for t in self.items]


class Struct(_Type):
    """A struct with named fields, in declaration order: a dict."""

    def __init__(self, *fields):
        self.fields = fields

    def put(self, out, value):
        for name, t in self.fields:
            if name not in value:
                raise ProtocolError("field %r is missing" % name)
            t.put(out, value[name])

    def get(self, r):
        return {name: t.get(r) for name, t in self.fields}


class Enum(_Type):
    """An enum: unit variants are their name, others ``{name: value}`` (serde's JSON shape)."""

    def __init__(self, *variants):
        self.variants = [(name, t) for name, t in variants]
        self.index = {name: i for i, (name, _) in enumerate(self.variants)}

    def put(self, out, value):
        if isinstance(value, str):
            name, inner = value, None
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

    def get(self, r):
        i = r.varint(32)
        if i >= len(self.variants):
            raise ProtocolError("unknown variant index %d" % i)
        name, t = self.variants[i]
        return name if t is None else {name: t.get(r)}


def encode(schema, value):
    """The bincode bytes of ``value`` shaped as ``schema``."""
    out = bytearray()
    schema.put(out, value)
    return bytes(out)


def decode(schema, data):
    """The value in ``data`` shaped as ``schema``; every byte must be used."""
    r = Reader(data)
    value = schema.get(r)
    r.done()
    return value
