"""Reading and writing FX graphs from any source: tracing, op tables, scopes, unit placement."""
