"""Bridges from other meta-learning libraries to metagrad, installed as ``metagrad.adapters``.

Each adapter imports its library lazily; the core never imports them.
"""
