"""A node's configuration and where its files live.

  /sys/fs/bpf/nfactor/<name>/   pinned maps (kept across agent restarts)
  /run/nfactor/<name>/          node.json (state), runtime query sockets (0700)
  /run/nfactor/<name>/ctl/      control sockets, one per process (0700)
  /var/log/nfactor/<name>/      agent and runtime logs (kept after down)
  /var/lib/nfactor/<name>/      policy.json: service chain rules, NF config (kept)
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import stat
from dataclasses import asdict, dataclass, field

from .. import logs
from ..kern import layouts as L
from ..kern.maps import pin_dir
from . import fabric
from ..errors import NFactorError

RUN_ROOT = "/run/nfactor"
LOG_ROOT = "/var/log/nfactor"
LIB_ROOT = "/var/lib/nfactor"
DEFAULT_NODE = "nfx"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")


class ConfigError(NFactorError, ValueError):
    pass


def parse_endpoint(text: str) -> tuple[str, int]:
    """'host:port' (IPv6: '[::1]:2379') -> (host, port); raises ValueError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {text!r} is not host:port")
    return host.strip("[]"), int(port)


def run_dir(name: str) -> str:
    return os.path.join(RUN_ROOT, name)


def log_dir(name: str) -> str:
    return os.path.join(LOG_ROOT, name)


def log_path(name: str, what: str = "node") -> str:
    os.makedirs(log_dir(name), exist_ok=True)
    return os.path.join(log_dir(name), f"{what}.log")


def stderr_log_path(name: str, role: str) -> str:
    """Where process `role`'s standard error goes: what does not pass through
    its logger (logs.py explains why a file of its own)."""
    return log_path(name, f"{role}.stderr")


def cluster_key_path() -> str:
    return os.path.join(LIB_ROOT, "cluster.key")


def controller_log_path(name: str) -> str:
    return os.path.join(LIB_ROOT, name, "controller.db")


def policy_path(name: str) -> str:
    return os.path.join(LIB_ROOT, name, "policy.json")


def state_path(name: str) -> str:
    return os.path.join(run_dir(name), "node.json")


def runtime_socket(name: str, rt_id: int) -> str:
    return os.path.join(run_dir(name), f"rt{rt_id}.sock")


def control_dir(name: str) -> str:
    """Where the node's processes bind their control sockets: made 0700 here
    (with the run directory) and refused if another user owns it, so only
    root can send them a message or take a name."""
    path = os.path.join(run_dir(name), "ctl")
    for d in (run_dir(name), path):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(f"{d} is not a directory of uid {os.geteuid()}; remove it")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(d, 0o700)
    return path


def control_address(cfg: "NodeConfig", role: str, host: int | None = None) -> str | tuple[str, int]:
    """Where `role` receives control messages: a UNIX socket in the run
    directory on one host; with hosts, a UDP port on the fabric address of
    its host (`host`: whose supervisor; a client's: this host's)."""
    if not cfg.hosts:
        return control_socket(cfg.name, role)
    return fabric.control_address(cfg.host_addresses, cfg.control_port, role,
                                  cfg.host_id if host is None else host)


def controller_addresses(cfg: "NodeConfig", role: str = "controller") -> list:
    """Where to send to the controller (`role` controller or heartbeat): with
    controllers on several hosts, to each (only the leader has bound its)."""
    if not cfg.hosts:
        return [control_socket(cfg.name, role)]
    return [control_address(cfg, role, host=h) for h in cfg.controller_host_ids]


def control_socket(name: str, role: str) -> str:
    """The control socket of `role`: controller, heartbeat (the controller's
    socket for heartbeats alone), supervisor, switch, rtN, or a client's."""
    return os.path.join(control_dir(name), f"{role}.sock")


def exit_reason_path(name: str, role: str) -> str:
    return os.path.join(run_dir(name), f"{role}.exit")


def write_exit_reason(name: str, role: str, why: str) -> None:
    """A process that gives up says why, for the supervisor's status."""
    try:
        with open(exit_reason_path(name, role), "w") as f:
            f.write(why[:2000])
    except OSError:
        pass


def take_exit_reason(name: str, role: str) -> str | None:
    try:
        with open(exit_reason_path(name, role)) as f:
            why = f.read()
        os.unlink(exit_reason_path(name, role))
        return why
    except OSError:
        return None


def runtime_ports(rt_id: int) -> tuple[str, str]:
    """(switch-side, runtime-side) interface names of runtime rt_id's veth."""
    return f"sw-rt{rt_id}", f"rt{rt_id}"


def setting(default, help: str, *, option: str | None = None, short: str | None = None,
            choices: tuple | None = None, cli: bool = True, factory=None):
    """A NodeConfig field with what `nfactorctl up` needs to offer it: the
    default lives here only, and `up`'s options are made from these fields."""
    meta = {"help": help, "option": option, "short": short, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NodeConfig:
    """Everything a node's processes need, in one object: `nfactorctl up` makes
    it from its options, the supervisor hands it (serialised) to the
    controller, the switch agent and every runtime."""
    name: str = setting(DEFAULT_NODE, "Node name (pins under /sys/fs/bpf/nfactor/NAME, state under "
                        "/run/nfactor/NAME).", short="-n")
    ext0: str = setting("ext0", "External port 0 (towards the sources).")
    ext1: str = setting("ext1", "External port 1 (towards the sinks).")
    netns: str | None = setting(None, "Network namespace holding ext0/ext1 (default: this one).")
    hosts: str = setting("", "The node's hosts by fabric IPv4 address, comma-separated, the ingress host (ext0/"
                         "ext1, controller, switch agent) first; empty: one host.  Worker hosts run runtimes only, "
                         "each started with `up --worker N` (docs/architecture.md, Hosts).")
    host_id: int = setting(0, "Which of --hosts this is (0: the ingress); set by `up --worker N`.", cli=False)
    fabric_port: str = setting("fab0", "With --hosts: the interface towards the node's other hosts (MTU at least "
                               "the external ports' + 46).")
    controller_hosts: list[int] = setting(None, "With --hosts: the hosts that run a controller, e.g. 0,1 (default: "
                                          "the ingress host alone).  More than one needs --store etcd: one leads, "
                                          "the others take over from etcd's state when its host dies.",
                                          factory=list)
    control_port: int = setting(7470, "With --hosts: the first UDP port of the control messages (controller, "
                                "heartbeats, switch agent, supervisor at +0..3, runtime N at +16+N), on each "
                                "host's fabric address.")
    runtimes: int = setting(2, "Number of runtime processes.", short="-r")
    cores: list[int] = setting(None, "CPUs for the runtimes, in turn (default: all CPUs in turn), e.g. 0,1.",
                               factory=list)
    other_action: str = setting("forward", "What the switch does with traffic that is not a flow (ARP, ICMP, "
                                "non-IP).", option="--other",
                                choices=tuple(sorted(L.OTHER_ACTIONS)))
    flow_table_size: int = setting(262144, "Entries in the switch's LRU flow table.")
    xdp_mode: str = setting("native", "XDP attach mode; auto falls back to generic where native is unsupported.",
                            choices=("native", "generic", "auto"))
    replace_xdp: bool = setting(False, "Take over ports that carry another tool's XDP program (default: refuse "
                                "them).  down removes only the programs the node attached.")
    offload: str = setting("on", "Hand flows whose NFs have decided to the switch, which then forwards or drops "
                           "their packets in XDP while the actor keeps their state (docs/offload.md); off: every "
                           "packet goes through Python.",
                           choices=("on", "off"))
    idle_timeout: float = setting(30.0, "Seconds before an idle flow's actor is released.")
    max_flows: int = setting(100_000, "Flows (actors) a runtime holds at most; a new flow beyond gives up a flow "
                             "seen only once, else the idlest (counted: evicted).  Keep runtimes x max_flows "
                             "under --flow-table-size: the switch then never evicts a live flow's entry.")
    batch: int = setting(64, "Frames a runtime takes from its socket per loop iteration.")
    policy: str | None = setting(None, "Policy file (service chain rules, NF config) to install; default: the "
                                 "node's saved one.")
    heartbeat: float = setting(0.1, "Seconds between runtime heartbeats.")
    miss_limit: int = setting(3, "Missed heartbeats before a runtime is failed.")
    hang_timeout: float = setting(2.0, "Seconds without a heartbeat after which the supervisor kills a runtime as "
                                  "hung (an NF stuck in a loop, a stopped process): its flows are then taken over "
                                  "and it restarts.  Never less than --heartbeat x --miss-limit; 0: never.")
    store: str = setting("sqlite", "Where the controller keeps the cluster state (view, rules): sqlite, a file on "
                         "this host; or etcd, an etcd cluster (--etcd-endpoints), which lets several controllers "
                         "run, one leading (--controllers).", choices=("sqlite", "etcd"))
    etcd_endpoints: str = setting("127.0.0.1:2379", "The etcd members for --store etcd, host:port, comma-separated.")
    controllers: int = setting(1, "Controller processes.  With --store etcd one leads (it holds a lease in etcd) and "
                               "the others wait; when the leader dies, one of them takes over from etcd's state.")
    leader_ttl: int = setting(2, "Seconds of the leading controller's lease in etcd: a dead leader is replaced "
                              "within about this long.")
    scale_threshold: float = setting(0.8, "Average runtime CPU load (0-1) that triggers scale-out after "
                                     "--scale-window seconds.")
    scale_window: float = setting(2.0, "Seconds the overload (or idleness) must last.")
    scale_cooldown: float = setting(10.0, "Seconds between two scaling decisions.")
    max_runtimes: int = setting(0, "Scale out up to this many runtimes when overloaded (0: no scale-out).")
    max_migrations: int = setting(1000, "Concurrent migrations per runtime.")
    migrate_threshold: float = setting(0.0, "A runtime over this CPU load (0-1) for a second migrates a fifth of "
                                       "its flows to the least loaded runtime (0: off).")
    scale_in_threshold: float = setting(0.0, "Average runtime CPU load (0-1) under which the least loaded "
                                        "runtime is drained (0: off).")
    min_runtimes: int = setting(1, "Scale-in never goes below this.")
    snapshot_every: int = setting(10, "K: a flow's NF state is replicated to a peer every K packets "
                                  "(0: no replication).")
    takeover: str = setting("on", "When a runtime's process dies, the peers holding its flows' snapshots take "
                            "those flows at once (tens of milliseconds after the exit) and the restarted runtime "
                            "comes back empty; off: the flows wait for the runtime's restart and come back on it "
                            "from the snapshots.  Either way a flow's NF state is within K-1 packets.",
                            choices=("on", "off"))
    frag_timeout: float = setting(5.0, "Seconds a runtime holds an IP datagram's fragments for it to "
                                  "complete (the kernel: 30).")
    frag_max_datagrams: int = setting(1024, "IP datagrams a runtime reassembles at once; more fragments are "
                                      "dropped and counted.")
    frag_max_bytes: int = setting(4 << 20, "Bytes of IP fragments a runtime holds at once (the kernel's "
                                  "ipfrag_high_thresh: 4 MB).")
    metrics_port: int = setting(0, "TCP port of the node's Prometheus endpoint (/metrics), in the node's network "
                                "namespace (0: off).")
    metrics_address: str = setting("127.0.0.1", "Address the metrics endpoint listens on (0.0.0.0 or :: for "
                                   "every address: it has no authentication).")
    log_format: str = setting("text", "Log lines as text (time, level, role[pid]: message) or as JSON lines (ts, "
                              "level, role, pid, logger, msg).", choices=logs.FORMATS)
    log_max_bytes: int = setting(10 << 20, "A process rotates its log file (ROLE.log) when it reaches this many "
                                 "bytes.")
    log_backups: int = setting(5, "Rotated log files kept per process (ROLE.log.1 .. ROLE.log.N).")
    # The processes find each other's control sockets by the node's name (control_socket).

    @property
    def etcd_members(self) -> list[str]:
        """--etcd-endpoints as a list of host:port."""
        return [e.strip() for e in self.etcd_endpoints.split(",") if e.strip()]

    def validate(self) -> "NodeConfig":
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"node name {self.name!r}: use 1-15 of a-z, 0-9, '-', '_', starting with a letter")
        if self.ext0 == self.ext1:
            raise ConfigError("ext0 and ext1 must be two different interfaces")
        for port in (self.ext0, self.ext1):
            if not port or len(port) > 15 or "/" in port or " " in port:
                raise ConfigError(f"bad interface name {port!r}")
        least = 0 if self.hosts and not self.host_id else 1  # an ingress host may leave the runtimes to workers
        if not least <= self.runtimes <= L.C["NFX_MAX_RUNTIMES"]:
            raise ConfigError(f"runtimes must be {least}..{L.C['NFX_MAX_RUNTIMES']}, not {self.runtimes}")
        if self.other_action not in L.OTHER_ACTIONS:
            raise ConfigError(f"other_action must be one of {sorted(L.OTHER_ACTIONS)}")
        if self.xdp_mode not in ("native", "generic", "auto"):
            raise ConfigError("xdp_mode must be native, generic or auto")
        if self.offload not in ("on", "off"):
            raise ConfigError("offload must be on or off")
        if not 0 <= self.hang_timeout <= 3600:
            raise ConfigError("hang_timeout must be 0 (never) to 3600 seconds")
        if self.store not in ("sqlite", "etcd"):
            raise ConfigError("store must be sqlite or etcd")
        if self.store == "etcd":
            try:
                if not [parse_endpoint(e) for e in self.etcd_members]:
                    raise ValueError("no etcd endpoint given")
            except ValueError as e:
                raise ConfigError(f"etcd_endpoints: {e}") from None
        if not 1 <= self.controllers <= 5:
            raise ConfigError("controllers must be 1..5")
        if self.controllers > 1 and self.store != "etcd":
            raise ConfigError("more than one controller needs --store etcd (they agree on a leader there)")
        if not 1 <= self.leader_ttl <= 60:
            raise ConfigError("leader_ttl must be 1..60 seconds")
        if self.takeover not in ("on", "off"):
            raise ConfigError("takeover must be on or off")
        if not 1024 <= self.flow_table_size <= 1 << 24:
            raise ConfigError("flow_table_size must be 1024..16777216")
        if self.idle_timeout <= 0:
            raise ConfigError("idle_timeout must be positive")
        if not 16 <= self.max_flows <= 1 << 24:
            raise ConfigError("max_flows must be 16..16777216")
        if not 1 <= self.batch <= 1024:
            raise ConfigError("batch must be 1..1024")
        if not 0.01 <= self.heartbeat <= 10:
            raise ConfigError("heartbeat must be 0.01..10 seconds")
        if not 1 <= self.miss_limit <= 100:
            raise ConfigError("miss_limit must be 1..100")
        if not 0 < self.scale_threshold <= 1:
            raise ConfigError("scale_threshold must be in (0, 1]")
        if not 1 <= self.max_migrations <= 100_000:
            raise ConfigError("max_migrations must be 1..100000")
        if not 0 <= self.migrate_threshold <= 1 or not 0 <= self.scale_in_threshold <= 1:
            raise ConfigError("migrate_threshold and scale_in_threshold must be in [0, 1]")
        if not 0 <= self.snapshot_every <= 1_000_000:
            raise ConfigError("snapshot_every must be 0 (no replication) or a packet count")
        if not 0 < self.frag_timeout <= 120:
            raise ConfigError("frag_timeout must be in (0, 120] seconds")
        if not 1 <= self.frag_max_datagrams <= 1 << 20 or not 1 << 17 <= self.frag_max_bytes <= 1 << 32:
            raise ConfigError("frag_max_datagrams must be 1..1048576, frag_max_bytes 131072 (a whole 64 KB "
                              "datagram)..4294967296")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port must be 0 (off) or a TCP port")
        try:
            ipaddress.ip_address(self.metrics_address)
        except ValueError:
            raise ConfigError(f"metrics_address must be an IP address, not {self.metrics_address!r}") from None
        if self.log_format not in logs.FORMATS:
            raise ConfigError(f"log_format must be one of {', '.join(logs.FORMATS)}")
        if not 1 << 16 <= self.log_max_bytes <= 1 << 32 or not 1 <= self.log_backups <= 100:
            raise ConfigError("log_max_bytes must be 65536..4294967296, log_backups 1..100")
        if not 1 <= self.min_runtimes <= L.C["NFX_MAX_RUNTIMES"]:
            raise ConfigError("min_runtimes must be at least 1")
        if not 0 <= self.max_runtimes <= L.C["NFX_MAX_RUNTIMES"]:
            raise ConfigError(f"max_runtimes must be 0..{L.C['NFX_MAX_RUNTIMES']}")
        if self.hosts:
            try:
                addrs = self.host_addresses
            except fabric.FabricError as e:
                raise ConfigError(f"hosts: {e}") from None
            if len(addrs) < 2:
                raise ConfigError("hosts: list the ingress host and at least one worker host")
            if not 0 <= self.host_id < len(addrs):
                raise ConfigError(f"host {self.host_id} is not one of the {len(addrs)} hosts")
            if self.runtimes > fabric.RUNTIMES_PER_HOST or self.max_runtimes > fabric.RUNTIMES_PER_HOST:
                raise ConfigError(f"with hosts, a host runs at most {fabric.RUNTIMES_PER_HOST} runtimes")
            if any(not 0 <= h < len(addrs) for h in self.controller_hosts):
                raise ConfigError(f"controller_hosts: hosts are 0..{len(addrs) - 1}")
            if self.controller_host_ids != [0] and self.store != "etcd":
                raise ConfigError("controllers on other hosts than the ingress need --store etcd")
            if not 1024 <= self.control_port <= 65535 - fabric.RUNTIME_PORT - L.C["NFX_MAX_RUNTIMES"]:
                raise ConfigError("control_port must leave room for every runtime's port below 65536")
            if self.host_id and not self.name.endswith(f"-h{self.host_id}"):
                raise ConfigError(f"worker host {self.host_id}'s node name must end with -h{self.host_id} "
                                  f"(`up --worker` names it so)")
        elif self.host_id or self.controller_hosts:
            raise ConfigError("a worker host (--worker) or controller_hosts needs --hosts")
        ncpu = os.cpu_count() or 1
        for c in self.cores:
            if not 0 <= c < ncpu:
                raise ConfigError(f"core {c} does not exist (this machine has {ncpu})")
        return self

    @property
    def host_addresses(self) -> list[str]:
        return fabric.parse_hosts(self.hosts)

    @property
    def cluster_name(self) -> str:
        """The node's name, also on a worker host (whose own name is NAME-hN):
        what its cluster state in etcd is kept under."""
        return self.name[:-len(f"-h{self.host_id}")] if self.host_id else self.name

    @property
    def controller_host_ids(self) -> list[int]:
        return sorted(set(self.controller_hosts)) or [0]

    @property
    def runtime_ids(self) -> list[int]:
        """This host's first runtimes' ids (with hosts, each host has its range)."""
        if not self.hosts:
            return list(range(self.runtimes))
        return fabric.runtime_ids(self.host_id, self.runtimes)

    @property
    def max_local_runtimes(self) -> int:
        return fabric.RUNTIMES_PER_HOST if self.hosts else L.C["NFX_MAX_RUNTIMES"]

    def core_of(self, rt_id: int) -> int:
        """Runtimes take the listed cores in turn; by default every CPU in turn."""
        cores = self.cores or list(range(os.cpu_count() or 1))
        return cores[rt_id % self.max_local_runtimes % len(cores)]  # (with hosts: its index on its host)

    def log_options(self, role: str) -> dict:
        """How process `role` logs: logs.setup's keyword arguments (its own file, rotated)."""
        return {"fmt": self.log_format, "file": log_path(self.name, role), "max_bytes": self.log_max_bytes,
                "backups": self.log_backups}

    @property
    def pin_dir(self) -> str:
        return pin_dir(self.name)

    @property
    def run_dir(self) -> str:
        return run_dir(self.name)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """The serialised form every process of the node is started with."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "NodeConfig":
        """Fields this version does not know (a state file of an older node) are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> "NodeConfig":
        try:
            return cls.from_dict(json.loads(text)).validate()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad node configuration: {e}") from None


def read_state(name: str) -> dict | None:
    try:
        with open(state_path(name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"unreadable node state {state_path(name)}: {e}") from None


def write_state(name: str, state: dict) -> None:
    os.makedirs(run_dir(name), mode=0o700, exist_ok=True)
    tmp = state_path(name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, state_path(name))



# --- how each process of the node starts ---------------------------------------

def process_args(prog: str, doc: str, argv: list[str] | None = None, *, runtime: bool = False,
                 role: str | None = None):
    """Parse what the supervisor starts every process with: `--config-json`
    (the node's whole configuration), for a runtime `--id`, and `--role` for
    a process that may run more than once (`role`: its default; it names
    the process's log).  Returns (NodeConfig, the parsed arguments)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-json", required=True, help="the node's configuration (NodeConfig.to_json)")
    if runtime:
        ap.add_argument("--id", type=int, required=True, help="this runtime's id")
    if role:
        ap.add_argument("--role", default=role, help=f"this process's name in logs (default {role})")
    args = ap.parse_args(argv)
    return NodeConfig.from_json(args.config_json), args


def stop_on_signals(stop) -> None:
    """SIGTERM and SIGINT call stop().  Unblocks them first: the supervisor
    blocks them to wait for them, and its children inherit the mask."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop())
