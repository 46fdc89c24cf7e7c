"""Weight updates the rungs share: SFT features and loop, checkpoints, trainers glue,
reuse of trained weights by fingerprint, the forgetting check."""
