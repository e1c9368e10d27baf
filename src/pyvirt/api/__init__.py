"""The per-VM control API: HTTP/1.1 + JSON on a Unix socket.

    server.py    ApiServer: the socket on the VMM's event loop, limits
    _http.py     one connection: h11 framing, buffers, timeouts
    _routes.py   paths -> VmControl calls, strict JSON, error statuses
    openapi.py   the OpenAPI 3.1 document (GET /openapi.json)
    metrics.py   the Prometheus text format (GET /metrics)
    client.py    VmClient, the typed client (httpx), used by ``pyvirt ctl``

Errors (all ``PyvirtError``)::

    ApiSocketError(UserInputError)  server: the socket path cannot be used
    ApiError                        client: the VMM answered 4xx/5xx (status, fault_message)
    ApiConnectionError              client: no VMM answers on the socket

Nothing here is imported on the VMM's boot path unless an API socket is asked
for; the client imports httpx only when it first connects. See docs/api.md.
"""

from pyvirt.api.client import ApiConnectionError, ApiError, Metrics, VmClient

__all__ = ["ApiConnectionError", "ApiError", "Metrics", "VmClient"]
