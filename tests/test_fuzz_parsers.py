"""The parser fuzz tier, a bounded sample on every run: random and mutated
frames through the switch's XDP parser and the runtime's Python parser must
get the same class, key and direction, and neither may fail.  The full count
is `nfactorctl fuzz parsers --count 1000000` (docs/architecture.md).
NFX_FUZZ_SEED picks another sample."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from nfactor_xdp.dataplane.packet import FLOW, classify
from nfactor_xdp.tools.fuzz_frames import FrameSource

SEED = int(os.environ.get("NFX_FUZZ_SEED", "0"))
SAMPLE = 100_000  # 4-10 s (both parsers, the switch's setup), as the machine is busy


def test_frames_are_reproducible_and_reach_every_class():
    a, b = FrameSource(SEED), FrameSource(SEED)
    frames = [next(a) for _ in range(20_000)]
    assert frames[:100] == [next(b) for _ in range(100)]
    seen = Counter()
    for how, f in frames:
        kind, key, _, l4 = classify(f)  # never raises
        seen[kind] += 1
        if kind == FLOW:
            seen["tagged"] += key[40:44] != bytes(4)
            seen["fragment"] += l4 < 0
            seen["portless"] += key[36] not in (6, 17)
        seen.update(how.split("+"))
    assert all(seen[k] > 100 for k in (0, 1, 2, "tagged", "fragment", "portless", "random", "truncate", "bitflip",
                                        "length", "ext", "tag", "frag", "proto", "pad")), seen


@pytest.mark.root
@pytest.mark.netns
def test_xdp_and_python_parsers_agree_on_a_sample():
    from nfactor_xdp.tools.fuzz_parsers import run
    report = run(SAMPLE, seed=SEED)
    assert report["ok"], (SEED, report["findings"], report["examples"][:3])
    assert report["switch_counters"] == report["expected_counters"]
    assert min(report["classes"].values()) > SAMPLE // 10
