"""The ``surgeon`` command line (``commands``) and the demos."""
