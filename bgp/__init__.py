"""Minimal BGP4 speaker: sans-IO codec and state machine, plus one trio I/O module."""
