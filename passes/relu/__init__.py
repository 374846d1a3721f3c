"""ReLU linearization for private inference: masks, budget search, calibration, folding."""
