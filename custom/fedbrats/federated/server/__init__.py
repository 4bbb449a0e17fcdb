"""Server side: the round controller and pluggable aggregation strategies."""
