"""How adapters are named on the command line and in requests: `name`, `name:3`, `name@production`."""

from __future__ import annotations

import re
from dataclasses import dataclass

ALIASES = ("latest", "production")
_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,63})(?::(?P<version>\d+)|@(?P<alias>[a-z]+))?$")


class BadRef(ValueError):
    pass


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None  # latest or production; neither given means latest

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.alias or 'latest'}"


def parse_ref(text: str) -> Ref:
    match = _REF.match(text.strip())
    if not match:
        raise BadRef(f"bad adapter reference {text!r}: expected name, name:version or name@alias "
                     f"({', '.join(ALIASES)})")
    alias = match["alias"]
    if alias is not None and alias not in ALIASES:
        raise BadRef(f"unknown alias {alias!r} in {text!r}: the aliases are {', '.join(ALIASES)}")
    version = int(match["version"]) if match["version"] else None
    if version == 0:
        raise BadRef(f"bad adapter reference {text!r}: versions start at 1")
    return Ref(match["name"], version, alias)
