"""NFActor-XDP: a resilient NFV node on an XDP virtual switch."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it
