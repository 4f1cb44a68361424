"""NFActor-XDP's tests.  A package, so that test modules share code by plain
imports (`from tests.helpers import wait_for`) with pytest's default import mode."""
