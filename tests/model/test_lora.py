"""LoRA adapters (clusterlm.finetune.lora) on the Transformer: parameter budget, exactness of a fresh
adapter, training touches only adapters, merge parity, adapter files, and the one-line errors.

    .venv/bin/python -m pytest -q tests/model/test_lora.py
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from clusterlm.errors import CheckpointError, ConfigError
from clusterlm.eval.metrics import lm_loss
from clusterlm.finetune.lora import (
    ADAPTER_FILE,
    LoRAEmbedding,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_adapters,
)
from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset

V, B, T = 64, 4, 16


def llama_cfg(**kw):
    return dataclasses.replace(get_preset("llama-nano", vocab_size=V), max_seq_len=32, **kw)


def gpt_cfg():
    return dataclasses.replace(get_preset("gpt-nano", vocab_size=V), max_seq_len=32, bias=True)


def base(cfg, seed: int = 0) -> nn.Module:
    m = build_model(cfg)
    m.init_weights(seed)
    return m


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for s in range(steps):
        x, y = batch(s)
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("cfg", [llama_cfg(), gpt_cfg()], ids=["llama", "gpt2"])
def test_fresh_adapters_give_the_base_logits_exactly(cfg):
    """B = 0 at initialisation: LoRA model logits == base logits bit for bit."""
    model = base(cfg)
    x, _ = batch()
    with torch.no_grad():
        ref = model(x)
    names = apply_lora(model)
    per_layer = 7 if cfg.mlp == "swiglu" else 6  # wq wk wv wo w1 w2 (w3: SwiGLU only)
    assert len(names) == per_layer * cfg.n_layers
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_rank8_trains_under_5_percent_and_adapter_file_under_5_percent(tmp_path):
    """llama-mini (dim 384, 6 layers) with a byte vocabulary (256): rank 8 on all seven projections
    trains 3.3% of the parameters; the adapter file is under 5% of the model's float32 size."""
    cfg = get_preset("llama-mini", vocab_size=256)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")  # values do not matter for sizes
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight once
    apply_lora(model, rank=8, alpha=16)
    trainable, total = count_parameters(model)
    assert trainable == cfg.n_layers * 8 * sum(m.in_features + m.out_features
                                               for m in model.layers["0"].modules() if isinstance(m, LoRALinear))
    assert trainable / total < 0.05, (trainable, total)
    save_adapters(tmp_path / "ad", model)
    file_bytes = (tmp_path / "ad" / ADAPTER_FILE).stat().st_size
    assert file_bytes / model_bytes < 0.05, (file_bytes, model_bytes)


@pytest.mark.parametrize("cfg", [llama_cfg(), gpt_cfg()], ids=["llama", "gpt2"])
def test_training_moves_only_adapters_and_merge_keeps_the_logits(cfg, tmp_path):
    """After 3 AdamW steps: only lora_a/lora_b have gradients and changed, every base tensor is bit-identical;
    merge_lora gives plain nn.Linear modules, the base model's state dict keys, and the LoRA model's
    logits to 1e-5; saved adapters loaded onto a fresh base reproduce the logits."""
    model = base(cfg)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=8, alpha=16)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    x, y = batch(7)
    lm_loss(model(x), y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith((".lora_a", ".lora_b")) for n in with_grad)
    model.zero_grad(set_to_none=True)
    train(model)
    sd = model.state_dict()
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    after = lora_state_dict(model)
    assert all(not torch.equal(after[k], before[k]) for k in after)  # B moved off zero, A moved
    model.eval()
    with torch.no_grad():
        lora_logits = model(x)
        assert (lora_logits - base(cfg)(x)).abs().max() > 1e-3  # the adapters do something

    save_adapters(tmp_path / "ad", model, meta={"base": "test"})
    fresh = base(cfg).eval()
    load_adapters(tmp_path / "ad", fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), lora_logits, rtol=0, atol=0)

    assert merge_lora(model) == len(after) // 2
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == list(base_sd)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), lora_logits, rtol=0, atol=1e-5)
    if cfg.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


def test_base_checkpoint_loads_into_a_lora_model():
    """The base keys do not move: a base state dict loads with only adapter keys missing."""
    src = base(llama_cfg(), seed=1)
    model = base(llama_cfg(), seed=2)
    apply_lora(model, targets=("wq", "wv"))
    res = model.load_state_dict(src.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all(k.endswith((".lora_a", ".lora_b")) for k in res.missing_keys)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_save_over_an_existing_folder_names_the_functions_own_argument(tmp_path):
    """save_adapters is a Python function: refusing an existing folder, it said 'pass --overwrite', a
    flag no caller has. It names its own overwrite=True, the folder untouched; with it the folder is
    replaced."""
    model = base(llama_cfg())
    apply_lora(model)
    save_adapters(tmp_path / "ad", model, meta={"n": 1})
    with pytest.raises(FileExistsError, match=r"ad already exists; pass overwrite=True to save_adapters to replace "
                                              r"it, or choose another folder$") as e:
        save_adapters(tmp_path / "ad", model, meta={"n": 2})
    assert "--overwrite" not in str(e.value)
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text())["meta"] == {"n": 1}
    save_adapters(tmp_path / "ad", model, meta={"n": 2}, overwrite=True)
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text())["meta"] == {"n": 2}


def test_a_failed_load_leaves_the_base_as_it_was(tmp_path):
    """load_adapters wrapped the base in LoRA layers and froze it before reading adapter.safetensors or
    checking shapes: a damaged file or a mismatched base raised, and left a model with zero adapters,
    every parameter frozen, which the next load_adapters refused ('already has LoRA'). Now the model
    is as given (same modules, same requires_grad, same logits), and a good load still works."""
    model = base(llama_cfg())
    apply_lora(model)
    train(model)
    save_adapters(tmp_path / "ad", model)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter.json").write_text((tmp_path / "ad" / "adapter.json").read_text())
    (tmp_path / "bad" / ADAPTER_FILE).write_bytes(b"garbage")
    x, _ = batch(3)
    for folder, other in (("bad", base(llama_cfg())), ("ad", base(llama_cfg(dim=64)))):
        other.eval()
        kinds = [type(m) for m in other.modules()]
        with torch.no_grad():
            want = other(x)
        with pytest.raises(CheckpointError):
            load_adapters(tmp_path / folder, other)
        assert not lora_modules(other) and [type(m) for m in other.modules()] == kinds
        assert all(p.requires_grad for p in other.parameters())
        with torch.no_grad():
            assert torch.equal(other(x), want)
    fresh = base(llama_cfg())
    assert load_adapters(tmp_path / "ad", fresh) == sorted(lora_modules(model))


def test_load_onto_a_mismatched_base_is_one_line(tmp_path):
    """dim 128 adapters onto a dim 64 base: CheckpointError naming the tensor and both shapes."""
    model = base(llama_cfg())
    apply_lora(model)
    save_adapters(tmp_path / "ad", model)
    other = base(llama_cfg(dim=64))
    with pytest.raises(CheckpointError) as e:
        load_adapters(tmp_path / "ad", other)
    msg = str(e.value)
    assert "\n" not in msg
    assert "layers.0.attention.wq.lora_a" in msg and "(8, 128)" in msg and "(8, 64)" in msg
    # a LoRA model of another rank: same kind of line
    other = base(llama_cfg())
    apply_lora(other, rank=4)
    with pytest.raises(CheckpointError, match=r"lora_a has shape \(8, 128\) .* but \(4, 128\)"):
        load_adapters(tmp_path / "ad", other)


@pytest.mark.parametrize("key, value", [("alpha", 0), ("alpha", -16.0), ("rank", 0), ("rank", "8"),
                                        ("dropout", 1.5), ("targets", "layers.0.attention.wq"), ("dora", "no")])
def test_an_adapter_json_field_out_of_range_is_named(tmp_path, key, value):
    """adapter.json (hand-edited or damaged) with alpha <= 0 loaded silently (adapters a no-op or of the
    opposite sign), a string of targets was read letter by letter ("trained on 'l'"), dora "no" counted as
    true: now one line naming the file, the field and what is valid; the base is left as it was."""
    model = base(llama_cfg())
    apply_lora(model)
    save_adapters(tmp_path / "ad", model)
    meta = tmp_path / "ad" / "adapter.json"
    info = json.loads(meta.read_text())
    info[key] = value
    meta.write_text(json.dumps(info))
    fresh = base(llama_cfg())
    with pytest.raises(CheckpointError) as e:
        load_adapters(tmp_path / "ad", fresh)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{meta}: {key}={value!r} is not valid; {key} is "), msg
    assert not lora_modules(fresh)


def test_targets_matching_nothing_is_one_line():
    """Unknown targets: ConfigError naming them and the Linear names there are; nothing is wrapped."""
    model = base(llama_cfg())
    with pytest.raises(ConfigError) as e:
        apply_lora(model, targets=("wq", "q_proj"))
    msg = str(e.value)
    assert "\n" not in msg and "q_proj" in msg and "wq" in msg and "output" in msg
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    # LSTM: the recurrent weights are not nn.Linear; the output projection and the embedding are layers
    lstm = build_model(dataclasses.replace(get_preset("lstm-small", vocab_size=V), dim=32))
    with pytest.raises(ConfigError, match=r"RNNLM has none of the default lora targets .* from: \['output', "
                                          r"'tok_embeddings'\]"):
        apply_lora(lstm)


def test_tied_output_named_directly_is_refused():
    """An adapter on a tied output alone would change the embedding too once merged: refused in one
    line naming the other holder and what to name instead."""
    with pytest.raises(ConfigError, match=r"'output' shares its weight with 'tok_embeddings.weight' \(tied "
                                          r"embeddings\); name the embedding instead"):
        apply_lora(base(gpt_cfg()), targets=("output",))


def test_tied_embedding_lora_on_an_lm_adapts_both_uses(tmp_path):
    """An LM's tied embedding takes LoRA on the lookup and on the output layer (TiedLoRAOutput, no
    adapter of its own): fresh = the base logits exactly; 3 steps move only the adapters; the update
    reaches the logits of tokens never in the input (through the output path); merge gives plain
    modules, still tied, the base keys and the same logits to 1e-5; saved adapters (embedding keys
    only) reload onto a fresh base and reproduce the unmerged logits."""
    from clusterlm.finetune.lora import TiedLoRAOutput

    model = base(gpt_cfg())
    x, y = batch(4)
    with torch.no_grad():
        ref = model(x)
    names = apply_lora(model, targets=("wq", "tok_embeddings"), rank=4, alpha=8)
    assert "tok_embeddings" in names and all(n == "tok_embeddings" or n.endswith("attention.wq") for n in names)
    assert isinstance(model.output, TiedLoRAOutput) and isinstance(model.tok_embeddings, LoRAEmbedding)
    assert model.output.weight is model.tok_embeddings.weight
    assert not any("output.lora" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    base_sd = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    train(model, steps=3)
    sd = model.state_dict()
    assert [k for k, v in base_sd.items() if not torch.equal(sd[k], v)] == []
    unseen = sorted(set(range(V)) - set(x.unique().tolist()))
    assert unseen and torch.all(model.tok_embeddings.lora_a[:, unseen].abs().sum(0) > 0)  # via the output
    model.eval()
    with torch.no_grad():
        lora_logits = model(x)
    assert (lora_logits - ref).abs().max() > 1e-3
    save_adapters(tmp_path / "ad", model)
    assert set(lora_state_dict(model)) >= {"tok_embeddings.lora_a", "tok_embeddings.lora_b"}
    fresh = base(gpt_cfg()).eval()
    load_adapters(tmp_path / "ad", fresh)
    assert isinstance(fresh.output, TiedLoRAOutput)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), lora_logits, rtol=0, atol=0)
    merge_lora(model)
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding
    assert model.output.weight is model.tok_embeddings.weight
    assert set(model.state_dict()) == set(base_sd)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lora_logits, rtol=0, atol=1e-5)


def classifier(seed: int = 0) -> nn.Module:
    cfg = dataclasses.replace(gpt_cfg(), labels=("neg", "pos"), pad_id=0)
    m = build_model(cfg)
    m.init_weights(seed)
    return m


def test_embedding_lora_on_a_classifier_trains_merges_and_reloads(tmp_path):
    """A classifier's tied embedding takes LoRA (its backbone's LM head never runs): a fresh adapter
    gives the base logits exactly; after 3 AdamW steps only adapters and the head moved; merge gives
    plain nn.Embedding/nn.Linear, the base keys and the same logits to 1e-5; saved adapters load onto
    a fresh base and reproduce the unmerged logits."""
    model = classifier()
    x, _ = batch(3)
    x = x.clamp(min=1)
    with torch.no_grad():
        ref = model(x)
    names = apply_lora(model, targets=("wq", "wv", "tok_embeddings"), rank=4, alpha=8)
    assert "backbone.tok_embeddings" in names
    emb = model.backbone.tok_embeddings
    assert isinstance(emb, LoRAEmbedding) and emb.lora_a.shape == (4, model.config.padded_vocab_size)
    assert emb.lora_b.shape == (model.config.dim, 4) and not torch.any(emb.lora_a)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    model.score.requires_grad_(True)
    base_sd = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sd = model.state_dict()
    assert [k for k, v in base_sd.items() if not torch.equal(sd[k], v)] == ["score.weight"]
    assert torch.all(emb.lora_a[:, x.unique()].abs().sum(0) > 0) and not torch.any(emb.lora_a[:, 0])  # rows of unseen tokens stay 0
    model.eval()
    with torch.no_grad():
        lora_logits = model(x)
    assert (lora_logits - ref).abs().max() > 1e-3
    save_adapters(tmp_path / "ad", model)
    fresh = classifier().eval()
    fresh.score.weight.data.copy_(model.score.weight)
    load_adapters(tmp_path / "ad", fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), lora_logits, rtol=0, atol=0)
    merge_lora(model)
    assert type(model.backbone.tok_embeddings) is nn.Embedding
    assert list(model.state_dict()) == list(base_sd)
    assert model.backbone.output.weight is model.backbone.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(model(x), lora_logits, rtol=0, atol=1e-5)


def test_dropout_only_in_training():
    """Adapter dropout acts in train mode only; eval is deterministic."""
    model = base(llama_cfg())
    apply_lora(model, dropout=0.5)
    train(model, steps=1)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_bf16_autocast_trains_the_fp32_adapters(dora):
    """Under CPU bf16 autocast the update is accumulated in place into the base layer's bf16 output
    (lora.add_low_rank; autocast leaves in-place ops alone, so B is cast to h's dtype there): the
    logits match fp32's to bf16 precision and every adapter gets an fp32 gradient close to fp32's."""
    cfg = dataclasses.replace(get_preset("gpt-nano", vocab_size=V), max_seq_len=32, bias=True, tie_embeddings=True)
    model = base(cfg)
    apply_lora(model, ["wq", "wv", "w1", "w2", "tok_embeddings"], rank=4, alpha=8.0, dora=dora)
    torch.manual_seed(0)  # the adapters' draws below: the same whatever ran before
    with torch.no_grad():  # non-zero adapters, so the update matters
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                m.lora_a.normal_(0, 0.3)
                m.lora_b.normal_(0, 0.3)
    x, y = batch()
    grads = {}
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        lm_loss(logits.float(), y).backward()
        grads[amp] = (logits.float().detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (ref, g32), (low, g16) = grads[False], grads[True]
    assert (low - ref).norm() < 0.03 * ref.norm()  # bf16 keeps 8 bits of mantissa: about 1% here
    assert g16.keys() == g32.keys() and g16
    for n, g in g16.items():
        assert g is not None and g.dtype == torch.float32, n
        assert torch.nn.functional.cosine_similarity(g.flatten(), g32[n].flatten(), dim=0) > 0.95, n


@pytest.mark.slow  # ~25 s on 2 cores: inductor compiles forward and backward
def test_torch_compile_matches_eager():
    """torch.compile of a LoRA model (applied before compiling): loss and adapter gradients equal eager's (1e-5)."""
    cfg = llama_cfg(n_layers=2)
    eager = base(cfg)
    apply_lora(eager)
    train(eager, steps=1)  # B != 0
    compiled_src = base(cfg)
    apply_lora(compiled_src)
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src)
    x, y = batch(3)
    losses = []
    for m in (eager, compiled):
        loss = lm_loss(m(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - losses[1]) < 1e-5
    grads = {n: p.grad for n, p in compiled_src.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith((".lora_a", ".lora_b")) for n in grads)
    for n, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-5)


def test_lora_plus_gives_the_b_factors_their_own_lr():
    """finetune.lora_plus_ratio (LoRA+): every LoRALinear's lora_b in one group at ratio x the lr, the
    A factors and an embedding adapter (whose zero factor is lora_a) at the lr; ratio 1 keeps plain
    LoRA's two groups; the loop's lr = schedule x lr_scale then moves B by ratio x A's first Adam step."""
    from clusterlm.config import FinetuneConfig, OptimConfig
    from clusterlm.train.optim import build_optimizer, param_groups

    model = base(gpt_cfg())
    apply_lora(model, targets=("wq", "w1", "tok_embeddings"), rank=4, alpha=8)
    linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
    groups = param_groups(model, 0.1, lora_plus_ratio=16.0)
    by_scale = {(g["weight_decay"], g["lr_scale"]): {id(p) for p in g["params"]} for g in groups}
    assert by_scale[(0.1, 16.0)] == {id(m.lora_b) for m in linears}
    assert {id(m.lora_a) for m in linears} <= by_scale[(0.1, 1.0)]
    emb = model.tok_embeddings
    assert {id(emb.lora_a), id(emb.lora_b)} <= by_scale[(0.0, 1.0)] | by_scale[(0.1, 1.0)]
    assert [g.get("lr_scale") for g in param_groups(model, 0.1)] == [None, None]

    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0), fused=False, lora_plus_ratio=16.0)
    for g in opt.param_groups:  # what Trainer does each step
        g["lr"] = 1e-3 * g.get("lr_scale", 1.0)
    with torch.no_grad():
        for m in linears:  # B = 0 gives A no gradient; start both away from zero
            m.lora_b.fill_(0.01)
    before = {id(p): p.detach().clone() for m in linears for p in (m.lora_a, m.lora_b)}
    x, y = batch(1)
    lm_loss(model(x), y).backward()
    opt.step()
    step = lambda p: (p.detach() - before[id(p)]).abs().max().item()  # noqa: E731
    for m in linears:  # Adam's first step is lr x sign(grad) on every element with a gradient
        assert step(m.lora_b) == pytest.approx(16e-3, rel=1e-3)
        assert step(m.lora_a) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ConfigError, match="finetune.lora_plus_ratio=0"):
        FinetuneConfig(lora_plus_ratio=0)


@pytest.mark.parametrize("cfg", [llama_cfg(), gpt_cfg()], ids=["llama", "gpt2"])
def test_dora_starts_at_the_base_trains_magnitudes_and_merges(cfg, tmp_path):
    """DoRA (dora=True): a fresh adapter gives the base's logits (its row scale is exactly 1); after 3
    AdamW steps the magnitudes, A and B moved and every base tensor is unchanged; merge_lora (rows
    rescaled) gives the DoRA model's logits to 1e-5 and the base's state dict keys; the adapter folder
    records dora and loads onto a fresh base as DoRA, reproducing the logits; the same steps with plain
    LoRA give other logits."""
    model = base(cfg)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch(7)
    with torch.no_grad():
        base_logits = model.eval()(x)
    names = apply_lora(model, rank=4, alpha=8, dora=True)
    linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert linears and all(m.dora and m.lora_magnitude.shape == (m.out_features,) for m in linears)
    assert all(torch.equal(m.magnitude_scale(), torch.ones(m.out_features)) for m in linears)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base_logits, rtol=0, atol=1e-6)
    model.train()
    train(model)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())
    adapters = lora_state_dict(model)
    assert {k.rsplit(".", 1)[1] for k in adapters} == {"lora_a", "lora_b", "lora_magnitude"}
    assert all(adapters[f"{n}.lora_magnitude"].abs().max() > 0 for n in names)
    model.eval()
    with torch.no_grad():
        dora_logits = model(x)

    save_adapters(tmp_path / "ad", model)
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text())["dora"] is True
    fresh = base(cfg).eval()
    load_adapters(tmp_path / "ad", fresh)
    assert all(m.dora for m in fresh.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), dora_logits, rtol=0, atol=0)

    plain = base(cfg)
    apply_lora(plain, rank=4, alpha=8)
    train(plain.train())
    with torch.no_grad():
        assert (plain.eval()(x) - dora_logits).abs().max() > 1e-4

    assert merge_lora(model) == len(names)
    assert list(model.state_dict()) == list(base_sd)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dora_logits, rtol=0, atol=1e-5)


def test_dora_needs_lora_and_a_plain_adapter_folder_does_not_fit_a_dora_model(tmp_path):
    """finetune.lora_dora without lora_rank is one ConfigError; plain adapters loaded onto a model that
    already has DoRA adapters fail naming the missing magnitude."""
    from clusterlm.config import FinetuneConfig

    with pytest.raises(ConfigError, match="lora_dora=true needs finetune.lora_rank"):
        FinetuneConfig(lora_dora=True)
    plain = base(llama_cfg())
    apply_lora(plain, targets=("wq",), rank=2)
    save_adapters(tmp_path / "plain", plain)
    dora = base(llama_cfg())
    apply_lora(dora, targets=("wq",), rank=2, dora=True)
    with pytest.raises(CheckpointError, match=r"lora_magnitude is not in the file"):
        load_adapters(tmp_path / "plain", dora)
