"""Rate limiter NF: a token bucket per flow (both directions share it).

Config (the "rate_limiter" entry of the policy's nf_config):

    {"pps": 1000,        # packets per second refilled (number > 0)
     "burst": 100,       # bucket size in packets (integer >= 1); a new flow starts full
     "bps": null,        # optional: BYTES (not bits) per second, a second bucket
     "byte_burst": null} # its size in bytes; default bps * burst / pps, at least 1514

Every key is optional (defaults above); unknown keys are errors.  init()
validates everything before changing anything (a bad config raises
NFError (a ValueError) naming the field, and the NF keeps its previous config).

A packet passes when the packet bucket holds a token (and, with bps, the byte
bucket holds len(pkt) bytes: the Ethernet frame length); it then takes them.
Otherwise it is dropped and counted, and takes nothing.  A frame longer than
byte_burst can never pass.  A config change applies to existing flows on
their next packet (a bucket fuller than a smaller new burst is cut down).

Time is pkt.now (the runtime's monotonic clock).  Monotonic times mean
nothing in another process, so deserialize() forgets the time of the last
refill: the first packet after a migration or a restore from a replica
refills nothing (the elapsed time counts as zero) and restarts the clock.
The tokens themselves are kept.  A clock going backwards refills nothing.

Offload (docs/offload.md): the switch enforces the buckets itself, with its
own buckets (they start full when the flow is handed over, whatever this
flow's tokens were: at most one burst more than inline).  Its
buckets take integer rates, so a flow is offloaded only when pps (and bps)
are whole numbers (and fit 32 bits).  Absorbing the switch's counts adds its
forwarded frames to "passed" and its bucket's drops to "dropped", and leaves
the buckets empty as of the switch's last frame ("last"): the switch's bucket
held at least that, so a flow taken back never gets more than the rate.

Flow state (a plain dict, so msgpack serializes it as is):
    tokens   packet tokens (float)
    btokens  byte tokens (float; None until the flow's first packet under bps)
    last     pkt.now of the last refill (None: not started, or just deserialized)
    passed   packets passed
    dropped  packets dropped
"""
from __future__ import annotations

import math
from numbers import Real

from nfactor_xdp.dataplane.nf import NetworkFunction, NFError, register
from nfactor_xdp.dataplane.offload_spec import FORWARD, MAX_RATE, KernelCounts, Offload

CONFIG_KEYS = frozenset({"pps", "burst", "bps", "byte_burst"})
DEFAULTS = {"pps": 1000, "burst": 100, "bps": None, "byte_burst": None}
MIN_BYTE_BURST = 1514
# pkt.now differences are floats: 100.1 - 100.0 at 10 pps refills 0.99999...
# tokens, so a packet needs a token give or take this much
EPSILON = 1e-6
STATE_KEYS = ("tokens", "btokens", "last", "passed", "dropped")


def _positive(config: dict, key: str, integer: bool = False, optional: bool = False):
    value = config.get(key, DEFAULTS[key])
    if value is None and optional:
        return None
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    else:
        ok = (isinstance(value, Real) and not isinstance(value, bool)
              and math.isfinite(value) and value > 0)
    if not ok:
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise NFError(f"rate_limiter.{key}: {value!r} is not {kind}" + (" or null" if optional else ""))
    return value


@register
class RateLimiter(NetworkFunction):
    name = "rate_limiter"
    type_id = 4
    config_keys = CONFIG_KEYS

    def __init__(self) -> None:
        super().__init__()
        self._apply(DEFAULTS)

    def init(self, config: dict) -> None:
        config = self.check_config(config)
        self._apply(config)
        self.config = config

    def _apply(self, config: dict) -> None:
        pps = _positive(config, "pps")
        burst = _positive(config, "burst", integer=True)
        bps = _positive(config, "bps", optional=True)
        byte_burst = _positive(config, "byte_burst", integer=True, optional=True)
        if byte_burst is not None and bps is None:
            raise NFError("rate_limiter.byte_burst: only meaningful with bps")
        if bps is not None and byte_burst is None:
            byte_burst = max(MIN_BYTE_BURST, int(bps * burst / pps))
        self.pps, self.burst = float(pps), float(burst)
        self.bps = None if bps is None else float(bps)
        self.byte_burst = None if byte_burst is None else float(byte_burst)

    def allocate_flow_state(self) -> dict:
        return {"tokens": self.burst, "btokens": None, "last": None, "passed": 0, "dropped": 0}

    def process_packet(self, pkt, state: dict) -> bool:
        now = pkt.now
        last = state["last"]
        elapsed = 0.0 if last is None or now <= last else now - last
        state["last"] = now
        tokens = state["tokens"] + elapsed * self.pps
        if tokens > self.burst:
            tokens = self.burst
        state["tokens"] = tokens
        bps = self.bps
        if bps is None:
            if tokens >= 1.0 - EPSILON:
                state["tokens"] = tokens - 1.0
                state["passed"] += 1
                return True
            state["dropped"] += 1
            return False
        btokens = state["btokens"]
        btokens = self.byte_burst if btokens is None else btokens + elapsed * bps
        if btokens > self.byte_burst:
            btokens = self.byte_burst
        size = len(pkt)
        if tokens >= 1.0 - EPSILON and btokens >= size - EPSILON:
            state["tokens"] = tokens - 1.0
            state["btokens"] = btokens - size
            state["passed"] += 1
            return True
        state["btokens"] = btokens
        state["dropped"] += 1
        return False

    def offload(self, state: dict) -> Offload | None:
        rates = (self.pps, self.burst, self.bps or 0.0, self.byte_burst or 0.0)
        if not all(r.is_integer() and r <= MAX_RATE for r in rates):
            return None  # a fractional rate: the switch's buckets cannot keep it
        pps, burst, bps, byte_burst = (int(r) for r in rates)
        return Offload(FORWARD, pps=pps, burst=burst, bps=bps, byte_burst=byte_burst)

    def absorb(self, state: dict, counts: KernelCounts) -> None:
        state["passed"] += sum(counts.forwarded)
        state["dropped"] += sum(counts.bucket_dropped)
        if counts.last_seen is not None:
            state["tokens"] = 0.0
            if self.bps is not None:
                state["btokens"] = 0.0
            state["last"] = counts.last_seen / 1e9  # pkt.now's clock (monotonic), in seconds

    def deserialize(self, data: bytes) -> dict:
        plain = super().deserialize(data)
        if not isinstance(plain, dict):
            raise ValueError("rate_limiter: serialized flow state is not a map")
        state = self.allocate_flow_state()
        state.update((k, plain[k]) for k in STATE_KEYS if k in plain)
        state["last"] = None  # another process's clock: count the elapsed time as zero
        return state

    def summary(self, state: dict) -> dict:
        out = {"tokens": round(max(0.0, state["tokens"]), 3), "passed": state["passed"],
               "dropped": state["dropped"]}
        if state["btokens"] is not None:
            out["byte_tokens"] = round(max(0.0, state["btokens"]), 1)
        return out
