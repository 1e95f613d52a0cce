"""Bottom layer, torch-free: atomic file writes, dtype names, image extensions, threads, Ctrl-C."""
