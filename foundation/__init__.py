"""The bottom layer: files, manifests and the config loader. It imports nothing of ours."""
