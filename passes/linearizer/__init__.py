"""``LinearizerSandwich``: replace layers by fitted or exact Linearizers."""
