"""The ``ekmesh`` command line: ``main`` (logging, exit codes, the parser and ``generate``), one module per command
group (``registry``: import/models/gc, ``chat``, ``mesh``: join/status, ``demo``) and the demo's orchestration of
local peers (``localmesh``). Handlers import the layers they run inside the handler, so ``ekmesh --help`` loads no
torch or libp2p.
"""
