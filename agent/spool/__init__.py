"""The on-disk spool: where received instances, manifests and results live."""
