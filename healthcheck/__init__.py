"""Backend health checks: pure hysteresis and aggregation, plus trio probes.

Modules:
    config   frozen check/backend/service config, ``from_dict(data, path)``, errors with key paths
    state    pure: rise/fall `Hysteresis`, `ServiceHealth` (need-N, drains), events, snapshots
    http     pure: HTTP/1.1 request builder and strict response parser
    probe    trio: TCP connect, HTTP, HTTPS probes returning results with a reason string
    vipnet   through-VIP policy routing (SO_MARK + fwmark tables) and sockets in a named netns
    runner   `HealthChecker`: one task per (backend, check), events on a channel, snapshot()
    errors   `HealthCheckError` and its subclasses
"""
