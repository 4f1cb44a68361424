"""What a runtime answers on its local query socket (formats/query.py): one
function per op, each taking the runtime and the request, returning the
reply.  `nfactorctl status`, `flows`, `migrate` and the tests ask these."""
from __future__ import annotations

import time

from .migration import MigrationError
from .rules import Policy, RuleError

PAGE = 500       # flows per page of the flows query, unless it asks for fewer
MAX_PAGE = 2000  # ... or more: a page of detailed flows takes ~10 ms per 1000


def ping(rt, req: dict) -> dict:
    return {"ok": True, "id": rt.id, "state": rt.state, "registered": rt.registered or not rt.ep}


def status(rt, req: dict) -> dict:
    return {"ok": True, **rt.status()}


def flows(rt, req: dict) -> dict:
    """A page of the runtime's flows: at most `limit` (PAGE, at most
    MAX_PAGE) and `cursor`, the next page's, None on the last.  Served between
    packet batches, a page at a time: a listing of any length never holds the
    packet loop longer than one page does (node_client.flows fetches them all)."""
    limit = req.get("limit")
    limit = min(limit, MAX_PAGE) if isinstance(limit, int) and limit > 0 else PAGE
    cursor = req.get("cursor")
    try:
        actors, cursor, total = rt.flows.page(cursor if isinstance(cursor, str) else None, limit, time.monotonic())
    except KeyError:
        return {"ok": False, "error": "no such cursor (expired?): list the flows again from the first page"}
    detail = bool(req.get("detail", True))
    for a in actors:
        if a.offload is not None:
            rt.offloads.fold(a)  # exact counts, the switch's included
    return {"ok": True, "id": rt.id, "flows": [a.summary(detail=detail) for a in actors], "cursor": cursor,
            "total": total}


def migrate(rt, req: dict) -> dict:
    """Start migrating flows to runtime `to`: all of them, `count` of them or the hex `keys`."""
    keys = list(rt.flows)
    if req.get("keys"):
        keys = [bytes.fromhex(k) for k in req["keys"]]
    elif isinstance(req.get("count"), int):
        keys = keys[:max(0, req["count"])]
    keys = [k for k in keys if k in rt.flows and rt.flows.get(k).migration is None]
    try:
        b = rt.migrator.start_batch(int(req["to"]), keys)
    except (MigrationError, KeyError, TypeError, ValueError) as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, **b.report()}


def migrate_status(rt, req: dict) -> dict:
    b = rt.migrator.batches.get(req.get("batch"))
    if b is None:
        return {"ok": False, "error": "no such migration batch"}
    return {"ok": True, **b.report(), "last_error": rt.migrator.last_error}


def set_policy(rt, req: dict) -> dict:
    try:
        policy = Policy.from_dict(req.get("policy"))
    except RuleError as e:
        return {"ok": False, "error": str(e)}
    rt.set_policy(policy)
    return {"ok": True, "policy_version": rt.policy_version}


def inject_faults(rt, req: dict) -> dict:
    """Failure injection for tests (dataplane/faults.py): arm the named faults."""
    try:
        armed = rt.hooks.arm(**{k: v for k, v in req.items() if k != "op"})
    except ValueError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, "armed": armed}


QUERIES = {f.__name__: f for f in (ping, status, flows, migrate, migrate_status, set_policy, inject_faults)}
