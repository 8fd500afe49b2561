"""Integrations of lrfast with training frameworks (optional: each module imports its framework lazily)."""
