"""The inference process: observations, policies, episodes and chunk scheduling."""
