"""``tunelab demo``: a small local web page that puts a base model and its adapters side by side."""

from tunelab.demo.server import DemoApp, serve

__all__ = ["DemoApp", "serve"]
