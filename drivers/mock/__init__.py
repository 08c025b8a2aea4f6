"""A kinematic arm with no hardware at all."""
