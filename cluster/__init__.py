"""The lbnode cluster node: CLI, config, flow sync and lifecycle."""
