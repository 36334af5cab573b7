"""A model opened for one-process use: dense part + every routed expert on one device, tokenizer, generator.

This is what ``ekmesh generate`` runs and what an attention host will build on (with a remote experts backend in
place of ``LocalExperts``). It resolves the device and dtype, finds the default stop ids (tokenizer eos and
``generation_config.json``'s ``eos_token_id``), and works without a tokenizer (token ids in, token ids out).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ekmesh.core.errors import TokenizerError
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, pick_device, pick_dtype
from ekmesh.infer.loader import Checkpoint, load_dense, load_experts
from ekmesh.infer.models.common import CausalLM
from ekmesh.infer.speculative import load_draft
from ekmesh.infer.tokenizer import Tokenizer, eos_ids_in


@dataclass
class LocalModel:
    checkpoint: Checkpoint
    model: CausalLM
    experts: LocalExperts
    tokenizer: Tokenizer | None
    generator: Generator
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def open(cls, source: str | os.PathLike[str] | Checkpoint, device: str | None = None,
             dtype: str | None = None, draft: str | os.PathLike[str] | Checkpoint | None = None,
             speculative: str = "off") -> LocalModel:
        """``source``: a checkpoint directory, or an opened ``Checkpoint`` (e.g. one the registry resolved);
        ``draft``: a draft model for speculative mode "draft" (the same tokenizer); ``speculative``: the mode
        answers use unless a request says otherwise."""
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
        model = load_dense(ckpt, dev, dt)
        experts = LocalExperts(ckpt.config.expert_spec(), dev, dt)
        load_experts(ckpt, experts)
        tok = Tokenizer.from_dir(ckpt.path) if (ckpt.path / "tokenizer.json").exists() else None
        drafts = None if draft is None else load_draft(draft, dev, dt, ckpt.path)
        gen = Generator(model, experts, tok, default_stop_ids=() if tok else eos_ids_in(ckpt.path),
                        speculative=speculative, draft=drafts)
        return cls(ckpt, model, experts, tok, gen, dev, dt)

    def encode_prompt(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError(f"{self.checkpoint.label} has no tokenizer.json; pass token ids instead of text")
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.tokenizer.encode_chat(msgs, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""
