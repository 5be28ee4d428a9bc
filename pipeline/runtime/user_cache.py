"""Our directories in the user's cache (compiled kernels, bytecode): where they go and whether
they can be used. Standard library only: the CLI asks before torch is imported."""

from __future__ import annotations

import os


def path(*parts: str) -> str:
    """$XDG_CACHE_HOME/rerank-batch/<parts> (~/.cache/... where XDG_CACHE_HOME is unset or
    relative, which the XDG spec says to ignore); '' where `~` does not resolve either (no HOME,
    no passwd entry: expanduser would leave a relative '~')."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        home = os.path.expanduser("~")
        if home.startswith("~") or not os.path.isabs(home):
            return ""
        base = os.path.join(home, ".cache")
    return os.path.join(base, "rerank-batch", *parts)


def usable(directory: str) -> str:
    """`directory`, made if missing, when this user can write in it; '' otherwise (the caller
    then keeps the tool's own default)."""
    if not directory:
        return ""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return ""
    return directory if os.access(directory, os.W_OK | os.X_OK) else ""
