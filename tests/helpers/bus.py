"""Connections to the test bus, with the identity a test acts as."""

from __future__ import annotations

import nats

from tunebus.shared.bus import nats_options
from tunebus.shared.settings import Settings


async def connect(settings: Settings, **kwargs) -> nats.NATS:
    """A plain nats-py connection with the servers and credentials of `settings`."""
    return await nats.connect(**nats_options(settings), **kwargs)
