"""Head discovery, ablation, patching, circuit graphs and steering."""
