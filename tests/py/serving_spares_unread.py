"""Run by tests/servers.rs with a plugin's virtualenv python (uvicorn installed): a
connection that uvicorn's shutdown finds with no request read yet (the race Served.stop
cannot see: one accepted just before the server closed, set up late on a busy machine) is
served once its request comes, not closed. Prints the client's answer; exits 1 if it was
not a 200."""

import asyncio
import os
import socket
import sys
import time

sys.path.insert(0, os.environ["PLUGD_SDK_PATH"])
from plugd_plugin import serving  # noqa: E402


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def main() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    serving._sockets, serving._names = [listener], ["tcp"]
    served = await serving.start_asgi(app, log_level="warning")
    loop = asyncio.get_running_loop()
    conn = await loop.run_in_executor(None, socket.create_connection, ("127.0.0.1", port))
    while not served.server.server_state.connections:
        await asyncio.sleep(0.01)
    # What stop() does, minus its wait: uvicorn's shutdown begins with the request unread.
    for server in served.server.servers:
        server.close()
    serving._spare_unread_connections(served.server.server_state, loop, loop.time() + 5)
    served.server.should_exit = True

    def client() -> bytes:
        time.sleep(0.3)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := conn.recv(4096):
            got += chunk
        return got

    answer = await loop.run_in_executor(None, client)
    await served.task
    print(answer.decode(errors="replace"))
    return 0 if answer.startswith(b"HTTP/1.1 200") else 1


sys.exit(asyncio.run(main()))
