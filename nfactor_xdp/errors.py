"""The one base class of every error the package raises on purpose.

Each layer names its own errors (BpfError, RuleError, MessageError, ...);
they all derive from NFactorError, so a caller that only wants "the node said
no" catches one class, and the CLI maps them to exit codes in one place
(nfactor_xdp.cli).  Errors that are also OS or value errors keep those bases
too, so `except OSError` and `except ValueError` still see them.
"""
from __future__ import annotations


class NFactorError(Exception):
    """Something the node refused or could not do, with a message for a person."""
