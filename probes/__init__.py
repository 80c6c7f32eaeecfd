"""Read-only measurements over caches: token dynamics, mixer matrices, massive activations, fixed points."""
