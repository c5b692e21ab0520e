"""The training loop and what it needs: the phase's trainable module, checkpoints, diagnostics,
logs and trackers, and whole-split evaluation."""
