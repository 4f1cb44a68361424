"""Fixtures for the netns tests, in the style of the kernel's selftests:
unique names per test, cleanup even on failure.  Shared helpers (wait_for,
Proc, run_tool, RunningNode) are in tests/helpers.py.

Root-only tests carry the `root` marker (`@pytest.mark.root` or `pytestmark`);
the hook below is the one place that decides whether they run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from tests.helpers import RunningNode


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (CI runs these as root and fails on any skip)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def forget_test_nodes_files(request):
    """Nodes keep their policy under /var/lib/nfactor/<node> (configuration) and
    their logs under /var/log/nfactor/<node>, after down; test nodes' go when
    the session ends (their logs only if every test passed: they tell why not)."""
    roots = {"/var/lib/nfactor": True, "/var/log/nfactor": False}  # root -> also after failures
    before = {root: set(os.listdir(root)) if os.path.isdir(root) else set() for root in roots}
    yield
    for root, always in roots.items():
        if os.path.isdir(root) and (always or not request.session.testsfailed):
            for name in set(os.listdir(root)) - before[root] - {"cluster.key"}:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


@pytest.fixture
def testbed():
    from nfactor_xdp.tools.testbed import Testbed, TestbedConfig
    name = f"t{uuid.uuid4().hex[:5]}"
    tb = Testbed(TestbedConfig(name=name))
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


@pytest.fixture
def node_factory(testbed):
    nodes = []

    def make(runtimes: int = 2, policy: dict | None = None, **settings) -> RunningNode:
        """settings: more NodeConfig fields (e.g. flow_table_size)."""
        name = f"n{uuid.uuid4().hex[:5]}"
        path = None
        if policy is not None:
            path = f"/tmp/nfactor-test-policy-{name}.json"
            with open(path, "w") as f:
                json.dump(policy, f)
        n = RunningNode(testbed, name, runtimes, path, **settings)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()
        assert not os.path.exists(f"/sys/fs/bpf/nfactor/{n.name}"), "pins left behind"
        for leftover in (f"/tmp/nfactor-test-policy-{n.name}.json", f"/var/lib/nfactor/{n.name}"):
            subprocess.run(["rm", "-rf", leftover], check=False)


@pytest.fixture
def node(node_factory):
    return node_factory(2)
