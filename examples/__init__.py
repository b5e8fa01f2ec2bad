"""Example configs, the namespace lab and the demos."""
