"""What runs on each rank: the worker, its rendezvous, batching (packed where the probe proves it), and
the extension build lock."""
