"""The version of curvlab (its own module: importing it runs nothing else)."""

__version__ = "0.1.0"
