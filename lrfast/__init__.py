"""lrfast: a learning-rate range test fast enough to be free."""

__version__ = "0.1.0"
