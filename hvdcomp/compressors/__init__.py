"""The compressor implementations, one module per method."""
