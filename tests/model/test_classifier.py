"""SequenceClassifier (models/classifier.py) and the classifier fields of ModelConfig.

References: the language model alone (the backbone's LM logits are output(hidden_states(x)) bit
for bit, and its init values are the LM's for the same seed); one row alone (a right-padded batch
gives each row the logits it gets unpadded); the hand-computed pool (last real token, mean over the
real tokens); the exact parameter count of the built module.

    .venv/bin/python -m pytest -q tests/model/test_classifier.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clusterlm.errors import ConfigError
from clusterlm.models.build import build_model
from clusterlm.models.classifier import SequenceClassifier, language_model
from clusterlm.models.config import ModelConfig, get_preset

V, PAD = 40, 0
LABELS = ("negative", "neutral", "positive")


def configs(**kw) -> dict[str, ModelConfig]:
    small = dict(vocab_size=V, max_seq_len=32, labels=LABELS, pad_id=PAD, **kw)
    return {
        "gpt": get_preset("gpt-nano", n_layers=2, dim=32, n_heads=4, bias=True, **small),
        "llama-untied": get_preset("llama-nano", n_layers=2, dim=32, n_heads=4, n_kv_heads=2,
                                   tie_embeddings=False, **small),
        "lstm": get_preset("lstm-small", n_layers=2, dim=32, dropout=0.0, **small),
        "gru-untied": get_preset("gru-small", n_layers=1, dim=32, dropout=0.0, tie_embeddings=False, **small),
    }


def built(cfg: ModelConfig, seed: int = 0) -> SequenceClassifier:
    model = build_model(cfg)
    model.init_weights(seed)
    return model.eval()


def fit(model: SequenceClassifier, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> float:
    """`steps` full-batch Adam steps (lr 3e-3) on (x, y); the last loss."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def padded_batch() -> tuple[torch.Tensor, list[int]]:
    """Four rows of 3..8 real ids (never PAD), right-padded with PAD to 8."""
    g = torch.Generator().manual_seed(1)
    lengths = [8, 3, 5, 1]
    x = torch.full((len(lengths), 8), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randint(1, V, (n,), generator=g)
    return x, lengths


# ---- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(labels=("a",)), "at least 2 labels"),
    (dict(labels=("a", "b", "a")), "repeated ['a']"),
    (dict(labels=("a", "")), "empty name"),
    (dict(labels=["a", "b"]), "tuple of strings"),
    (dict(labels=("a", "b"), pool="sum"), "model.pool='sum'"),
    (dict(labels=("a", "b"), pad_id=-2), "model.pad_id=-2"),
    (dict(labels=("a", "b"), pad_id=V), f"model.pad_id={V} is not a token id"),
    (dict(pad_id=3), "are for classifiers"),
    (dict(pool="mean"), "are for classifiers"),
    (dict(bidirectional=True), "is for classifiers"),
    (dict(labels=("a", "b"), bidirectional=True), "arch 'transformer'"),
])
def test_config_refuses_bad_classifier_fields(kw, msg):
    """Each bad value fails in __post_init__ with a ConfigError naming the field."""
    with pytest.raises(ConfigError) as e:
        ModelConfig(vocab_size=V, **kw)
    assert msg in str(e.value)


def test_config_pooling_and_defaults():
    """auto pools the last token for the Transformer and the mean for LSTM/GRU; the defaults are an LM."""
    assert not ModelConfig(vocab_size=V).is_classifier
    cfgs = configs()
    assert cfgs["gpt"].pooling == "last" and cfgs["lstm"].pooling == "mean"
    assert dataclasses.replace(cfgs["lstm"], pool="last").pooling == "last"
    assert cfgs["gpt"].is_classifier


@pytest.mark.parametrize("name", ["gpt", "llama-untied", "lstm", "gru-untied"])
def test_num_params_counts_head(name):
    """ModelConfig.num_params() equals the built classifier's unique parameters, the LM's plus C x D."""
    cfg = configs()[name]
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    lm = dataclasses.replace(cfg, labels=(), pad_id=-1)
    assert cfg.num_params() - lm.num_params() == len(LABELS) * cfg.dim


def test_config_toml_round_trip_and_old_configs():
    """A classifier's [model] survives to_toml -> resolve; a config.toml without the new keys
    (every checkpoint written before them) resolves to an LM."""
    import tomllib

    from clusterlm.config import RunConfig, resolve, to_toml

    cfg = RunConfig(model=configs()["gpt"])
    back = resolve(tomllib.loads(to_toml(cfg)))
    assert back.model == cfg.model and back.model.labels == LABELS
    old = tomllib.loads(to_toml(RunConfig(model=ModelConfig(vocab_size=V))))
    for key in ("labels", "pool", "pad_id"):
        del old["model"][key]
    assert resolve(old).model == ModelConfig(vocab_size=V)


# ---- module --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt", "llama-untied", "lstm", "gru-untied"])
def test_state_dict_names_and_lm_load(name):
    """Keys are backbone.<the LM's keys> + score.weight, and a language model's state dict loads
    into the backbone unchanged (a pre-trained base)."""
    cfg = configs()[name]
    model = built(cfg)
    lm_cfg = dataclasses.replace(cfg, labels=(), pad_id=-1)
    lm = build_model(lm_cfg)
    lm.init_weights(7)
    keys = set(model.state_dict())
    assert keys == {f"backbone.{k}" for k in lm.state_dict()} | {"score.weight"}
    assert model.score.weight.shape == (len(LABELS), cfg.dim) and model.score.bias is None
    assert model.labels == LABELS and language_model(model) is model.backbone and language_model(lm) is lm
    model.backbone.load_state_dict(lm.state_dict())
    x, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(model.backbone(x), lm(x))


@pytest.mark.parametrize("name", ["gpt", "llama-untied", "lstm", "gru-untied"])
def test_hidden_states_are_what_the_lm_head_reads(name):
    """backbone.output(hidden_states(x)) equals the LM's logits bit for bit."""
    model = built(configs()[name])
    x, _ = padded_batch()
    with torch.no_grad():
        lm = model.backbone
        h = lm.hidden_states(x)
        assert h.shape == (4, 8, 32)
        assert torch.equal(lm.output(h).float(), lm(x))


@pytest.mark.parametrize("name", ["gpt", "llama-untied", "lstm", "gru-untied"])
@pytest.mark.parametrize("pool", ["auto", "max"])
def test_pool_matches_hand_computation(name, pool):
    """last: the state at the last non-PAD position; mean: the average over non-PAD positions; max:
    each feature's maximum over non-PAD positions (padding after the last real token never wins)."""
    model = built(dataclasses.replace(configs()[name], pool=pool))
    x, lengths = padded_batch()
    with torch.no_grad():
        h = model.backbone.hidden_states(x)
        if model.config.pooling == "last":
            want = torch.stack([h[b, n - 1] for b, n in enumerate(lengths)])
        elif model.config.pooling == "max":
            want = torch.stack([h[b, :n].amax(dim=0) for b, n in enumerate(lengths)])
        else:
            want = torch.stack([h[b, :n].mean(dim=0) for b, n in enumerate(lengths)])
        torch.testing.assert_close(model(x), model.score(want), rtol=1e-6, atol=1e-6)
        if pool == "max":  # a padded batch gives each row what it gives alone
            alone = torch.cat([model(x[b:b + 1, :n]) for b, n in enumerate(lengths)])
            torch.testing.assert_close(model(x), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt", "llama-untied", "lstm", "gru-untied"])
def test_padded_batch_equals_rows_alone(name):
    """Right padding does not change a row's logits: each row of a padded batch gives what the row
    alone, unpadded, gives (to float32 rounding)."""
    model = built(configs()[name])
    x, lengths = padded_batch()
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[b:b + 1, :n]) for b, n in enumerate(lengths)])
    assert batched.shape == (4, len(LABELS)) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_no_padding_every_position_is_real():
    """pad_id -1: id 0 is an ordinary token, so padding with it changes the last-token logits."""
    cfg = dataclasses.replace(configs()["gpt"], pad_id=-1)
    model = built(cfg)
    x, _ = padded_batch()
    with torch.no_grad():
        h = model.backbone.hidden_states(x)
        torch.testing.assert_close(model(x), model.score(h[:, -1]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt", "llama-untied", "lstm", "gru-untied"])
def test_init_deterministic_and_backbone_is_the_lm(name):
    """init_weights(seed): the same values twice; the backbone's are the LM's for that seed; score
    ~ Normal(0, init_std) (std within 30% on C x D values); another seed gives another head."""
    cfg = configs()[name]
    a, b, c = built(cfg, 3), built(cfg, 3), built(cfg, 4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    lm = build_model(dataclasses.replace(cfg, labels=(), pad_id=-1))
    lm.init_weights(3)
    for k, v in lm.state_dict().items():
        assert torch.equal(v, a.state_dict()[f"backbone.{k}"]), k
    assert not torch.equal(a.score.weight, c.score.weight)
    assert abs(a.score.weight.std().item() - cfg.init_std) < 0.3 * cfg.init_std


def test_init_skips_meta_parameters_like_init_sharded():
    """parallel.init_sharded fills one parameter at a time on a meta shadow: init_weights must skip
    the meta ones and give the real one its full-model value (score.weight and a block weight)."""
    from clusterlm.parallel.parallelize import _set_param

    cfg = configs()["llama-untied"]
    full = built(cfg, 5)
    for name in ("score.weight", "backbone.layers.1.attention.wq.weight", "backbone.output.weight"):
        with torch.device("meta"):
            shadow = build_model(cfg)
        for bname, buf in list(shadow.named_buffers()):
            mod, _, leaf = bname.rpartition(".")
            shadow.get_submodule(mod)._buffers[leaf] = torch.empty_like(buf, device="cpu")
        real = torch.nn.Parameter(torch.empty(full.get_parameter(name).shape), requires_grad=False)
        _set_param(shadow, name, real)
        shadow.init_weights(5)
        shadow._tie()
        assert torch.equal(real, full.get_parameter(name)), name


@pytest.mark.parametrize("name, frozen", [("gpt", set()), ("lstm", {"backbone.output.bias"}),
                                          ("llama-untied", {"backbone.output.weight"}),
                                          ("gru-untied", {"backbone.output.weight", "backbone.output.bias"})])
def test_unused_lm_output_is_frozen(name, frozen):
    """The backbone's output parameters that only the LM head uses are requires_grad=False (and stay
    so after to_empty); a tied output.weight (the embedding) trains. After a backward every trainable
    parameter has a gradient: DDP needs no find_unused_parameters."""
    cfg = configs()[name]
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights(0)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    x, _ = padded_batch()
    model(x).sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == set()


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_classifier_learns_a_separable_task(name):
    """Label = whether token 1 occurs in the row: 200 Adam steps fit 16 padded rows (loss < 0.05)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(configs()[name], labels=("no", "yes"))
    model = built(cfg).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, V, (16, 6), generator=g)
    y = torch.arange(16) % 2
    x[y == 1, 2] = 1
    x[::3, 4:] = PAD
    assert fit(model, x, y) < 0.05


def test_refused_layouts():
    """tp > 1 or pp > 1 with a classifier: one ConfigError naming the layout."""
    from clusterlm.parallel.dims import ParallelDims
    from clusterlm.parallel.dims import validate_layout

    cfg = configs()["gpt"]
    for dims in (ParallelDims(tp=2), ParallelDims(pp=2)):
        with pytest.raises(ConfigError, match="a classifier"):
            validate_layout(dims, dataclasses.replace(cfg, tie_embeddings=False), 2, 2 * 4 * 16, 4, 16)


# ---- bidirectional (BiLSTM / BiGRU) ------------------------------------------------------------------

def test_reverse_real_keeps_padding_in_place():
    """Each row's real tokens reversed, right-padding where it was; pad_id -1 reverses whole rows."""
    from clusterlm.models.classifier import reverse_real

    x = torch.tensor([[5, 6, 7, PAD], [1, 2, 3, 4], [9, PAD, PAD, PAD]])
    assert reverse_real(x, PAD).tolist() == [[7, 6, 5, PAD], [4, 3, 2, 1], [9, PAD, PAD, PAD]]
    assert reverse_real(x, -1).tolist() == [[PAD, 7, 6, 5], [4, 3, 2, 1], [PAD, PAD, PAD, 9]]


@pytest.mark.parametrize("name", ["lstm", "gru-untied"])
@pytest.mark.parametrize("pool", ["last", "mean", "max"])
def test_bidirectional_is_forward_and_reversed_reader_side_by_side(name, pool):
    """bidirectional: the head reads [pool(backbone(x)), pool(reverse(x reversed))] (2 x dim), by hand
    on unpadded rows; a padded batch gives each row what it gets alone; the reverse reader has its
    own init (not the forward one's values); the unused LM outputs of both readers are frozen and
    every trainable parameter gets a gradient."""
    cfg = dataclasses.replace(configs(pool=pool)[name], bidirectional=True)
    model = built(cfg, 2)
    assert model.score.weight.shape == (len(LABELS), 2 * cfg.dim)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert model.reverse is not None and type(model.reverse) is type(model.backbone)
    assert not torch.equal(model.reverse.tok_embeddings.weight, model.backbone.tok_embeddings.weight)
    x, lengths = padded_batch()
    with torch.no_grad():
        full = x[:1]  # 8 real tokens
        fwd = model.pool(model.backbone.hidden_states(full), full)
        bwd = model.pool(model.reverse.hidden_states(full.flip(1)), full.flip(1))
        torch.testing.assert_close(model(full), model.score(torch.cat([fwd, bwd], -1)), rtol=0, atol=0)
        alone = torch.cat([model(x[b:b + 1, :n]) for b, n in enumerate(lengths)])
        torch.testing.assert_close(model(x), alone, rtol=1e-5, atol=1e-5)
    unused = {n.split(".", 1)[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == (
        {f"backbone.{u}" for u in unused} | {f"reverse.{u}" for u in unused})
    model.train()
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == set()
    assert model.reverse.tok_embeddings.weight.grad.abs().sum() > 0


def test_bidirectional_classifier_learns_an_order_task():
    """Label = whether token 1 comes before token 2: a task for which both readers matter less than
    their pair; 200 Adam steps fit 16 padded rows (loss < 0.05)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(configs(pool="max")["lstm"], labels=("no", "yes"), bidirectional=True)
    model = built(cfg).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, V, (16, 6), generator=g)
    y = torch.arange(16) % 2
    x[y == 1, 1], x[y == 1, 3] = 1, 2
    x[y == 0, 1], x[y == 0, 3] = 2, 1
    x[::3, 5:] = PAD
    assert fit(model, x, y) < 0.05
