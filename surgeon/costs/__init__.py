"""Cost models: parameters and MACs (``macs``), private-inference costs (``private``)."""
