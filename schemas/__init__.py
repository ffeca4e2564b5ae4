"""Shapes that cross a process boundary: API bodies, run records and v1 events."""
