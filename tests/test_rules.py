"""Service chain rules: parsing with clear errors, longest-prefix-first
matching, the policy file round trip."""
import json

import pytest

from nfactor_xdp.dataplane.nf import encode_chain
from nfactor_xdp.dataplane.rules import Policy, RuleError, load_policy, save_policy

FM, FW, HP = "flow_monitor", "firewall", "http_parser"


def policy(*rules, default=()):
    return Policy.from_dict({"rules": list(rules), "default_chain": list(default)})


def test_default_chain_when_nothing_matches():
    t = policy({"dport": "80", "chain": [FM]}, default=[FW]).table()
    assert t.lookup("10.0.0.1", "10.0.0.2", 17, 5, 53) == (encode_chain([FW]), 0)


def test_longest_prefix_wins_regardless_of_order():
    p = policy({"dst": "10.0.0.0/8", "chain": [FM]},
               {"dst": "10.1.0.0/16", "chain": [FW]},
               {"dst": "10.1.2.0/24", "chain": [HP]})
    t = p.table()
    assert t.lookup("1.1.1.1", "10.1.2.3", 6, 1, 2)[0] == encode_chain([HP])
    assert t.lookup("1.1.1.1", "10.1.9.3", 6, 1, 2)[0] == encode_chain([FW])
    assert t.lookup("1.1.1.1", "10.9.9.3", 6, 1, 2)[0] == encode_chain([FM])


def test_protocol_and_narrow_ports_break_prefix_ties():
    t = policy({"chain": [FM]},
               {"proto": "tcp", "chain": [FW]},
               {"proto": "tcp", "dport": "8000-8100", "chain": [HP]},
               {"proto": "tcp", "dport": "8080", "chain": [FM, FW]}).table()
    assert t.lookup("1.1.1.1", "2.2.2.2", 17, 1, 8080)[0] == encode_chain([FM])
    assert t.lookup("1.1.1.1", "2.2.2.2", 6, 1, 9000)[0] == encode_chain([FW])
    assert t.lookup("1.1.1.1", "2.2.2.2", 6, 1, 8050)[0] == encode_chain([HP])
    assert t.lookup("1.1.1.1", "2.2.2.2", 6, 1, 8080)[0] == encode_chain([FM, FW])


def test_ipv6_rules_do_not_match_ipv4():
    t = policy({"src": "fd00::/8", "chain": [FM]}).table()
    assert t.lookup("10.0.0.1", "10.0.0.2", 6, 1, 2)[1] == 0
    assert t.lookup("fd00::1", "fd00::2", 6, 1, 2)[1] == 1


@pytest.mark.parametrize("rule,msg", [
    ({"dst": "10.0.0.300/8", "chain": [FM]}, "dst"),
    ({"proto": "icmp", "chain": [FM]}, "proto"),
    ({"dport": "90-80", "chain": [FM]}, "dport"),
    ({"dport": "99999", "chain": [FM]}, "dport"),
    ({"sport": "x", "chain": [FM]}, "sport"),
    ({"chain": ["nope"]}, "unknown NF"),
    ({"dport": "80"}, "needs a chain"),
    ({"colour": "red", "chain": [FM]}, "unknown fields"),
    ({"src": "10.0.0.0/8", "dst": "fd00::/8", "chain": [FM]}, "different IP versions"),
])
def test_bad_rules_are_rejected_with_the_reason(rule, msg):
    with pytest.raises(RuleError, match=msg):
        policy(rule)


def test_policy_file_round_trip_keeps_ids(tmp_path):
    p = policy({"dport": "80", "chain": [FM, HP]}, {"proto": "udp", "chain": [FM]}, default=[FM])
    p.nf_config = {"firewall": {"rules": []}}
    p.delete(1)
    p.add({"dport": "443", "chain": [FW]})
    path = str(tmp_path / "p.json")
    save_policy(p, path)
    back = load_policy(path)
    assert [r.id for r in back.rules] == [2, 3]
    assert back.default_chain == p.default_chain and back.nf_config == p.nf_config


def test_bad_policy_files(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(RuleError, match="not valid JSON"):
        load_policy(str(f))
    f.write_text(json.dumps({"rulez": []}))
    with pytest.raises(RuleError, match="unknown keys"):
        load_policy(str(f))
    f.write_text(json.dumps({"nf_config": {"nope": {}}}))
    with pytest.raises(RuleError, match="unknown NF"):
        load_policy(str(f))
    with pytest.raises(RuleError, match="not found"):
        load_policy(str(tmp_path / "missing.json"))


def test_every_policy_file_error_names_the_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"rules": [{"dport": "80", "chain": ["no_such_nf"]}]}))
    with pytest.raises(RuleError, match=f"policy file {f}: rules\\[0\\].chain: unknown NF"):
        load_policy(str(f))
    with pytest.raises(RuleError, match=f"policy file {tmp_path}: "):  # a directory: an OSError underneath
        load_policy(str(tmp_path))


def test_save_policy_is_atomic_and_durable(tmp_path, monkeypatch):
    import os
    path = str(tmp_path / "policy.json")
    old = policy({"dport": "80", "chain": [FM]})
    save_policy(old, path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        with open(path) as f:  # the old file is whole until the rename
            assert json.load(f) == old.to_dict()
        events.append(("rename", os.path.dirname(src) == os.path.dirname(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    new = policy({"dport": "443", "chain": [FW]})
    save_policy(new, path)
    # the data reaches the disk before the rename, the rename before save_policy returns
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"], events
    assert events[0][1] != path and os.path.dirname(events[0][1]) == str(tmp_path)  # a temporary in the same dir
    assert events[1] == ("rename", True) and events[2] == ("fsync", str(tmp_path))
    assert load_policy(path).to_dict() == new.to_dict() and os.listdir(tmp_path) == ["policy.json"]

    # a write that fails midway (disk full at fsync) leaves the old file, whole, and no temporary
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save_policy(old, path)
    assert load_policy(path).to_dict() == new.to_dict() and os.listdir(tmp_path) == ["policy.json"]


def test_protocols_by_name_or_number_and_ports_never_match_a_portless_flow():
    t = policy({"proto": "gre", "chain": [FM]}, {"proto": 50, "chain": [FW]},
               {"proto": "sctp", "dport": "0-65535", "chain": [HP]}, default=[]).table()
    assert t.lookup("10.0.0.1", "10.0.0.2", 47, 0, 0) == (encode_chain([FM]), 1)
    assert t.lookup("10.0.0.1", "10.0.0.2", 50, 0, 0) == (encode_chain([FW]), 2)
    assert t.lookup("10.0.0.1", "10.0.0.2", 132, 0, 0) == (0, 0)  # a port range: SCTP has no ports here
    assert [r.to_dict()["proto"] for r in policy({"proto": "ESP", "chain": [FM]}, {"proto": "200", "chain": [FM]},
                                                  {"proto": "any", "chain": [FM]}).rules] == ["esp", "200", "any"]
    for bad, why in (("icmp", "ICMP is not a flow"), ("icmpv6", "ICMP is not a flow"), ("banana", "not an IP"),
                     (256, "not an IP"), (-1, "not an IP")):
        with pytest.raises(RuleError, match=f"rules\\[0\\]\\.proto: .*{why}"):
            policy({"proto": bad, "chain": [FM]})


def test_the_fragments_option_round_trips_and_is_checked():
    p = Policy.from_dict({"fragments": "drop"})
    assert p.fragments == "drop" and Policy.from_dict(p.to_dict()).fragments == "drop"
    assert Policy.from_dict({}).fragments == "reassemble"
    with pytest.raises(RuleError, match="policy.fragments: 'keep' is not reassemble or drop"):
        Policy.from_dict({"fragments": "keep"})


def test_observe_mode_is_asked_per_rule_and_for_the_default_chain():
    p = Policy.from_dict({"rules": [{"proto": "tcp", "dport": "80", "chain": ["http_parser"], "observe": True},
                                    {"proto": "tcp", "dport": "81", "chain": ["http_parser"]}],
                          "default_chain": ["http_parser"], "default_observe": True})
    assert p.observe_rules() == frozenset({1, 0})
    again = Policy.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again.to_dict() == p.to_dict() and again.observe_rules() == p.observe_rules()
    assert "observe" not in p.to_dict()["rules"][1]  # inline: the default, left out
    assert Policy.from_dict({"rules": []}).observe_rules() == frozenset()
    with pytest.raises(RuleError, match="observe"):
        Policy.from_dict({"rules": [{"chain": ["http_parser"], "observe": "yes"}]})
    with pytest.raises(RuleError, match="default_observe"):
        Policy.from_dict({"default_observe": 1})
