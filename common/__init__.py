"""Helpers both engines use and neither owns: BEIR reading, the document type, device and dtype
resolution, CPU thread settings, and (for tooling only) plotting. Never imports gRPC."""
