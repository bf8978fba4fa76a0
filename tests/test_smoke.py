import asyncio

import pytest

from tests.conftest import running_server


@pytest.mark.asyncio
async def test_echo_roundtrip() -> None:
    async with running_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello\x00\xff")
        assert await reader.readexactly(7) == b"hello\x00\xff"
        writer.close()
        await writer.wait_closed()


def test_subprocess_server(serve_process) -> None:
    import socket

    srv = serve_process()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    assert srv.stop() == 0
