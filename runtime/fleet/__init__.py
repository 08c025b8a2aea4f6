"""A fleet on one model service: the merged VLA as a Ray Serve deployment, cells calling it remotely."""
