"""ctrl-exec cluster: leader lease, fencing, membership and config sync."""
