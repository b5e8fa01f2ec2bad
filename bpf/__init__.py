"""XDP data plane: the C program, its loader and the typed map API the rest of lbnode uses."""
