"""Worker registry, prefix index, placement policies and PD pairing (see README module map)."""
