"""The live feed (contract.md §10): positions pushed to WebSocket clients as they arrive.

* :mod:`.messages` — the JSON messages and close codes (pure);
* :mod:`.access`   — who may see which device: the token file and the external hook;
* :mod:`.hub`      — subscriptions and fan-out of one position to its subscribers;
* :mod:`.feed`     — the autobahn WebSocket protocol (per-client back-pressure, ping);
* :mod:`.reader`   — the broadcast reader: XREAD from the stream's tail, apart from the
  durable consumer group, so every instance sees every position;
* :mod:`.page`     — the self-contained page at ``GET /``;
* :mod:`.metrics`  — ``processor_live_*``;
* :mod:`.service`  — :class:`LiveService`, the feed as one service;
* :mod:`.wiring`   — :func:`make_live_service`, what the processor's tap calls.
"""

from .service import LiveService, LiveSettings
from .wiring import make_live_service

__all__ = ["LiveService", "LiveSettings", "make_live_service"]
