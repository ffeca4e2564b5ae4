"""Shapes that cross a process boundary: API bodies, statuses, v1 events and the model catalogue."""
