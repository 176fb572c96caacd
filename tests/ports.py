"""Loopback ports for the Python tests' servers (tests/common/mod.rs does the same in Rust)."""
import itertools
import os
import socket

_NEXT_PORT = itertools.count()


def free_port():
    """A loopback port nobody listens on, below the kernel's ephemeral range: a port from
    bind(0) comes from that range, where the clients' connections take theirs too, so one could
    take it before the server binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low = max(1024, ephemeral - 12000)
    span = max(1, ephemeral - low)
    start = (os.getpid() * 7919) % span
    for _ in range(span):
        port = low + (start + next(_NEXT_PORT)) % span
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {low}..{low + span}")
