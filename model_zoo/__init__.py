"""Bundled models and the interface every model (bundled or a site's own) implements."""
