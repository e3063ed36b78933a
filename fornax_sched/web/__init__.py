"""The daemons' HTTP side (docs/http.8.md): ``/health``, ``/metrics`` and the scheduler's web page."""
