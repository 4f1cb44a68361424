"""Network functions (NF modules) for NFActor-XDP runtimes."""
