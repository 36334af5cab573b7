"""The built-in model's data: a read-only registry store (``store/``: blobs, manifest, alias ``builtin``) and
``card.json`` (its measured losses, quoted by docs/BUILTIN_MODEL.md). No code: ``ekmesh.shard.store`` finds the
store by path (``PACKAGED_ROOT``) and opens it read-only; ``tools/package_builtin.py`` writes both.
"""
