"""Federated parts: client methods (losses), the site trainer, the server controller and aggregation strategies."""
