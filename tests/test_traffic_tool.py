"""The traffic tool's own sockets (no root): what the tests' flow
accounting relies on."""
from __future__ import annotations

import socket

from nfactor_xdp.tools.traffic import _socket


def test_every_sending_socket_is_a_flow_of_its_own():
    """udp-send's sockets take ephemeral ports: two sharing one would merge
    two flows into one at the sink (seen with SO_REUSEADDR: ~4% of 2,000)."""
    socks = [_socket(socket.AF_INET, ("127.0.0.1", 0)) for _ in range(2000)]
    try:
        assert len({s.getsockname()[1] for s in socks}) == len(socks)
    finally:
        for s in socks:
            s.close()

