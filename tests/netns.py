"""Two "hosts" on one machine: network namespaces joined by a veth pair (needs root and iproute2).

Everything created here is removed on exit; addresses are in 10.231.x.0/24 inside the namespaces only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "needs iproute2 (ip) and util-linux (unshare)"
    name = f"xftprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        return f"ip netns add failed: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args, ns: str | None = None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts(subnet: int = 0):
    """Yields [(namespace, interface, address, hostname), ...] for two hosts on one link."""
    tag = f"{os.getpid() % 100000}{subnet}"
    hosts = [(f"xfta{tag}", f"xva{tag}", f"10.231.{subnet}.1", "hosta"),
             (f"xftb{tag}", f"xvb{tag}", f"10.231.{subnet}.2", "hostb")]
    try:
        for ns, *_ in hosts:
            _ip("netns", "add", ns)
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, ifname, addr, _ in hosts:
            _ip("link", "set", ifname, "netns", ns)
            _ip("addr", "add", f"{addr}/24", "dev", ifname, ns=ns)
            _ip("link", "set", ifname, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        yield hosts
    finally:
        for ns, *_ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def on_host(host, argv: list[str]) -> list[str]:
    """argv run inside the host's network namespace under its own hostname."""
    ns, _, _, hostname = host
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
            f'hostname {hostname} && exec "$@"', "sh", *argv]


def cut_link(host) -> None:
    _ip("link", "set", host[1], "down", ns=host[0])
