"""Launch files for DiTharos on Ray clusters, and a local multi-node harness (`cluster/local.py`)."""
