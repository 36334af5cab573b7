"""ekmesh for transformers users: ``import ekmesh.hf`` registers ``experts_implementation="ekmesh"`` with
transformers' ``ExpertsInterface``, and ``ekmesh.hf.from_pretrained(MODEL)`` returns a transformers model whose
dense part is loaded in this process (no expert tensor read) and whose routed experts run on the mesh through the
local node (the one running for ``$EKMESH_HOME``, through its experts relay).

    import ekmesh.hf
    model = ekmesh.hf.from_pretrained("Qwen/Qwen3-30B-A3B")   # or a checkpoint directory, or a stored alias
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)

``AutoModelForCausalLM.from_pretrained(path, experts_implementation="ekmesh")`` works too (transformers then loads
the experts as well; they are not used). Layering: ``hf`` imports ``registry`` and what is below it, never ``node``
(it reaches the node through node.json and the relay's socket); transformers is an optional dependency (the ``hf``
extra), imported when this package is.

Modules: ``source`` (MODEL opened: config, tensor table, logged reader), ``link`` (the relay client), ``experts``
(the registered function and the module -> layer binding), ``load`` (``from_pretrained``).
"""

from __future__ import annotations

from ekmesh.hf.experts import bind, register
from ekmesh.hf.link import RelayLink, open_link
from ekmesh.hf.load import from_pretrained, read_log
from ekmesh.hf.source import open_model

register()

__all__ = ["RelayLink", "bind", "from_pretrained", "open_link", "open_model", "read_log", "register"]
