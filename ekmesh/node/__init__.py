"""The node: the one place where ekmesh's parts are wired together (``node``), this node's share of a model's
experts (``claim``) and what it serves with them (``serving``: the expert server and, as attention host, generation
over the mesh for the API).
"""
