"""The pass framework: config, registry and handler templates, sites, apply, transactions, recipes, persistence, reports."""
