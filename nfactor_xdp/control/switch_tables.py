"""The ingress switch's runtime and host tables as the controller writes
them: the pinned maps themselves on the ingress host, or, for a controller
on a worker host (`--controller-hosts`), through the switch agent.

Remote writes are SWITCH_SET requests, retried until answered.  Each carries
(epoch, seq): the controller's start time and a counter, so that a retry
arriving late, or an old controller's last words, never undo a newer write
(the agent keeps the newest per runtime and per host)."""
from __future__ import annotations

import time

from ..formats import config as nodeconf
from ..formats.messages import MsgType
from ..kern.maps import NodeMaps

RETRY = 0.2
RETRIES = 50  # ten seconds: the agent restarts within that


def switch_tables(cfg, ep):
    """What a controller writes the switch's tables with."""
    if cfg.host_id == 0:
        return LocalSwitch(NodeMaps(cfg.name))
    return RemoteSwitch(ep, nodeconf.control_address(cfg, "switch"))


class LocalSwitch:
    """On the ingress host: the maps, written at once."""

    def __init__(self, maps: NodeMaps):
        self.maps = maps

    def set_runtime_state(self, rt_id: int, state: int, host: int | None = None) -> None:
        self.maps.set_runtime_state(rt_id, state, host=host)

    def fence_host(self, host_id: int, fenced: bool = True, then=None) -> None:
        """then: called once the switch has it (here: at once)."""
        self.maps.fence_host(host_id, fenced)
        if then is not None:
            then()

    def host_table(self) -> dict[int, dict]:
        return self.maps.host_table()

    def close(self) -> None:
        self.maps.close()


class RemoteSwitch:
    def __init__(self, ep, agent):
        self.ep, self.agent = ep, agent
        self.epoch, self.seq = time.time_ns(), 0
        self.unanswered = 0

    def set_runtime_state(self, rt_id: int, state: int, host: int | None = None) -> None:
        self._set({"runtime": [rt_id, state, host or 0]})

    def fence_host(self, host_id: int, fenced: bool = True, then=None) -> None:
        """then: called once the agent has answered (the fence is in place)."""
        self._set({"fence": [host_id, fenced]}, then)

    def host_table(self) -> dict[int, dict]:
        reply = self.ep.call(self.agent, MsgType.SWITCH_SET, {"read": True}, timeout=RETRY, retries=RETRIES)
        return {int(h): v for h, v in (reply.body.get("hosts") or {}).items()}

    def close(self) -> None:
        pass

    def _set(self, body: dict, then=None) -> None:
        self.seq += 1
        self.ep.request(self.agent, MsgType.SWITCH_SET, {**body, "epoch": self.epoch, "seq": self.seq},
                        on_reply=lambda msg: then() if then is not None and msg.body.get("ok") else None,
                        timeout=RETRY, retries=RETRIES,
                        on_timeout=lambda rid: self._lost())

    def _lost(self) -> None:
        self.unanswered += 1
