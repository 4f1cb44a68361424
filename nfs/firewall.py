"""Firewall NF: ordered allow/drop rules per flow, with TCP connection tracking.

Config (the "firewall" entry of the policy's nf_config):

    {"rules": [{"src": "any", "dst": "10.0.0.2", "proto": "tcp", "sport": "any",
                "dport": "80", "action": "drop"}, ...],
     "default": "allow",        # verdict when no rule matches: "allow" | "drop"
     "strict_tcp": false}       # see "strict_tcp" below

A rule's match fields are those of a service rule (nfactor_xdp.dataplane.rules.FlowMatch:
prefixes, protocol by name (tcp, udp, gre, esp, sctp, ...) or number, ports or
ranges, each may be omitted or "any"); "action" is required.  Unknown keys are errors.  init() validates the whole config before
changing anything (a bad config raises NFError naming the rule index and
field, e.g. "firewall.rules[2].dport: ...", and the NF keeps its previous
config), and bumps `self.version` on every successful call.

Matching
    Rules are tried in order and the first match wins.  They match the flow's
    orientation as of its first packet: src is the side that sent it.  A packet
    in the REPLY direction has its addresses and ports swapped before
    matching, so "dst 10.0.0.2 dport 80" covers both directions of a
    connection to that server.  Flows of protocols without ports (GRE, ESP,
    ...) never match a rule with a port or range.  IP fragments never reach
    the NF: the runtime reassembles them and the NF sees the datagram, with
    its real ports, in the flow of its 5-tuple (or the policy drops them).

When the verdict is computed
    On the flow's first packet, and again on the first packet after the NF's
    config version changed (a policy change).  A drop verdict is sticky: a
    dropped flow drops every later packet at once, without looking at it,
    whatever the config says later.  An allowed flow can become dropped by a
    later config.  A deserialized flow state (migration, replication) is
    re-evaluated on its next packet against the config of the NF that received
    it (its config version is reset to -1).

Connection tracking (TCP, per flow, from flags and directions)
    new          no packet seen yet
    syn_sent     ORIG sent a SYN (without ACK) as the first packet
    syn_recv     REPLY answered with a SYN (normally SYN+ACK)
    established  ORIG acked the SYN+ACK; or the flow was picked up mid-stream
                 (first packet not a bare SYN: flagged "midstream")
    fin_wait     one side sent a FIN
    closing      both sides sent a FIN
    closed       an ACK without FIN after both FINs; or an RST (flagged "reset")
    A bare SYN from ORIG on a closed flow reopens it (syn_sent, flags cleared).
    Out-of-order flags are otherwise ignored (the state does not move);
    sequence numbers are not checked.  UDP flows are "udp"; flows of other
    protocols, and TCP frames with no header to read, are "untracked".

strict_tcp (false by default)
    - a TCP flow whose first packet is not a bare SYN (SYN without ACK, FIN,
      RST) is dropped: sticky, reason "invalid".  This is a property of the
      flow, so turning strict_tcp on later also drops flows that were picked
      up mid-stream while it was off.
    - once an RST was seen, every later packet of the flow is dropped and
      counted (not sticky in the verdict, but the flow is closed anyway).

Offload (docs/offload.md)
    A dropped flow is dropped by the switch (DROP), and so is a flow whose
    later packets strict_tcp drops after an RST; the switch's drops are added
    to "dropped".  An allowed flow is forwarded while its conntrack state
    moves only on SYN, FIN or RST (established, syn_sent, fin_wait, closed,
    untracked): those frames still come inline.  In syn_recv and closing
    a bare ACK moves the state, so such a flow keeps every packet, as does a
    flow not yet evaluated under the current config.

Flow state (a plain dict, so the default msgpack serialize works):
    verdict  "pending" | "allow" | "drop"
    rule     index of the matching rule in config["rules"], -1 for none
    reason   "" | "rule" | "default" | "invalid"
    ct       connection tracking state (above)
    seen     bits: 1 FIN from ORIG, 2 FIN from REPLY, 4 RST, 8 mid-stream start
    dropped  packets dropped by this NF
    cfg      config version the verdict was computed with (-1: never)
"""
from __future__ import annotations

import ipaddress

from nfactor_xdp.dataplane.nf import NetworkFunction, NFError, register
from nfactor_xdp.dataplane.offload_spec import DROP as OFF_DROP, FORWARD, KernelCounts, Offload
from nfactor_xdp.dataplane.packet import ORIG, REPLY, TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, UDP
from nfactor_xdp.dataplane.rules import FlowMatch, RuleError

ALLOW, DROP, PENDING = "allow", "drop", "pending"
ACTIONS = (ALLOW, DROP)
CONFIG_KEYS = frozenset({"rules", "default", "strict_tcp"})
RULE_KEYS = {"src", "dst", "proto", "sport", "dport", "action"}

FIN_ORIG, FIN_REPLY, SEEN_RST, SEEN_MIDSTREAM = 1, 2, 4, 8
_FIN_BOTH = FIN_ORIG | FIN_REPLY
_SYN_ACK_FIN_RST = TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST
_CHANGES_STATE = TCP_SYN | TCP_FIN | TCP_RST
ESTABLISHED = "established"
# conntrack states that only SYN, FIN or RST frames move (see _track)
# Offloadable TCP states: those that only SYN/FIN/RST move (punted).  Not
# syn_sent: the SYN+ACK would bring the flow back inline (syn_recv) at the
# cost of a revocation; a connection is handed over once established.
_MOVED_BY_FLAGS = frozenset({ESTABLISHED, "fin_wait", "closed", "untracked"})
_OFFLOAD_DROP = Offload(OFF_DROP)
_OFFLOAD_UDP = Offload(FORWARD)
_OFFLOAD_TCP = Offload(FORWARD, punt_tcp_flags=_CHANGES_STATE)

STATE_KEYS = ("verdict", "rule", "reason", "ct", "seen", "dropped", "cfg")


def _track(state: dict, flags: int, d: int) -> None:
    """Advance the TCP connection tracking state of a flow by one packet."""
    ct = state["ct"]
    if ct == "new":
        if flags & _SYN_ACK_FIN_RST == TCP_SYN:
            state["ct"] = "syn_sent"
            return
        state["seen"] |= SEEN_MIDSTREAM
        ct = ESTABLISHED
    if flags & TCP_RST:
        state["ct"] = "closed"
        state["seen"] |= SEEN_RST
        return
    if ct == "syn_sent":
        if flags & TCP_SYN and d == REPLY:
            ct = "syn_recv"
    elif ct == "syn_recv":
        if flags & TCP_ACK and not flags & TCP_SYN and d == ORIG:
            ct = ESTABLISHED
    elif ct == "closing":
        if flags & TCP_ACK and not flags & TCP_FIN:
            ct = "closed"
    elif ct == "closed":
        if flags & _SYN_ACK_FIN_RST == TCP_SYN and d == ORIG:
            state["ct"] = "syn_sent"
            state["seen"] = 0
            return
    if flags & TCP_FIN and ct != "closed":
        seen = state["seen"] = state["seen"] | (FIN_REPLY if d else FIN_ORIG)
        ct = "closing" if seen & _FIN_BOTH == _FIN_BOTH else "fin_wait"
    state["ct"] = ct


@register
class Firewall(NetworkFunction):
    name = "firewall"
    type_id = 2
    config_keys = CONFIG_KEYS

    def __init__(self) -> None:
        super().__init__()
        self.version = 0
        self.rules: tuple = ()          # ((FlowMatch, action), ...) in config order
        self.default = ALLOW
        self.strict_tcp = False

    # --- config -------------------------------------------------------------
    def init(self, config: dict) -> None:
        config = self.check_config(config)
        raw = config.get("rules", [])
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise NFError("firewall.rules: must be a list of rules")
        rules = []
        for i, r in enumerate(raw):
            where = f"firewall.rules[{i}]"
            if not isinstance(r, dict):
                raise NFError(f"{where}: must be an object")
            extra = set(r) - RULE_KEYS
            if extra:
                raise NFError(f"{where}: unknown fields {sorted(extra)} "
                                f"(known: {', '.join(sorted(RULE_KEYS))})")
            if "action" not in r:
                raise NFError(f"{where}.action: missing (allow or drop)")
            action = r["action"]
            if action not in ACTIONS:
                raise NFError(f"{where}.action: {action!r} is not allow or drop")
            try:
                rules.append((FlowMatch.parse(r, where), action))
            except RuleError as e:  # a bad match field: this NF's config error
                raise NFError(str(e)) from None
        default = config.get("default", ALLOW)
        if default not in ACTIONS:
            raise NFError(f"firewall.default: {default!r} is not allow or drop")
        strict = config.get("strict_tcp", False)
        if not isinstance(strict, bool):
            raise NFError(f"firewall.strict_tcp: {strict!r} is not true or false")
        # all valid: switch over
        self.config = config
        self.rules = tuple(rules)
        self.default = default
        self.strict_tcp = strict
        self.version += 1

    # --- flow state ---------------------------------------------------------
    def allocate_flow_state(self) -> dict:
        return {"verdict": PENDING, "rule": -1, "reason": "", "ct": "new", "seen": 0,
                "dropped": 0, "cfg": -1}

    def deserialize(self, data: bytes) -> dict:
        plain = super().deserialize(data)
        if not isinstance(plain, dict):
            raise ValueError("firewall: serialized flow state is not a map")
        state = self.allocate_flow_state()
        state.update((k, plain[k]) for k in STATE_KEYS if k in plain)
        state["cfg"] = -1  # versions are per process: re-evaluate on the next packet
        return state

    def summary(self, state: dict) -> dict:
        return {"verdict": state["verdict"], "rule": state["rule"], "reason": state["reason"],
                "conntrack": state["ct"], "dropped": state["dropped"],
                "midstream": bool(state["seen"] & SEEN_MIDSTREAM),
                "reset": bool(state["seen"] & SEEN_RST)}

    # --- offload ----------------------------------------------------------------
    def _drops_all(self, state: dict) -> bool:
        return state["verdict"] == DROP or bool(self.strict_tcp and state["seen"] & SEEN_RST)

    def offload(self, state: dict) -> Offload | None:
        if state["cfg"] != self.version:
            return None
        if self._drops_all(state):
            return _OFFLOAD_DROP
        if state["ct"] == "udp":
            return _OFFLOAD_UDP
        if state["ct"] in _MOVED_BY_FLAGS:
            return _OFFLOAD_TCP
        return None

    def absorb(self, state: dict, counts: KernelCounts) -> None:
        if self._drops_all(state):  # an allowed flow's state counts nothing
            state["dropped"] += sum(counts.packets)

    # --- packets --------------------------------------------------------------
    def process_packet(self, pkt, state: dict) -> bool:
        if state["verdict"] == DROP:  # sticky
            state["dropped"] += 1
            return False
        if pkt.proto == TCP:
            l4 = pkt.l4
            if l4 >= 0:
                if self.strict_tcp and state["seen"] & SEEN_RST:
                    state["dropped"] += 1
                    return False
                flags = pkt.frame[l4 + 13]
                if flags & _CHANGES_STATE or state["ct"] != ESTABLISHED:
                    _track(state, flags, pkt.direction)
            elif state["ct"] == "new":
                state["ct"] = "untracked"
        elif state["ct"] == "new":
            state["ct"] = "udp" if pkt.proto == UDP else "untracked"
        if state["cfg"] != self.version:
            self._evaluate(pkt, state)
            if state["verdict"] == DROP:
                state["dropped"] += 1
                return False
        return True

    def _evaluate(self, pkt, state: dict) -> None:
        state["cfg"] = self.version
        if self.strict_tcp and state["seen"] & SEEN_MIDSTREAM:
            state["verdict"], state["rule"], state["reason"] = DROP, -1, "invalid"
            return
        src, dst = ipaddress.ip_address(pkt.src), ipaddress.ip_address(pkt.dst)
        sport, dport = pkt.sport, pkt.dport
        if pkt.direction == REPLY:
            src, dst, sport, dport = dst, src, dport, sport
        proto = pkt.proto
        for i, (match, action) in enumerate(self.rules):
            if match.matches(src, dst, proto, sport, dport):
                state["verdict"], state["rule"], state["reason"] = action, i, "rule"
                return
        state["verdict"], state["rule"], state["reason"] = self.default, -1, "default"
