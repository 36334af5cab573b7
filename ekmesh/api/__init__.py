"""The OpenAI-compatible HTTP API every node serves on localhost.

``types`` (what is served: ``ServedModel``, the ``Engine`` protocol, model-name resolution), ``transport`` (the
bounded HTTP server: backlog, connection caps, request deadline, JSON errors of the HTTP layer), ``server``
(OpenAI's requests over it, SSE), ``request`` (a request body parsed and validated, refused fields), ``runs`` (the
generations behind an answer: choices, echo, usage, statistics), ``logprobs`` (OpenAI's log-prob shapes), ``local``
(the one-process engine) and ``__main__`` (``python -m ekmesh.api``).
The API knows nothing of the mesh: the node hands it an ``Engine``.
"""
