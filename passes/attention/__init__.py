"""``LinearizeAttention``: config, module-swap and FX handlers, the inserted module, costs."""
