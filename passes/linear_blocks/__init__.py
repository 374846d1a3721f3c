"""``ReplaceLinearBlocks``: measure block linearity, fold the most linear spans away."""
