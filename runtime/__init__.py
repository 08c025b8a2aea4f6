"""armada runtime: everything not tied to one device (protocol, transport, config, inference, CLI)."""
