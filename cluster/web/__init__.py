"""The node's HTTP listener: Prometheus metrics, the JSON status API and the web console.

`app.App` is the ASGI application (pure request handling over two callables, testable without
a socket); `server.Listener` serves it with hypercorn's trio worker inside the node's nursery.
"""
from cluster.web.app import App
from cluster.web.server import Listener, WebError

__all__ = ["App", "Listener", "WebError"]
