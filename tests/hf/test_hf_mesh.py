"""``ekmesh.hf`` through real nodes: every family's tiny checkpoint served by three ``ekmesh join`` processes (an
attention host holding no expert, whose home the bridge uses, and two expert holders, R = 1, each holding experts
of every MoE layer), loaded with ``ekmesh.hf.from_pretrained``.

Per family: the logits equal plain transformers on the same checkpoint within 1e-4 (fp32) and greedy ``generate`` is
identical (its steps' logits too); the read log holds no expert tensor; the host made round trips to both holders;
the stored model by id on the host is the same model; another checkpoint is refused (``ModelNotServedError``). Over
one family's mesh: ``transformers.pipeline("text-generation")`` gives plain transformers' text, and a PEFT LoRA
adapter on the attention projections trains (its logits equal transformers + the same adapter; a backward step
updates only the adapter; the experts' output is a constant to autograd). A host alone, whose experts no peer
serves, is refused with ``ExpertsMissingError``.

Cost: a mesh is started once per family (a module-scoped fixture; pytest groups the tests of one family) with
``QuickMesh`` (tests/hf/hfmesh.py: nodes forked from a ``Zygote`` that made their imports once per module, started
as soon as their bootstrap peer has an address, with a store shared from the importing node so nothing is fetched).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ekmesh.hf
from ekmesh.core.errors import ExpertsMissingError, ModelNotServedError
from tests.discovery.meshproc import NodeProc, env_for, wait_until
from tests.families import BUILDERS
from tests.hf.hfmesh import ForkedNodeProc, QuickMesh
from tests.hf.zygote import Zygote
from tests.node.servingmesh import BASE, seeds_splitting_every_layer
from tests.tiny_models import make_tiny, random_prompt

HOST = ["--no-experts"]
HOLDER = ["--no-attention"]
FAMILIES = sorted(BUILDERS)
TOL = 1e-4
DECODE = 8  # greedy tokens compared per model
PROMPT = "In the beginning"


def _import(src: Path, home: Path) -> str:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    return import_full(str(src), store=Store(home / "store")).model_id


def _write_tokenizer(directory: Path, vocab: int) -> None:
    """A character-level tokenizer (``tokenizers``) of ``vocab`` ids saved beside the checkpoint: id 0 is
    ``<unk>``, then the printable ASCII characters (the tiny checkpoints have no tokenizer of their own)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][:vocab - 1]
    words = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    words.update({f"<extra_{i}>": i for i in range(len(words), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one character a token
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


@dataclass
class Served:
    arch: str
    src: Path  # the checkpoint directory the nodes imported (with a tokenizer)
    ref: Any  # plain transformers on it
    model_id: str
    mesh: QuickMesh
    snap: dict[str, Any]  # the host's status once the mesh was ready

    @property
    def host(self) -> NodeProc:
        return self.mesh.nodes[0]

    def holders(self) -> set[str]:
        return {p["peer_id"] for p in self.snap["peers"] if p["models"].get(self.model_id)}


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """The fork server every node of this module is started from (its imports made once)."""
    z = Zygote(env_for(tmp_path_factory.mktemp("zygote")))
    yield z
    z.close()


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, zygote: Zygote
           ) -> Iterator[Served]:
    """A mesh serving family ``request.param``: [host, holder, holder], every MoE layer split over both holders."""
    from ekmesh.shard.store import Store

    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    src, ref = BUILDERS[arch](tmp / "ckpt")
    _write_tokenizer(src, ref.config.vocab_size)
    model_id = _import(src, tmp / "n0")
    m = Store(tmp / "n0" / "store").load_manifest(model_id)
    h0, h2 = seeds_splitting_every_layer(m, 2, 1, 4.0, arch)
    # the host first: the holders, bootstrapping from it, each wait to meet the other before they place (a holder
    # started alone would take every expert, then hand half over while the host may still route to it)
    with QuickMesh(zygote, tmp, model_id, [HOST, HOLDER, HOLDER], seeds=[f"{arch}-host", h0, h2],
                   extra=["--replicas", "1", "--memory", "4"]) as mesh:
        snap = mesh.wait_ready(0, timeout=90)
        yield Served(arch, src, ref, model_id, mesh, snap)


def _compare(model: Any, ref: Any, vocab: int, label: str, decode: int = DECODE) -> None:
    """Prefill logits within TOL of ``ref`` (max difference printed); ``decode`` greedy tokens identical, and their
    steps' logits within TOL."""
    ids = torch.tensor([random_prompt(vocab)])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
        diff = (got - want).abs().max().item()
        print(f"{label}: max |logits - transformers| = {diff:.3g}")
        assert diff <= TOL, f"{label}: logits differ by {diff}"
        if not decode:
            return
        kw = dict(max_new_tokens=decode, min_new_tokens=decode, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        out, expected = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert out.sequences.tolist() == expected.sequences.tolist(), label
    step = max((a - b).abs().max().item() for a, b in zip(out.logits, expected.logits, strict=True))
    assert step <= TOL, f"{label}: the decode steps' logits differ by {step}"


def _no_expert_read(model: Any, label: str) -> None:
    log = ekmesh.hf.read_log(model)
    assert log, label
    experts = [n for n in log if ".experts." in n]
    assert experts == [], f"{label}: expert tensors were read: {experts[:5]}"
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), label
    assert not any(".experts." in n for n, _ in model.named_parameters()), label  # the dense part only is held


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("served", FAMILIES, indirect=True)
def test_every_family_through_three_nodes_equals_transformers(served: Served, tmp_path: Path) -> None:
    from transformers import PreTrainedModel

    arch, ref, host = served.arch, served.ref, served.host
    holders = served.holders()
    assert len(holders) == 2 and served.snap["serving"]["loaded_experts"] == 0, served.snap["serving"]
    assert served.snap["serving"]["relay_addr"], served.snap["serving"]

    model = ekmesh.hf.from_pretrained(served.src, home=host.home)  # the directory the nodes imported
    assert isinstance(model, PreTrainedModel) and model.config._experts_implementation == "ekmesh"
    _compare(model, ref, ref.config.vocab_size, f"{arch} through 3 nodes")
    _no_expert_read(model, arch)
    after = host.status()["serving"]
    assert all(after["peers"][p]["round_trips"] > 0 for p in holders), after["peers"]
    # (a frame that misses its deadline on a loaded machine is computed by the host from the blob, exactly;
    # so experts loaded on the host afterwards are not an error, as in tests/node/test_mesh_nodes.py)
    assert after["verify"]["banned"] == []

    # the stored model by id on the host (its dense blobs): the same model
    by_id = ekmesh.hf.from_pretrained(served.model_id, home=host.home)
    _compare(by_id, ref, ref.config.vocab_size, f"{arch} by model id", decode=0)
    _no_expert_read(by_id, arch)

    other = tmp_path / "other"  # another checkpoint: the same tensors, one config value changed
    shutil.copytree(served.src, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "initializer_range": 0.5}))
    with pytest.raises(ModelNotServedError, match=served.model_id):
        ekmesh.hf.from_pretrained(other, home=host.home)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("served", ["qwen3_moe"], indirect=True)
def test_a_text_generation_pipeline_gives_transformers_text(served: Served) -> None:
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(served.src)  # the checkpoint's own tokenizer (written by the fixture)
    model = ekmesh.hf.from_pretrained(served.src, home=served.host.home)
    kw = dict(max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False)
    got = pipeline("text-generation", model=model, tokenizer=tok)(PROMPT, **kw)
    want = pipeline("text-generation", model=served.ref, tokenizer=tok)(PROMPT, **kw)
    print(f"pipeline: {got!r}")
    assert got == want
    text = got[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    link = ekmesh.hf.experts.bound_link(model)
    assert link is not None and link.calls > 0  # the pipeline's forwards went through the node's relay


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("served", ["qwen3_moe"], indirect=True)
def test_a_lora_adapter_on_the_dense_part_trains(served: Served) -> None:
    """PEFT LoRA on the attention projections of a bridged model: forward works and equals transformers with the
    same adapter; the adapter changes the logits; a backward step gives every adapter weight a gradient and
    updates it, and nothing else; the experts' output is a constant to autograd (no gradient into the mesh)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    def lora() -> LoraConfig:  # random A and B (not B = 0), so the adapter changes the logits from the start
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)

    vocab = served.ref.config.vocab_size
    ids = torch.tensor([random_prompt(vocab)])
    model = ekmesh.hf.from_pretrained(served.src, home=served.host.home)
    with torch.no_grad():
        base = model(ids).logits
    tuned = get_peft_model(model, lora())
    with torch.no_grad():
        adapted = tuned(ids).logits
    assert (adapted - base).abs().max().item() > 1e-2, "the adapter did not change the logits"

    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(served.src, dtype=torch.float32).eval(), lora())
    set_peft_model_state_dict(ref, get_peft_model_state_dict(tuned))  # the same adapter on plain transformers
    with torch.no_grad():
        diff = (ref(ids).logits - adapted).abs().max().item()
    print(f"lora: max |logits - transformers + peft| = {diff:.3g}")
    assert diff <= TOL

    experts_out: list[torch.Tensor] = []
    hooks = [mod.register_forward_hook(lambda _m, _i, out: experts_out.append(out))
             for _layer, mod in ekmesh.hf.experts.experts_modules(tuned).values()]
    link = ekmesh.hf.experts.bound_link(tuned)
    assert link is not None
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    tuned.train()
    loss = tuned(ids, labels=ids).loss
    calls = link.calls
    loss.backward()
    assert link.calls == calls, "the backward pass called the mesh"
    for h in hooks:
        h.remove()
    assert experts_out and not any(t.requires_grad for t in experts_out), "the experts' output carries a graph"
    assert all(p.grad is not None and p.grad.abs().sum().item() > 0 for p in trainable.values())
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable), sorted(changed ^ set(trainable))[:5]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_whose_experts_no_peer_serves_is_refused(tmp_path: Path, zygote: Zygote) -> None:
    src, _ = make_tiny("mixtral", tmp_path / "ckpt")
    model_id = _import(src, tmp_path / "n0")
    node = ForkedNodeProc(zygote, tmp_path / "n0", *BASE, "--model", model_id, *HOST)
    try:
        wait_until(lambda: node.status()["serving"]["state"] == "serving", 60, "the lone host loading attention")
        missing = node.status()["serving"]["missing_experts"]
        assert missing == 3 * 8
        with pytest.raises(ExpertsMissingError, match=f"{missing} routed experts of model {model_id}"):
            ekmesh.hf.from_pretrained(src, home=tmp_path / "n0")
    finally:
        node.stop()
