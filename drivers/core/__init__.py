"""The generic driver process: control loop, trajectory buffer, safety filter, command server."""
