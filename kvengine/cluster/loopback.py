"""Keeping a local Ray instance on loopback: nothing `kvengine cluster` starts on one machine listens on another
interface, except the endpoint when `--host` says so.

Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, every worker) to the node's IP, but `ray.init`
replaces a loopback `_node_ip_address` with the machine's routable IP (services.resolve_ip_for_localhost), and
Ray Serve binds each replica's inter-deployment gRPC server to every interface ("[::]:0"). Two narrow patches
of those private functions, nothing else: `local_node_on_loopback` keeps 127.0.0.1 as the node's IP while
`ray.init` runs; `replica_grpc_on_loopback`, called in each replica's constructor, binds that replica's
gRPC server to 127.0.0.1 when its node's IP is loopback (so a replica on a real cluster is unchanged). If a
Ray release renames them, the patch is skipped and Ray's own binding applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "::ffff:127.0.0.1") or host.startswith("127.")


@contextlib.contextmanager
def local_node_on_loopback() -> Iterator[None]:
    """While it is open, `ray.init(_node_ip_address="127.0.0.1")` keeps that address for the local node."""
    from ray._private import services

    original = getattr(services, "resolve_ip_for_localhost", None)
    if original is None:
        yield
        return
    services.resolve_ip_for_localhost = lambda host: host if is_loopback(host) else original(host)
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def replica_grpc_on_loopback() -> None:
    """In a Serve replica's process: bind its inter-deployment gRPC server to loopback if the node is loopback."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "kvengine_loopback", False):
        return
    if not is_loopback(ray.util.get_node_ip_address()):
        return

    def on_loopback(server: object, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address[5:]}"
        return original(server, address)

    on_loopback.kvengine_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback
