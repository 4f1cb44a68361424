"""A local etcd cluster for tests and trials of `--store etcd`: N members of
Debian's etcd-server on loopback ports, each with its own data directory,
none of the system's (a systemd host may run one on 2379: these use their
own ports).  A member can be killed and started again, as a fault."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from ..errors import NFactorError
from ..kern import netns as netns_mod

ETCD = "/usr/bin/etcd"


class EtcdError(NFactorError):
    pass


def _free_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """n TCP ports free now on `ip` (held together, so all different)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((ip, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    def __init__(self, members: int = 3, base_port: int | None = None, name: str = "nfx", netns: str | None = None,
                 places: list[tuple[str | None, str]] | None = None):
        """base_port: members use base_port, base_port + 1, ... (default: free ports);
        netns: the network namespace the members run in (a node's: its loopback);
        places: instead, each member's (namespace, address): one per host of
        a node with hosts, on its fabric address (the ports are free there)."""
        if not os.path.exists(ETCD):
            raise EtcdError(f"{ETCD} not found: install Debian's etcd-server (vm/provision.sh does)")
        self.n, self.name, self.netns = (len(places) if places else members), name, netns
        self.places = places or [(netns, "127.0.0.1")] * self.n
        if base_port:
            self.ports = list(range(base_port, base_port + 2 * self.n))
        else:
            self.ports = []
            for ns, ip in self.places:
                with netns_mod.entered(ns):
                    free = _free_ports(2 * self.n, ip)  # (a port free everywhere it is used: none repeats)
                self.ports.append(next(p for p in free if p not in self.ports))
                self.ports.append(next(p for p in free if p not in self.ports))
        self.dir = tempfile.mkdtemp(prefix=f"nfactor-etcd-{name}-")
        self.procs: dict[int, subprocess.Popen | None] = {i: None for i in range(members)}

    def client_port(self, i: int) -> int:
        return self.ports[2 * i]

    def peer_port(self, i: int) -> int:
        return self.ports[2 * i + 1]

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.places[i][1]}:{self.client_port(i)}" for i in range(self.n)]

    def _cmd(self, i: int) -> list[str]:
        peers = ",".join(f"m{j}=http://{self.places[j][1]}:{self.peer_port(j)}" for j in range(self.n))
        ip = self.places[i][1]
        return [ETCD, "--name", f"m{i}", "--data-dir", os.path.join(self.dir, f"m{i}"),
                "--listen-client-urls", f"http://{ip}:{self.client_port(i)}",
                "--advertise-client-urls", f"http://{ip}:{self.client_port(i)}",
                "--listen-peer-urls", f"http://{ip}:{self.peer_port(i)}",
                "--initial-advertise-peer-urls", f"http://{ip}:{self.peer_port(i)}",
                "--initial-cluster", peers, "--initial-cluster-token", f"nfactor-{self.name}-{os.getpid()}",
                "--initial-cluster-state", "new",
                # a member is noticed gone within a second: faster elections than the defaults
                "--heartbeat-interval", "100", "--election-timeout", "500", "--log-level", "error"]

    def start(self, i: int | None = None) -> "EtcdCluster":
        for j in ([i] if i is not None else range(self.n)):
            with open(os.path.join(self.dir, f"m{j}.log"), "ab") as out, netns_mod.entered(self.places[j][0]):
                self.procs[j] = subprocess.Popen(self._cmd(j), stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until a member answers with a leader elected (polled with a deadline)."""
        from ..control.cluster_store import Members, StoreError
        m = Members(self.endpoints)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with netns_mod.entered(self.places[0][0]):
                    st = m.call(lambda c: c.status())
                if int(st.get("leader") or 0):
                    return
            except StoreError:
                pass
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd cluster not healthy after {timeout}s; logs in {self.dir}")
            for j, p in self.procs.items():
                if p is not None and p.poll() is not None:
                    log = open(os.path.join(self.dir, f"m{j}.log"), errors="replace").read()[-800:]
                    raise EtcdError(f"etcd member m{j} exited with {p.returncode}: {log}")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def stop(self) -> None:
        for i in list(self.procs):
            self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
