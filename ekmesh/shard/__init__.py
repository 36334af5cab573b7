"""The registry: content-addressed blobs and manifests (``store``, ``manifest``, ``blobfmt``), imports from the hub
or a directory (``importer``, ``hub``, ``source``; ``reader`` reads stored tensors back), placement, and blob
exchange between peers (``exchange``: the server and the wire; ``fetch``: the client). No model code and no libp2p:
peers are reached through the dialer a caller hands in."""
