"""The NF API (paper 3.4): a network function is one small class whose flow
state is kept apart from its logic, so that the runtime can snapshot,
migrate and replicate the state without the NF knowing.

    class Counter(NetworkFunction):
        name, type_id = "counter", 9
        def allocate_flow_state(self):
            return {"packets": 0}
        def process_packet(self, pkt, state):
            state["packets"] += 1
            return True          # False drops the packet and ends the chain

The runtime calls init(config) once when it loads the NF (and again when the
node's policy changes), allocate_flow_state() when a flow's actor is
created, and process_packet(pkt, state) for each of the flow's packets.
serialize()/deserialize() default to msgpack over the state's plain data (a
dict, or an object's attributes), so an NF author usually writes neither.

Offload (docs/offload.md): after an NF processed a packet, the runtime may
ask offload(state) what the NF still needs of the flow (an offload_spec.Offload,
or None: every packet, the default).  While the switch handles the flow, the
NF's state is not touched by packets; absorb(state, counts) later folds what
the switch did into it, so the state reads as if every packet had come inline.

NFs are known by name and by a 4-bit type id (1..15): a service chain is a
64-bit integer with one id per nibble, the first NF in the low nibble.
"""
from __future__ import annotations

import importlib
from typing import Any

import msgpack
from ..errors import NFactorError
from ..formats.messages import MAX_FRAME
from .offload_spec import KernelCounts, Offload

MAX_TYPE_ID = 15
MAX_CHAIN = 16  # 64 bits / 4
# The most one flow's NF states may take encoded (serialize(), every NF of its
# chain together): a migration carries them in one control message, and so
# does a snapshot; the rest of the message (key, counters) fits in the room left.
MAX_STATE_BYTES = MAX_FRAME - 2_000


class NFError(NFactorError, ValueError):
    pass


class NetworkFunction:
    name: str = ""
    type_id: int = 0
    config_keys: frozenset = frozenset()   # what init() accepts in its config

    def __init__(self) -> None:
        self.config: dict = {}

    # --- the five methods of the paper's API --------------------------------
    def init(self, config: dict) -> None:
        """Called once at load (and on policy change) with this NF's config.
        An NF with settings overrides it: check_config first, then its own
        checks (raising NFError), then apply; a bad config changes nothing."""
        self.config = self.check_config(config)

    def check_config(self, config) -> dict:
        """The checks every NF's config gets: an object whose keys are all in
        `config_keys`.  Returns it ({} for None); raises NFError."""
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise NFError(f"{self.name}: config must be an object")
        unknown = set(config) - set(self.config_keys)
        if unknown:
            known = ", ".join(sorted(self.config_keys)) or "none"
            raise NFError(f"{self.name}: unknown config keys {sorted(unknown)} (known: {known})")
        return config

    def allocate_flow_state(self) -> Any:
        return {}

    def process_packet(self, pkt, state) -> bool:
        return True

    def serialize(self, state) -> bytes:
        return msgpack.packb(_plain(state), use_bin_type=True)

    def state_bytes(self, state) -> int:
        """The encoded size of a flow's state, what migration and replication
        carry.  A flow whose states add up to more than MAX_STATE_BYTES stays
        where it is (reported as not migratable) and is not replicated: an NF
        bounds what it keeps per flow by this measure, not by characters."""
        return len(self.serialize(state))

    def deserialize(self, data: bytes):
        plain = msgpack.unpackb(data, raw=False, strict_map_key=False)
        fresh = self.allocate_flow_state()
        if isinstance(fresh, dict) or not isinstance(plain, dict):
            return plain
        for k, v in plain.items():
            setattr(fresh, k, v)
        return fresh

    # --- optional --------------------------------------------------------
    def summary(self, state) -> dict:
        """What `nfactorctl flows` shows of a flow's state (default: all of it)."""
        p = _plain(state)
        return p if isinstance(p, dict) else {"state": p}

    def flow_ended(self, state) -> None:
        """The flow's actor is being released (FIN/RST or idle)."""

    def offload(self, state) -> Offload | None:
        """What this NF still needs of the flow, asked after it processed a
        packet of the flow (and after a policy change): an Offload, or None
        (the default: every packet comes to Python, never offloaded).  A pure
        function of the state and the config.  The answer holds until the
        runtime asks again: after every packet that reaches the NF (punted
        ones included) and after a policy change, which revokes the offload
        before the new config applies.

        Observe mode: an NF that never drops nor rewrites the flow's packets
        and only needs to see them may answer Offload(FORWARD,
        observe=OBSERVE_PAYLOAD or OBSERVE_ALL).  Where the flow's rule asks
        for observe mode, the switch then forwards the flow and the NF's
        process_packet is fed copies (its return value ignored); elsewhere
        such an answer counts as needing every packet (docs/offload.md)."""
        return None

    def absorb(self, state, counts: KernelCounts) -> None:
        """Fold what the switch did while the flow was offloaded into the
        state, under the config the answer was given with.  `counts` (per
        direction, index 0 orig) are the frames that would have reached this
        NF inline (offload_spec.ChainOffload.counts_for): packets and bytes,
        of which bucket_dropped its own bucket dropped; all of them dropped
        when its own answer was DROP.  Each call brings only
        counts not absorbed before, so adding them is exact; a call may come
        while the flow stays offloaded (a query, a snapshot) and again at the
        end.  An NF in observe mode gets only observe_lost: the copies it
        never saw (a gap in its view of the flow).  Default: nothing (an NF
        whose state does not count packets)."""


def _plain(state):
    if isinstance(state, dict) or state is None or isinstance(state, (int, float, str, bytes, list)):
        return state
    if hasattr(state, "__dict__"):
        return dict(vars(state))
    slots = getattr(type(state), "__slots__", None)
    if slots:
        return {k: getattr(state, k) for k in slots if hasattr(state, k)}
    raise NFError(f"cannot serialize a {type(state).__name__}: give the NF serialize()/deserialize()")


# --- registry ----------------------------------------------------------------
_BY_NAME: dict[str, type[NetworkFunction]] = {}
_BY_ID: dict[int, type[NetworkFunction]] = {}
BUILTIN_MODULES = ("nfs.flow_monitor", "nfs.firewall", "nfs.http_parser", "nfs.rate_limiter")


def register(cls: type[NetworkFunction]) -> type[NetworkFunction]:
    """Class decorator: make an NF known by its name and type id."""
    if not issubclass(cls, NetworkFunction):
        raise NFError(f"{cls!r} is not a NetworkFunction")
    if not cls.name or not cls.name.replace("_", "").isalnum():
        raise NFError(f"{cls.__name__}: name must be a non-empty identifier")
    if not isinstance(cls.type_id, int) or not 1 <= cls.type_id <= MAX_TYPE_ID:
        raise NFError(f"{cls.__name__}: type_id must be 1..{MAX_TYPE_ID} (4 bits, 0 ends a chain)")
    for table, key in ((_BY_NAME, cls.name), (_BY_ID, cls.type_id)):
        other = table.get(key)
        if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
            raise NFError(f"{cls.__name__}: {key!r} is taken by {other.__name__}")
    _BY_NAME[cls.name] = cls
    _BY_ID[cls.type_id] = cls
    return cls


def load_modules(modules=BUILTIN_MODULES) -> None:
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise NFError(f"cannot import NF module {mod!r}: {e}") from None


def by_name(name: str) -> type[NetworkFunction]:
    load_modules()
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NFError(f"unknown NF {name!r} (known: {', '.join(sorted(_BY_NAME))})") from None


def by_id(type_id: int) -> type[NetworkFunction]:
    load_modules()
    try:
        return _BY_ID[type_id]
    except KeyError:
        raise NFError(f"unknown NF type id {type_id}") from None


def known() -> dict[str, int]:
    load_modules()
    return {n: c.type_id for n, c in sorted(_BY_NAME.items())}


# --- chains --------------------------------------------------------------------
def encode_chain(nfs) -> int:
    """A list of NF names or type ids -> the 64-bit chain (first NF in the low nibble)."""
    nfs = list(nfs)
    if len(nfs) > MAX_CHAIN - 1:
        raise NFError(f"a chain holds at most {MAX_CHAIN - 1} NFs")
    chain = 0
    for i, nf in enumerate(nfs):
        tid = by_name(nf).type_id if isinstance(nf, str) else int(nf)
        if not 1 <= tid <= MAX_TYPE_ID:
            raise NFError(f"NF type id {tid} out of 1..{MAX_TYPE_ID}")
        chain |= tid << (4 * i)
    return chain


def decode_chain(chain: int) -> list[int]:
    if not 0 <= chain < 1 << 64:
        raise NFError("a chain is a 64-bit unsigned integer")
    ids = []
    while chain & 0xF:
        ids.append(chain & 0xF)
        chain >>= 4
    if chain:
        raise NFError("chain has NFs after its end (a zero nibble)")
    return ids


def chain_names(chain: int) -> list[str]:
    return [by_id(t).name for t in decode_chain(chain)]
