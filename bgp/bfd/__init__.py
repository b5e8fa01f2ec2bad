"""BFD (RFC 5880, single hop RFC 5881) for the BGP speaker: `codec` (control packets), `fsm`
(the session table, timers and demultiplexer; pure) and `session` (the only I/O: UDP with TTL 255)."""
