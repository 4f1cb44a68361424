"""NFActor-XDP: a resilient NFV node on an XDP virtual switch."""
