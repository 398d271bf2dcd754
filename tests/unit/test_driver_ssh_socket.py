"""The socket the driver's SSH connections run on (`ssh._nodelay_socket`): no Nagle on our side, and what
it reads acknowledged at once, so sshd's small replies are not held back waiting for an acknowledgement
(the first session after login used to wait 40 ms for one). Real TCP on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from fargate_ci_driver.ssh import QuickAckSocket, _nodelay_socket

needs_quickack = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")


@pytest.fixture
def server():
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def test_the_socket_has_no_nagle_and_reads_through_the_quick_ack_wrapper(server):
    sock = _nodelay_socket("127.0.0.1", server.getsockname()[1], timeout=5)
    peer, _ = server.accept()
    try:
        assert isinstance(sock, QuickAckSocket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        peer.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        assert sock.recv(100) == b"SSH-2.0-OpenSSH_9.2\r\n"
        sock.sendall(b"ours")  # everything else is the socket's own
        assert peer.recv(10) == b"ours"
        sock.settimeout(0.5)
        assert sock.gettimeout() == 0.5 and sock.fileno() > 0
    finally:
        sock.close()
        peer.close()


@needs_quickack
def test_every_read_asks_the_kernel_to_acknowledge_at_once(server):
    sock = _nodelay_socket("127.0.0.1", server.getsockname()[1], timeout=5)
    peer, _ = server.accept()
    try:
        for n in range(3):
            # Delayed acknowledgements (the kernel's "pingpong" mode) switched on, as request-reply traffic
            # does by itself: the wrapper's read must switch them off again.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            peer.sendall(b"x%d" % n)
            assert sock.recv(10) == b"x%d" % n
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        sock.close()
        peer.close()


def test_a_read_after_the_socket_closed_fails_as_a_socket_does(server):
    sock = _nodelay_socket("127.0.0.1", server.getsockname()[1], timeout=5)
    peer, _ = server.accept()
    peer.close()
    sock.close()
    with pytest.raises(OSError):
        sock.recv(10)
