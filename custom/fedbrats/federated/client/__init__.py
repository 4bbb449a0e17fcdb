"""Site side: the trainer every method shares, the Client API loop and the NVFlare executor."""
