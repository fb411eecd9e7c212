"""The Python encoder and decoder against the golden vectors the Rust codec is checked with."""

import io
import os
import unittest

from plugd_plugin import schema, wire
from plugd_plugin.wire import CODEC_BINCODE, CODEC_JSON, CallError, Payload

GOLDEN = os.environ.get("PLUGD_GOLDEN") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "plugin-proto", "golden",
    "vectors.txt")

# The messages PROTOCOL.md section 6 names, built with the Python types.
EXPECTED = {
    "hello": wire.Hello(wire.MAGIC, 1, 1, "echo", "1.0.0", ["echo"], "py/0.1"),
    "welcome": wire.Welcome(1, "{}", 1000, 16777216, None),
    "welcome_with_state": wire.Welcome(1, '{"k":1}', 0, 65536, b"\xde\xad"),
    "reject": wire.Reject("no"),
    "ready": wire.Ready(),
    "call_json": wire.Call(1, "echo", 2000, Payload(CODEC_JSON, b'{"a":1}')),
    "call_bincode": wire.Call(300, "on_tick", 0, Payload(CODEC_BINCODE, b"\x01\x02\x03")),
    "reply_ok": wire.Reply(1, Payload(CODEC_JSON, b'{"a":1}')),
    "reply_err": wire.Reply(2, CallError(wire.UNKNOWN_METHOD, "nope")),
    "chunk": wire.Chunk(3, Payload(CODEC_JSON, b"1")),
    "cancel": wire.Cancel(4),
    # Protocol version 2 (host calls): the same messages, now also the other way.
    "hello_v2": wire.Hello(wire.MAGIC, 1, 2, "strat", "1.0.0", ["on_tick"], "rs/0.2"),
    "welcome_v2": wire.Welcome(2, "{}", 1000, 16777216, None),
    "host_call": wire.Call(1, "send_order", 500, Payload(CODEC_JSON, b'{"qty":1}')),
    "host_reply": wire.Reply(1, Payload(CODEC_JSON, b'"filled"')),
    # Protocol version 3: a call with the caller's per-call configuration.
    "call_cfg": wire.CallCfg(5, "search", 0, Payload(CODEC_JSON, b'"q"'),
                             Payload(CODEC_JSON, b'{"key":"k"}')),
    "notify": wire.Notify("tick", Payload(CODEC_JSON, b"[]")),
    "ping": wire.Ping(7),
    "pong": wire.Pong(7),
    "shutdown": wire.Shutdown(5000),
    "state": wire.State(b"\x01\x02\x03\x04"),
    "goodbye": wire.Goodbye(),
    "log": wire.Log(wire.LOG_WARN, "hi"),
}


def load_vectors():
    vectors = {}
    with open(GOLDEN) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, hexframe = line.split()
                vectors[name] = bytes.fromhex(hexframe)
    return vectors


class GoldenVectors(unittest.TestCase):
    def setUp(self):
        self.vectors = load_vectors()

    def test_every_vector_is_covered(self):
        self.assertEqual(sorted(self.vectors), sorted(EXPECTED),
                         "vectors.txt and this test name different messages; add the new one here")

    def test_encoder_writes_the_golden_bytes(self):
        for name, msg in EXPECTED.items():
            with self.subTest(name=name):
                self.assertEqual(wire.frame(msg).hex(), self.vectors[name].hex())

    def test_decoder_reads_the_golden_bytes(self):
        for name, frame in self.vectors.items():
            with self.subTest(name=name):
                body = wire.read_frame(io.BytesIO(frame))
                self.assertEqual(wire.decode(body), EXPECTED[name])


class Varints(unittest.TestCase):
    def enc(self, v, bits=64):
        out = bytearray()
        wire.put_varint(out, v, bits)
        return bytes(out)

    def test_boundaries(self):
        cases = [(0, "00"), (250, "fa"), (251, "fbfb00"), (1000, "fbe803"),
                 (65535, "fbffff"), (65536, "fc00000100"), (16777216, "fc00000001"),
                 (2 ** 32, "fd0000000001000000")]
        for v, h in cases:
            with self.subTest(v=v):
                self.assertEqual(self.enc(v).hex(), h)
                self.assertEqual(wire.Reader(bytes.fromhex(h)).varint(), v)

    def test_width_is_checked(self):
        with self.assertRaises(wire.ProtocolError):
            self.enc(70000, 16)
        with self.assertRaises(wire.ProtocolError):
            wire.Reader(bytes.fromhex("fc00000100")).varint(16)
        with self.assertRaises(wire.ProtocolError):
            wire.Reader(b"\xfe").varint()


class Malformed(unittest.TestCase):
    def test_bad_bodies_raise_protocol_error(self):
        for body in [b"", b"\x63", b"\x04\x01", b"\x09\x07\x00", b"\x05\x01\x02",
                     b"\x0e\x09\x00", b"\x01\x01\x02\x7b\x7d\x00\x00\x02"]:
            with self.subTest(body=body.hex()):
                with self.assertRaises(wire.ProtocolError):
                    wire.decode(body)

    def test_frames_over_the_limit_are_refused_before_reading(self):
        stream = io.BytesIO(b"\xff\xff\xff\x7f")
        with self.assertRaises(wire.ProtocolError) as e:
            wire.read_frame(stream, max_frame=1024)
        self.assertIn("exceeds the limit", str(e.exception))
        with self.assertRaises(wire.ProtocolError):
            wire.read_frame(io.BytesIO(b"\x00\x00\x00\x00"))
        with self.assertRaises(wire.ProtocolError):
            wire.read_frame(io.BytesIO(b"\x05\x00\x00\x00\x03"))
        self.assertIsNone(wire.read_frame(io.BytesIO(b"")))


# The tick-engine's types (examples/src/lib.rs) and bytes the Rust codec produces for them;
# the Rust side of this pair is checked in examples' tests (python.rs).
TICK = schema.Struct(("symbol", schema.STR), ("bid", schema.F64), ("ask", schema.F64),
                     ("ts", schema.U64))
SIDE = schema.Enum(("Buy", None), ("Sell", None))
ORDER = schema.Enum(("Hold", None), ("Limit", schema.Struct(
    ("side", SIDE), ("qty", schema.I64), ("price", schema.F64))))


class Schemas(unittest.TestCase):
    def test_struct_and_enum_round_trip(self):
        tick = {"symbol": "EURUSD", "bid": 1.1, "ask": 1.2, "ts": 1234567890123}
        self.assertEqual(schema.decode(TICK, schema.encode(TICK, tick)), tick)
        for order in ["Hold", {"Limit": {"side": "Sell", "qty": -3, "price": 1.15}}]:
            self.assertEqual(schema.decode(ORDER, schema.encode(ORDER, order)), order)
        self.assertEqual(schema.encode(ORDER, "Hold"), b"\x00")

    def test_zigzag(self):
        for v, h in [(0, "00"), (-1, "01"), (1, "02"), (-2, "03"), (200, "fb9001"),
                     (-(2 ** 63), "fdffffffffffffffff")]:
            with self.subTest(v=v):
                self.assertEqual(schema.encode(schema.I64, v).hex(), h)
                self.assertEqual(schema.decode(schema.I64, bytes.fromhex(h)), v)

    def test_options_sequences_and_errors(self):
        t = schema.Seq(schema.Option(schema.U32))
        self.assertEqual(schema.encode(t, [None, 5]).hex(), "02000105")
        self.assertEqual(schema.decode(t, bytes.fromhex("02000105")), [None, 5])
        with self.assertRaises(wire.ProtocolError):
            schema.encode(ORDER, "Sideways")
        with self.assertRaises(wire.ProtocolError):
            schema.decode(ORDER, b"\x07")
        with self.assertRaises(wire.ProtocolError):
            schema.decode(TICK, b"\x01")


if __name__ == "__main__":
    unittest.main()
