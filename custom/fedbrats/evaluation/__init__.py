"""Metrics, sliding-window inference and the 15-combination evaluation."""
