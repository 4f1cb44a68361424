"""Service chain rules (paper 3.1) and the node's policy file.

A rule matches a flow's 5-tuple, as seen on its first packet (src = the side
that sent it): source and destination prefixes, protocol (tcp, udp, gre, esp,
sctp, ... or a number), source and destination port or port range, each with
a wildcard.  A port or range never matches a protocol without ports.  The
most specific matching rule wins (longest prefixes first, then protocol and
the narrowest ports; among equals, the earlier rule); no match gives the
default chain.

Policy file (JSON), also what `nfactorctl rules` edits:

    {"default_chain": ["flow_monitor"],
     "rules": [{"proto": "tcp", "dport": "80", "chain": ["flow_monitor", "firewall", "http_parser"]}],
     "nf_config": {"firewall": {"rules": [{"dport": "8081", "action": "drop"}]}},
     "nf_modules": ["my_package.my_nf"],
     "fragments": "reassemble"}

A rule (or "default_observe" for the default chain) with "observe": true
lets the NFs of its chain that only observe (http_parser) be fed copies of
the flow's frames while the switch forwards them (offload's observe mode,
docs/offload.md); without it such an NF needs every packet inline.

"fragments": what a runtime does with IP fragments.  "reassemble" (default):
hold them until their datagram is whole, run the chain of the datagram's own
flow (its real ports) on it, and send the fragments on if it allows it.
"drop": drop every fragment (counted).
"""
from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass, field

from . import nf
from ..errors import NFactorError
from ..formats.flowkey import NOT_FLOWS, PORTED, PROTO_NAMES, proto_number

ANY = ("any", "*", "", None)
FRAGMENT_MODES = ("reassemble", "drop")


class RuleError(NFactorError, ValueError):
    pass


def _prefix(value, what: str):
    if value in ANY:
        return None
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise RuleError(f"{what}: {value!r} is not an address or prefix (e.g. 10.0.0.0/8, fd00::/8, any)") from None


def _proto(value, what: str = "proto"):
    if value in ANY:
        return None
    try:
        proto = proto_number(value)
    except ValueError as e:
        raise RuleError(f"{what}: {e}, or any") from None
    if proto in NOT_FLOWS:
        raise RuleError(f"{what}: {value!r}: ICMP is not a flow (the switch's other traffic, see --other)")
    return proto


def _ports(value, what: str):
    if value in ANY:
        return None
    try:
        if isinstance(value, int):
            lo = hi = value
        else:
            lo_s, _, hi_s = str(value).partition("-")
            lo, hi = int(lo_s), int(hi_s or lo_s)
    except ValueError:
        raise RuleError(f"{what}: {value!r} is not a port or range (e.g. 80, 8000-8100, any)") from None
    if not 0 <= lo <= hi <= 65535:
        raise RuleError(f"{what}: {value!r} is out of 0-65535 or reversed")
    return (lo, hi)


@dataclass(frozen=True)
class FlowMatch:
    """A pattern over a 5-tuple; None is a wildcard."""
    src: object = None
    dst: object = None
    proto: int | None = None
    sport: tuple | None = None
    dport: tuple | None = None

    @classmethod
    def parse(cls, d: dict, where: str = "rule") -> "FlowMatch":
        if not isinstance(d, dict):
            raise RuleError(f"{where}: must be an object")
        m = cls(_prefix(d.get("src"), f"{where}.src"), _prefix(d.get("dst"), f"{where}.dst"),
                _proto(d.get("proto"), f"{where}.proto"), _ports(d.get("sport"), f"{where}.sport"),
                _ports(d.get("dport"), f"{where}.dport"))
        if m.src is not None and m.dst is not None and m.src.version != m.dst.version:
            raise RuleError(f"{where}: src and dst are of different IP versions")
        return m

    def matches(self, src, dst, proto: int, sport: int, dport: int) -> bool:
        """src/dst are ipaddress objects."""
        if self.proto is not None and proto != self.proto:
            return False
        if (self.sport is not None or self.dport is not None) and proto not in PORTED:
            return False  # a flow without ports has none to match
        if self.src is not None and (src.version != self.src.version or src not in self.src):
            return False
        if self.dst is not None and (dst.version != self.dst.version or dst not in self.dst):
            return False
        if self.sport is not None and not self.sport[0] <= sport <= self.sport[1]:
            return False
        if self.dport is not None and not self.dport[0] <= dport <= self.dport[1]:
            return False
        return True

    def specificity(self) -> tuple:
        def plen(p):
            return -1 if p is None else p.prefixlen

        def width(r):
            return 65536 if r is None else r[1] - r[0]
        return (plen(self.src) + plen(self.dst), self.proto is not None, -width(self.dport), -width(self.sport))

    def to_dict(self) -> dict:
        def ports(r):
            return "any" if r is None else (str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}")
        return {"src": str(self.src) if self.src else "any", "dst": str(self.dst) if self.dst else "any",
                "proto": "any" if self.proto is None else PROTO_NAMES.get(self.proto, str(self.proto)),
                "sport": ports(self.sport), "dport": ports(self.dport)}


@dataclass(frozen=True)
class ServiceRule:
    match: FlowMatch
    chain: int
    id: int = 0
    observe: bool = False   # its NFs that only observe may be fed copies (offload's observe mode)

    def to_dict(self) -> dict:
        return {"id": self.id, **self.match.to_dict(), "chain": nf.chain_names(self.chain),
                "chain_int": self.chain, "observe": self.observe}


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise RuleError(f"{where}: {value!r} is not true or false")
    return value


def parse_chain(value, where: str = "chain") -> int:
    try:
        if isinstance(value, int):
            nf.decode_chain(value)  # validates
            for t in nf.decode_chain(value):
                nf.by_id(t)
            return value
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RuleError(f"{where}: a list of NF names, a comma-separated string or an integer")
        return nf.encode_chain(value)
    except nf.NFError as e:
        raise RuleError(f"{where}: {e}") from None


@dataclass
class Policy:
    rules: list[ServiceRule] = field(default_factory=list)
    default_chain: int = 0
    nf_config: dict = field(default_factory=dict)
    nf_modules: list[str] = field(default_factory=list)
    fragments: str = "reassemble"   # FRAGMENT_MODES
    default_observe: bool = False   # the default chain's observe mode (as a rule's "observe")

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        if not isinstance(d, dict):
            raise RuleError("policy: must be a JSON object")
        unknown = set(d) - {"rules", "default_chain", "nf_config", "nf_modules", "fragments", "default_observe"}
        if unknown:
            raise RuleError(f"policy: unknown keys {sorted(unknown)}")
        mods = d.get("nf_modules", [])
        if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
            raise RuleError("policy.nf_modules: a list of module names")
        try:
            nf.load_modules(mods)
        except nf.NFError as e:
            raise RuleError(f"policy.nf_modules: {e}") from None
        fragments = d.get("fragments", "reassemble")
        if fragments not in FRAGMENT_MODES:
            raise RuleError(f"policy.fragments: {fragments!r} is not {' or '.join(FRAGMENT_MODES)}")
        p = cls(default_chain=parse_chain(d.get("default_chain", []), "policy.default_chain"),
                nf_modules=mods, fragments=fragments,
                default_observe=_flag(d.get("default_observe", False), "policy.default_observe"))
        cfg = d.get("nf_config", {})
        if not isinstance(cfg, dict):
            raise RuleError("policy.nf_config: an object of NF name -> config")
        for name, c in cfg.items():
            try:
                nf.by_name(name)
            except nf.NFError as e:
                raise RuleError(f"policy.nf_config: {e}") from None
            if not isinstance(c, dict):
                raise RuleError(f"policy.nf_config.{name}: must be an object")
            try:
                nf.by_name(name)().init(c)  # each NF validates its own config
            except (ValueError, TypeError) as e:
                raise RuleError(f"policy.nf_config.{name}: {e}") from None
        p.nf_config = cfg
        rules = d.get("rules", [])
        if not isinstance(rules, list):
            raise RuleError("policy.rules: must be a list")
        for i, r in enumerate(rules):
            p.add(r, where=f"rules[{i}]")
        return p

    def add(self, r: dict, where: str = "rule") -> ServiceRule:
        if not isinstance(r, dict):
            raise RuleError(f"{where}: must be an object")
        unknown = set(r) - {"id", "src", "dst", "proto", "sport", "dport", "chain", "chain_int", "observe"}
        if unknown:
            raise RuleError(f"{where}: unknown fields {sorted(unknown)}")
        if "chain" not in r:
            raise RuleError(f"{where}: needs a chain")
        rule_id = r.get("id")
        if rule_id is None:
            rule_id = max((x.id for x in self.rules), default=0) + 1
        elif not isinstance(rule_id, int) or rule_id < 1 or any(x.id == rule_id for x in self.rules):
            raise RuleError(f"{where}.id: {rule_id!r} is not a positive integer unused by another rule")
        rule = ServiceRule(FlowMatch.parse(r, where), parse_chain(r["chain"], f"{where}.chain"), rule_id,
                           _flag(r.get("observe", False), f"{where}.observe"))
        self.rules.append(rule)
        return rule

    def delete(self, rule_id: int) -> None:
        before = len(self.rules)
        self.rules = [r for r in self.rules if r.id != rule_id]
        if len(self.rules) == before:
            raise RuleError(f"no rule with id {rule_id}")

    def to_dict(self) -> dict:
        out = {"default_chain": nf.chain_names(self.default_chain),
               "rules": [{k: v for k, v in r.to_dict().items() if k != "chain_int" and (k != "observe" or v)}
                         for r in self.rules],
               "nf_config": self.nf_config, "nf_modules": self.nf_modules, "fragments": self.fragments}
        if self.default_observe:
            out["default_observe"] = True
        return out

    def observe_rules(self) -> frozenset:
        """The ids of the rules asking for observe mode (0: the default chain)."""
        return frozenset([r.id for r in self.rules if r.observe] + ([0] if self.default_observe else []))

    def table(self) -> "RuleTable":
        return RuleTable(self.rules, self.default_chain)


class RuleTable:
    """Longest-prefix-first lookup of a flow's chain."""

    def __init__(self, rules: list[ServiceRule], default_chain: int):
        order = sorted(range(len(rules)), key=lambda i: (rules[i].match.specificity(), -i), reverse=True)
        self.rules = [rules[i] for i in order]
        self.default_chain = default_chain

    def lookup(self, src: str, dst: str, proto: int, sport: int, dport: int) -> tuple[int, int]:
        """(chain, rule id or 0 for the default)."""
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        for r in self.rules:
            if r.match.matches(s, d, proto, sport, dport):
                return r.chain, r.id
        return self.default_chain, 0


def load_policy(path: str) -> Policy:
    """The policy in file `path`; any problem is a RuleError naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RuleError(f"policy file {path} not found") from None
    except ValueError as e:
        raise RuleError(f"policy file {path}: not valid JSON ({e})") from None
    except OSError as e:
        raise RuleError(f"policy file {path}: {e.strerror or e}") from None
    try:
        return Policy.from_dict(data)
    except RuleError as e:
        raise RuleError(f"policy file {path}: {e}") from None


def save_policy(policy: Policy, path: str) -> None:
    """Atomically and durably: a reader (or a crash at any point) sees the old
    file or the new one, whole, and the new one survives a power loss once
    this returns (written to a private temporary file, fsynced, renamed over
    the old one, the directory fsynced)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    data = json.dumps(policy.to_dict(), indent=1).encode()
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600; the policy is configuration, not a secret
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # the rename itself
    finally:
        os.close(dfd)
