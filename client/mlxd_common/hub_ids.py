"""Hugging Face Hub ids as model sources: ``org/name``, optionally ``org/name@revision``.

The client sends an argument as an id only when it is not an existing path and has this shape; the daemon
treats a non-absolute source of this shape as an id and resolves it with huggingface_hub.
"""

from __future__ import annotations

import re

# The Hub's own rule (huggingface_hub.utils.validate_repo_id): letters, digits, '-', '_', '.', at most 96 each.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w.\-/]{1,200}))?", re.ASCII)


def parse_hub_id(value: str) -> tuple[str, str] | None:
    """``(repo_id, revision)`` when ``value`` has the shape of a hub id (revision "" when none), else None."""
    match = HUB_ID.fullmatch(value)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or value.startswith(("./", "../")):
        return None
    return match["repo"], match["revision"] or ""


def looks_like_hub_id(value: str) -> bool:
    """Whether ``value`` has the shape of ``org/name[@revision]`` (the caller checks it is not a path)."""
    return parse_hub_id(value) is not None
