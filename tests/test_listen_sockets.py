"""The HTTP servers' listening sockets hand out connections with Nagle's algorithm off.

asyncio sets TCP_NODELAY on an accepted socket only when its proto says TCP, and an accepted
socket inherits the listening socket's proto: one made with proto 0 served every connection with
Nagle on, and a stream's first chunk then waited for the client's delayed ACK of the headers
(+40 ms to the TTFT of a request sent right after another on a keep-alive connection). Both
`pdserve serve` (services/serve.py) and `pdserve router --workers` (services/router/workers.py)
make their own sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pdserve.services.router.workers import shared_port_socket
from pdserve.services.serve import _bind


def _nodelay_of_accepted(sock: socket.socket) -> int:
    async def main() -> int:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                  socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()
    return asyncio.run(main())


@pytest.mark.parametrize("make", [lambda: _bind("127.0.0.1", 0), lambda: shared_port_socket("127.0.0.1", 0)],
                         ids=["serve", "router-workers"])
def test_accepted_connections_have_nagle_off(make):
    sock = make()
    sock.listen(8)
    sock.setblocking(False)
    assert _nodelay_of_accepted(sock) != 0
