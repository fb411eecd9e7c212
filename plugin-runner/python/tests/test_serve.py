"""serve() driven by a fake supervisor over a real socketpair, in a real child process."""

import json
import os
import socket
import subprocess
import sys
import unittest

from plugd_plugin import schema, wire
from plugd_plugin.wire import CODEC_BINCODE, CODEC_JSON, CallError, Payload

HERE = os.path.dirname(os.path.abspath(__file__))
POINT = schema.Struct(("x", schema.I32), ("y", schema.I32))


class FakeSupervisor:
    def __init__(self, state=None, config='{"greeting":"hi"}', kind=socket.SOCK_STREAM, proto=1,
                 script="sample_plugin.py", ready=True):
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        env = dict(os.environ, PLUGD_FD=str(theirs.fileno()), PLUGD_PLUGIN_NAME="sample",
                   PLUGD_PLUGIN_VERSION="1.2.3",
                   PYTHONPATH=os.path.dirname(HERE))
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, script)],
                                     pass_fds=[theirs.fileno()], env=env,
                                     stderr=subprocess.PIPE)
        theirs.close()
        ours.settimeout(30)
        self.sock = ours
        self.reader = wire.SocketReader(ours)
        self.hello = self.recv()
        self.send(wire.Welcome(proto, config, 1000, wire.DEFAULT_MAX_FRAME, state))
        self.logs = []
        self.ready = self.recv() if ready else None

    def send(self, msg):
        wire.send_all(self.sock, wire.frame(msg))

    def recv(self):
        while True:
            body = wire.read_frame(self.reader)
            if body is None:
                return None
            msg = wire.decode(body)
            if isinstance(msg, wire.Log):
                self.logs.append(msg)
                continue
            if isinstance(msg, wire.Notify) and msg.method == "plugd.describe":
                self.described = json.loads(msg.payload.data)
                continue
            return msg

    def call(self, id_, method, payload):
        self.send(wire.Call(id_, method, 0, payload))
        chunks = []
        while True:
            msg = self.recv()
            if isinstance(msg, wire.Chunk):
                chunks.append(msg)
                continue
            return msg, chunks

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.reader.close()
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stderr.close()


def js(value):
    return Payload(CODEC_JSON, json.dumps(value).encode())


class Serve(unittest.TestCase):
    def setUp(self):
        self.sup = FakeSupervisor()
        self.addCleanup(self.sup.close)

    def test_handshake(self):
        h = self.sup.hello
        self.assertEqual((h.magic, h.proto_min, h.proto_max), (wire.MAGIC, 1, 3))
        self.assertEqual((h.name, h.version), ("sample", "1.2.3"))
        self.assertEqual(h.methods, ["add", "boom", "bumped", "count_to", "fail", "flip", "greet",
                                     "keyed", "order", "relay", "shout"])
        self.assertTrue(h.sdk.startswith("plugd-plugin-py/"))
        self.assertEqual(self.sup.ready, wire.Ready())
        # Before Ready, the methods described from their docstrings and type hints.
        described = {m["name"]: m for m in self.sup.described}
        self.assertEqual(described["bumped"], {
            "name": "bumped", "description": 'Bare @method; also the target of a Notify named "bumped".',
            "input": {"type": "integer"}, "output": {"type": "integer"}})
        order = described["flip"]["input"]
        self.assertEqual(order["type"], "object")
        self.assertEqual(order["properties"]["qty"], {"type": "integer"})
        self.assertEqual(order["properties"]["price"], {"anyOf": [{"type": "number"}, {"type": "null"}]})
        self.assertEqual(described["shout"], {"name": "shout"})
        # The per-call cfg is not part of the method's input.
        self.assertEqual(described["keyed"]["input"], {"type": "string"})

    def test_a_call_with_cfg_hands_it_to_the_handler_that_declares_it(self):
        self.sup.send(wire.CallCfg(1, "keyed", 0, js("news"), js({"key": "s3cret"})))
        self.assertEqual(self.sup.recv(), wire.Reply(1, js("news with a key of 6 chars")))
        reply, _ = self.sup.call(2, "keyed", js("news"))
        self.assertEqual(reply.result, js("news with no key"))
        # A handler that takes no cfg is called without it.
        self.sup.send(wire.CallCfg(3, "greet", 0, js("bob"), js({"key": "s3cret"})))
        self.assertEqual(self.sup.recv(), wire.Reply(3, Payload(CODEC_JSON, b'"hi bob"')))
        # A cfg that is not JSON is the caller's mistake, said as such.
        self.sup.send(wire.CallCfg(4, "keyed", 0, js("x"), Payload(CODEC_BINCODE, b"\x01")))
        reply = self.sup.recv()
        self.assertEqual(reply.result.code, wire.BAD_PAYLOAD)
        self.assertIn("cfg is not JSON", reply.result.message)
        self.assertFalse(any("s3cret" in log.message for log in self.sup.logs), self.sup.logs)

    def test_calls_errors_streams_and_pings(self):
        reply, _ = self.sup.call(1, "greet", js("bob"))
        self.assertEqual(reply, wire.Reply(1, Payload(CODEC_JSON, b'"hi bob"')))
        reply, _ = self.sup.call(2, "add", Payload(CODEC_BINCODE, schema.encode(POINT, {"x": 2, "y": -5})))
        self.assertEqual(reply.result, Payload(CODEC_BINCODE, schema.encode(schema.I64, -3)))
        reply, _ = self.sup.call(3, "add", js({"x": 1, "y": 1}))
        self.assertEqual(reply.result, Payload(CODEC_JSON, b"2"))
        reply, _ = self.sup.call(10, "shout", js("hey"))
        self.assertEqual(reply.result, Payload(CODEC_JSON, b'"HEY"'))
        reply, _ = self.sup.call(4, "nope", js(None))
        self.assertEqual(reply.result.code, wire.UNKNOWN_METHOD)
        self.assertIn("greet", reply.result.message)
        reply, _ = self.sup.call(5, "fail", js(None))
        self.assertEqual(reply.result, CallError(wire.FAILED, "as asked"))
        reply, _ = self.sup.call(6, "boom", js(None))
        self.assertEqual(reply.result.code, wire.PANICKED)
        self.assertIn("ZeroDivisionError", reply.result.message)
        reply, _ = self.sup.call(7, "add", Payload(CODEC_BINCODE, b"\x01"))
        self.assertEqual(reply.result.code, wire.BAD_PAYLOAD)
        reply, _ = self.sup.call(8, "greet", Payload(CODEC_BINCODE, b"\x03abc"))
        self.assertEqual(reply.result.code, wire.BAD_PAYLOAD)
        self.assertIn("args=", reply.result.message)
        reply, chunks = self.sup.call(9, "count_to", js(3))
        self.assertEqual([c.payload.data for c in chunks], [b"0", b"1", b"2"])
        self.assertEqual([c.id for c in chunks], [9, 9, 9])
        self.assertEqual(reply.result, Payload(CODEC_JSON, b'"done"'))
        self.sup.send(wire.Ping(42))
        self.assertEqual(self.sup.recv(), wire.Pong(42))
        self.assertTrue(any("greeting bob" in log.message and log.level == wire.LOG_INFO
                            for log in self.sup.logs), self.sup.logs)

    def test_type_hints_describe_bincode_and_json_alike(self):
        order = schema.Struct(("side", schema.Enum(("Buy", None), ("Sell", None))),
                              ("qty", schema.U32), ("price", schema.Option(schema.F64)))
        arg = schema.encode(order, {"side": "Buy", "qty": 3, "price": 1.5})
        reply, _ = self.sup.call(1, "flip", Payload(CODEC_BINCODE, arg))
        want = schema.encode(order, {"side": "Sell", "qty": 6, "price": None})
        self.assertEqual(reply.result, Payload(CODEC_BINCODE, want))
        reply, _ = self.sup.call(2, "flip", js({"side": "Sell", "qty": 1, "price": None}))
        self.assertEqual(json.loads(reply.result.data), {"side": "Buy", "qty": 2, "price": None})
        reply, _ = self.sup.call(3, "bumped", Payload(CODEC_BINCODE, schema.encode(schema.I64, 5)))
        self.assertEqual(reply.result, Payload(CODEC_BINCODE, schema.encode(schema.I64, 5)))

    def test_a_notify_runs_the_handler_of_that_name(self):
        self.sup.send(wire.Notify("bumped", js(4)))
        reply, _ = self.sup.call(1, "bumped", js(1))
        self.assertEqual(reply.result, Payload(CODEC_JSON, b"5"))

    def test_seqpacket_socket_carries_frames_larger_than_a_record(self):
        sup = FakeSupervisor(kind=socket.SOCK_SEQPACKET)
        self.addCleanup(sup.close)
        self.assertEqual(sup.ready, wire.Ready())
        text = "x" * (300 * 1024)  # several records each way
        reply, _ = sup.call(1, "shout", js(text))
        self.assertEqual(reply.result, Payload(CODEC_JSON, json.dumps(text.upper()).encode()))
        reply, _ = sup.call(2, "greet", js("ann"))
        self.assertEqual(reply.result, Payload(CODEC_JSON, b'"hi ann"'))

    def test_shutdown_hands_state_to_the_next_instance(self):
        for i in range(3):
            self.sup.call(i, "greet", js("x"))
        self.sup.send(wire.Shutdown(1000))
        self.assertEqual(self.sup.recv(), wire.State(b"3"))
        self.assertEqual(self.sup.recv(), wire.Goodbye())
        self.assertEqual(self.sup.proc.wait(timeout=30), 0)
        nxt = FakeSupervisor(state=b"3")
        self.addCleanup(nxt.close)
        nxt.call(1, "greet", js("y"))
        nxt.send(wire.Shutdown(1000))
        self.assertEqual(nxt.recv(), wire.State(b"4"))

    def test_a_wrong_way_message_ends_the_plugin_with_status_3(self):
        self.sup.send(wire.Ready())
        self.assertEqual(self.sup.proc.wait(timeout=30), 3)
        self.assertIn(b"only a plugin may send", self.sup.proc.stderr.read())

    def test_closed_socket_ends_the_plugin(self):
        self.sup.sock.shutdown(socket.SHUT_RDWR)
        self.assertEqual(self.sup.proc.wait(timeout=30), 0)


class Raises(unittest.TestCase):
    def test_serve_raises_instead_of_exiting(self):
        from plugd_plugin import NotSupervised, Plugin, ServeError, serve
        saved = os.environ.pop("PLUGD_FD", None)
        try:
            with self.assertRaises(NotSupervised) as caught:
                serve(Plugin())
        finally:
            if saved is not None:
                os.environ["PLUGD_FD"] = saved
        self.assertIsInstance(caught.exception, ServeError)
        self.assertEqual(caught.exception.code, 2)


class NotSupervised(unittest.TestCase):
    def test_running_outside_plugd_says_so(self):
        env = {k: v for k, v in os.environ.items() if k != "PLUGD_FD"}
        env["PYTHONPATH"] = os.path.dirname(HERE)
        p = subprocess.run([sys.executable, os.path.join(HERE, "sample_plugin.py")], env=env,
                           capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"not started by a plugd supervisor", p.stderr)


if __name__ == "__main__":
    unittest.main()


class HostCalls(unittest.TestCase):
    """Protocol 2: a handler calls the host while it serves a call."""

    def test_a_handler_calls_the_host_answers_pings_meanwhile_and_keeps_the_deadline(self):
        sup = FakeSupervisor(proto=2)
        self.addCleanup(sup.close)
        sup.send(wire.Call(7, "order", 2_000_000, js(3)))
        host_call = sup.recv()
        self.assertIsInstance(host_call, wire.Call)
        self.assertEqual((host_call.method, host_call.payload), ("send_order", js({"qty": 3})))
        self.assertTrue(0 < host_call.deadline_us < 2_000_000,
                        "no more than the call being served has left")
        sup.send(wire.Ping(5))  # the plugin answers while it waits for the host
        self.assertEqual(sup.recv(), wire.Pong(5))
        sup.send(wire.Reply(host_call.id, js("filled 3")))
        self.assertEqual(sup.recv(), wire.Reply(7, js("filled 3")))

    def test_plugin_calls_go_through_plugd_call_and_refusals_say_why(self):
        sup = FakeSupervisor(proto=2)
        self.addCleanup(sup.close)
        sup.send(wire.Call(8, "relay", 0, js({"plugin": "exchange", "method": "fill", "arg": 1})))
        host_call = sup.recv()
        self.assertEqual(host_call.method, wire.PLUGIN_CALL)
        self.assertEqual(host_call.payload, Payload(
            CODEC_BINCODE, wire.plugin_call("exchange", "fill", js(1))))
        sup.send(wire.Reply(host_call.id, CallError(wire.ErrorCode.DENIED, "add it to [calls]")))
        reply = sup.recv()
        self.assertEqual(reply.id, 8)
        self.assertEqual(reply.result.code, wire.ErrorCode.FAILED, reply.result.message)
        self.assertIn("DENIED: add it to [calls]", reply.result.message)

    def test_a_host_that_speaks_protocol_1_takes_no_calls(self):
        sup = FakeSupervisor(proto=1)
        self.addCleanup(sup.close)
        reply, _ = sup.call(9, "order", js(1))
        self.assertEqual(reply.result.code, wire.ErrorCode.FAILED)
        self.assertIn("protocol 1", reply.result.message)


class Async(unittest.TestCase):
    """Async handlers and hooks: served concurrently on asyncio."""

    def sup(self, **kw):
        sup = FakeSupervisor(proto=2, script="async_plugin.py", config="{}", **kw)
        self.addCleanup(sup.close)
        return sup

    def test_async_calls_run_concurrently_and_pings_are_answered_meanwhile(self):
        sup = self.sup()
        self.assertEqual(sup.ready, wire.Ready())
        sup.send(wire.Call(1, "wait_gate", 0, js(None)))
        sup.send(wire.Ping(9))
        self.assertEqual(sup.recv(), wire.Pong(9), "the loop reads while a handler awaits")
        sup.send(wire.Call(2, "open_gate", 0, js(None)))
        self.assertEqual(sup.recv(), wire.Reply(2, js("opened")))
        self.assertEqual(sup.recv(), wire.Reply(1, js("through")))
        reply, chunks = sup.call(3, "ticks", js(3))
        self.assertEqual([c.payload.data for c in chunks], [b"0", b"1", b"2"])
        self.assertEqual(reply.result, Payload(CODEC_JSON, b"null"))
        reply, _ = sup.call(4, "refuse", js(None))
        self.assertEqual(reply.result, CallError(wire.FAILED, "market closed"))

    def test_an_awaited_host_call_lets_other_calls_through(self):
        sup = self.sup()
        sup.send(wire.Call(1, "order", 1_000_000, js(2)))
        host_call = sup.recv()
        self.assertEqual((host_call.method, host_call.payload), ("send_order", js({"qty": 2})))
        self.assertTrue(0 < host_call.deadline_us < 1_000_000, "the call's deadline is kept")
        reply, _ = sup.call(2, "open_gate", js(None))  # served while the order waits
        self.assertEqual(reply.result, js("opened"))
        sup.send(wire.Reply(host_call.id, js("filled")))
        reply = sup.recv()
        self.assertEqual((reply.id, json.loads(reply.result.data)), (1, {"fill": "filled"}))

    def test_cancel_stops_the_task_and_hooks_are_awaited_in_order(self):
        sup = self.sup()
        sup.send(wire.Call(1, "sleep_forever", 0, js(None)))
        sup.send(wire.Ping(1))
        self.assertEqual(sup.recv(), wire.Pong(1))
        sup.send(wire.Cancel(1))
        sup.send(wire.Shutdown(1000))
        self.assertEqual(sup.recv(), wire.State(b"loaded,started,slept,cancelled,stopped"),
                         "no Reply for the cancelled call; on_stop before on_shutdown")
        self.assertEqual(sup.recv(), wire.Goodbye())
        self.assertEqual(sup.proc.wait(timeout=30), 0)

    def test_an_async_restore_state_is_done_before_the_next_call(self):
        sup = self.sup()
        sup.send(wire.Notify("plugd.state", Payload(CODEC_BINCODE, b"7")))
        reply, _ = sup.call(1, "seen", js(None))
        self.assertEqual(json.loads(reply.result.data), ["loaded", "started", "restored 7"])

    def test_a_failing_async_on_load_is_said_with_reject(self):
        sup = FakeSupervisor(proto=2, script="async_plugin.py", config='{"fail": true}',
                             ready=False)
        self.addCleanup(sup.close)
        said = sup.recv()
        self.assertIsInstance(said, wire.Reject)
        self.assertIn("no exchange to connect to", said.reason)
        self.assertEqual(sup.proc.wait(timeout=30), 1)
