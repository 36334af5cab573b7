"""Blob exchange, the client: ``fetcher`` (the ``Fetcher`` and its behaviour) and ``run`` (one fetch call's
scheduler over worker threads)."""
