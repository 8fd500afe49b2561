"""Benchmarks of lrfast against its peers; results under benchmarks/results/<device>/."""
