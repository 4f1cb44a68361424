"""Service chain rules (paper 3.1) and the node's policy file.

A rule matches a flow's 5-tuple, as seen on its first packet (src = the side
that sent it): source and destination prefixes, protocol, source and
destination port or port range, each with a wildcard.  The most specific
matching rule wins (longest prefixes first, then protocol and the narrowest
ports; among equals, the earlier rule); no match gives the default chain.

Policy file (JSON), also what `nfactorctl rules` edits:

    {"default_chain": ["flow_monitor"],
     "rules": [{"proto": "tcp", "dport": "80", "chain": ["flow_monitor", "firewall", "http_parser"]}],
     "nf_config": {"firewall": {"rules": [{"dport": "8081", "action": "drop"}]}},
     "nf_modules": ["my_package.my_nf"]}
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field

from . import nf
from ..errors import NFactorError

PROTOS = {"tcp": 6, "udp": 17}
ANY = ("any", "*", "", None)


class RuleError(NFactorError, ValueError):
    pass


def _prefix(value, what: str):
    if value in ANY:
        return None
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise RuleError(f"{what}: {value!r} is not an address or prefix (e.g. 10.0.0.0/8, fd00::/8, any)") from None


def _proto(value):
    if value in ANY:
        return None
    if isinstance(value, int) and value in PROTOS.values():
        return value
    if isinstance(value, str) and value.lower() in PROTOS:
        return PROTOS[value.lower()]
    raise RuleError(f"proto: {value!r} is not tcp, udp or any")


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
                _proto(d.get("proto")), _ports(d.get("sport"), f"{where}.sport"),
                _ports(d.get("dport"), f"{where}.dport"))
        if m.src is not None and m.dst is not None and m.src.version != m.dst.version:
            raise RuleError(f"{where}: src and dst are of different IP versions")
        return m

    def matches(self, src, dst, proto: int, sport: int, dport: int) -> bool:
        """src/dst are ipaddress objects."""
        if self.proto is not None and proto != self.proto:
            return False
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
                "proto": {6: "tcp", 17: "udp"}.get(self.proto, "any"),
                "sport": ports(self.sport), "dport": ports(self.dport)}


@dataclass(frozen=True)
class ServiceRule:
    match: FlowMatch
    chain: int
    id: int = 0

    def to_dict(self) -> dict:
        return {"id": self.id, **self.match.to_dict(), "chain": nf.chain_names(self.chain),
                "chain_int": self.chain}


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

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        if not isinstance(d, dict):
            raise RuleError("policy: must be a JSON object")
        unknown = set(d) - {"rules", "default_chain", "nf_config", "nf_modules"}
        if unknown:
            raise RuleError(f"policy: unknown keys {sorted(unknown)}")
        mods = d.get("nf_modules", [])
        if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
            raise RuleError("policy.nf_modules: a list of module names")
        try:
            nf.load_modules(mods)
        except nf.NFError as e:
            raise RuleError(f"policy.nf_modules: {e}") from None
        p = cls(default_chain=parse_chain(d.get("default_chain", []), "policy.default_chain"),
                nf_modules=mods)
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
        unknown = set(r) - {"id", "src", "dst", "proto", "sport", "dport", "chain", "chain_int"}
        if unknown:
            raise RuleError(f"{where}: unknown fields {sorted(unknown)}")
        if "chain" not in r:
            raise RuleError(f"{where}: needs a chain")
        rule_id = r.get("id")
        if rule_id is None:
            rule_id = max((x.id for x in self.rules), default=0) + 1
        elif not isinstance(rule_id, int) or rule_id < 1 or any(x.id == rule_id for x in self.rules):
            raise RuleError(f"{where}.id: {rule_id!r} is not a positive integer unused by another rule")
        rule = ServiceRule(FlowMatch.parse(r, where), parse_chain(r["chain"], f"{where}.chain"), rule_id)
        self.rules.append(rule)
        return rule

    def delete(self, rule_id: int) -> None:
        before = len(self.rules)
        self.rules = [r for r in self.rules if r.id != rule_id]
        if len(self.rules) == before:
            raise RuleError(f"no rule with id {rule_id}")

    def to_dict(self) -> dict:
        return {"default_chain": nf.chain_names(self.default_chain),
                "rules": [{k: v for k, v in r.to_dict().items() if k != "chain_int"} for r in self.rules],
                "nf_config": self.nf_config, "nf_modules": self.nf_modules}

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
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RuleError(f"policy file {path} not found") from None
    except ValueError as e:
        raise RuleError(f"policy file {path}: not valid JSON ({e})") from None
    return Policy.from_dict(data)


def save_policy(policy: Policy, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(policy.to_dict(), f, indent=1)
    os.replace(tmp, path)
