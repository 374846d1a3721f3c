"""Cost models: parameters and MACs (``macs``), private-inference costs of CNNs under 2PC (``private``, DELPHI)
and TFHE (``fhe``, programmable bootstrappings), and of decoder transformers per token (``transformer_private``)."""
