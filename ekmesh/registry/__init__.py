"""The registry joined to the loader: the one place that needs both ``ekmesh.shard`` and ``ekmesh.infer``.

shard and infer are siblings that never import each other. Cutting a checkpoint into blobs by what the loader
reads (``imports``) and opening stored blobs as a ``Checkpoint`` (``lookup``) need both, so they live here, one
layer above them and below everything that uses them (``node``, ``api``, ``cli``).
"""
