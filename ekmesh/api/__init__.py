"""The OpenAI-compatible HTTP API every node serves on localhost.

``types`` (what is served: ``ServedModel``, the ``Engine`` protocol, model-name resolution), ``server`` (HTTP, SSE,
request parsing and limits), ``local`` (the one-process engine) and ``__main__`` (``python -m ekmesh.api``).
The API knows nothing of the mesh: the node hands it an ``Engine``.
"""
