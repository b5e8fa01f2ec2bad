"""Backend health checks: pure hysteresis and aggregation, plus trio probes."""
