"""Hugging Face <-> clusterlm for the encoder families (models/encdec.py): configs, weight names and
layouts. models/convert.py dispatches here by model_type; files and commands are in interop/.

arch "encoder" <-> `RobertaPreLayerNormForMaskedLM` (model_type "roberta-prelayernorm"): the
pre-LN member of the BERT family, so the blocks map one to one (attention.LayerNorm = attention_norm,
intermediate.LayerNorm = ffn_norm), embeddings.LayerNorm = emb_norm, the final LayerNorm = norm,
lm_head.{dense, layer_norm} = mlm_head.{dense, norm} (exact GELU between them, as ours), and
lm_head.decoder (+ lm_head.bias) = output. RoBERTa numbers positions from pad_token_id + 1 (fairseq's
make_positions): our learned table is written into rows pad_token_id+1 onwards, the rows below stay
zero, and max_position_embeddings = max_seq_len + pad_token_id + 1. token_type_embeddings is one zero
row (type_vocab_size 1); on import its row 0, which every token gets by default, is folded into the
position table. The post-LN BERT classes (BertForMaskedLM) would need every norm moved.

arch "encdec" <-> `MBartForConditionalGeneration` (model_type "mbart"): pre-LN, with
layernorm_embedding (= emb_norm) and a final layer_norm in both stacks, learned positions at offset 2
(rows 0 and 1 stay zero), one shared embedding (tied to lm_head when model.tie_embeddings),
scale_embedding false, final_logits_bias zeros. MBart's LayerNorms use torch's default eps 1e-5.

Both: our MLP is GELU's tanh approximation ("gelu_pytorch_tanh" in transformers; "gelu_new" is the
same function) and our attention scales by 1/sqrt(head dim), as theirs. What the target classes cannot
express is refused by `check_exportable` in one line naming the option: rotary or sinusoidal
positions, RMSNorm, SwiGLU, grouped-query attention, a head size other than dim/n_heads, and (MBart)
norm_eps other than 1e-5. A model without biases exports with zero biases (the same function).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from clusterlm.errors import CheckpointError, ConfigError
from clusterlm.models.config import ModelConfig

log = logging.getLogger(__name__)

ROBERTA, MBART = "roberta-prelayernorm", "mbart"
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GELU's tanh approximation
MBART_POS_OFFSET = 2  # MBartLearnedPositionalEmbedding.offset
MBART_EPS = 1e-5  # MBart's nn.LayerNorm(d_model) default eps


# ---- configs --------------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that expresses `cfg` (arch encoder or encdec) exactly, else ConfigError."""
    target = {"encoder": "RobertaPreLayerNormForMaskedLM", "encdec": "MBartForConditionalGeneration"}[cfg.arch]
    if cfg.labels:
        raise ConfigError(f"model.labels={list(cfg.labels)}: the classifier pools the {cfg.pooling} hidden state "
                          "into one bias-free Linear (score); RoBERTa's classification head reads the first token "
                          "through dense + tanh, so no transformers class computes it; export the masked-LM "
                          "encoder it was fine-tuned from, or serve the classifier with `clusterlm serve` (POST /classify)")
    bad = []
    if cfg.pos != "learned":
        bad.append(f"model.pos={cfg.pos!r} (needs 'learned')")
    if cfg.norm != "layernorm":
        bad.append(f"model.norm={cfg.norm!r} (needs 'layernorm')")
    if cfg.mlp != "gelu":
        bad.append(f"model.mlp={cfg.mlp!r} (needs 'gelu')")
    if cfg.kv_heads != cfg.n_heads:
        bad.append(f"model.n_kv_heads={cfg.kv_heads} (grouped-query attention; needs n_kv_heads = n_heads = {cfg.n_heads})")
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        bad.append(f"model.head_size={cfg.head_dim} (needs dim/n_heads = {cfg.dim // cfg.n_heads})")
    if cfg.arch == "encdec" and cfg.norm_eps != MBART_EPS:
        bad.append(f"model.norm_eps={cfg.norm_eps} (MBart's LayerNorms use {MBART_EPS})")
    if bad:
        raise ConfigError(f"model.arch={cfg.arch!r} exports as transformers' {target}, which cannot express "
                          f"{'; '.join(bad)}")
    return ROBERTA if cfg.arch == "encoder" else MBART


def config_to_hf(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    """config.json for `cfg` (vocab_size = the padded vocabulary). RoBERTa needs a pad_token_id (its
    positions count from it): the tokenizer's, else the first row of the padded vocabulary no token uses."""
    kind = check_exportable(cfg)
    V, D = cfg.padded_vocab_size, cfg.dim
    common = {"vocab_size": V, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
              "eos_token_id": eos_id, "dtype": "float32"}
    if kind == ROBERTA:
        pad = roberta_pad_id(cfg, pad_id)
        return {"architectures": ["RobertaPreLayerNormForMaskedLM"], "model_type": ROBERTA, "hidden_size": D,
                "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "intermediate_size": cfg.hidden_dim, "hidden_act": "gelu_pytorch_tanh",
                "max_position_embeddings": cfg.max_seq_len + pad + 1, "type_vocab_size": 1,
                "layer_norm_eps": cfg.norm_eps, "pad_token_id": pad, "initializer_range": cfg.init_std,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "is_decoder": False,
                "add_cross_attention": False, **common}
    return {"architectures": ["MBartForConditionalGeneration"], "model_type": MBART, "d_model": D,
            "encoder_layers": cfg.enc_layers, "decoder_layers": cfg.n_layers,
            "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
            "encoder_ffn_dim": cfg.hidden_dim, "decoder_ffn_dim": cfg.hidden_dim,
            "activation_function": "gelu_pytorch_tanh", "max_position_embeddings": cfg.max_seq_len,
            "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": cfg.init_std, "pad_token_id": pad_id,
            "decoder_start_token_id": bos_id, "forced_eos_token_id": None, "is_encoder_decoder": True, **common}


def roberta_pad_id(cfg: ModelConfig, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    if cfg.padded_vocab_size > cfg.vocab_size:  # a padding row of the vocabulary: no text encodes to it
        return cfg.vocab_size
    raise ConfigError("RoBERTa numbers positions from pad_token_id + 1 and treats that id as padding, but the "
                      "tokenizer has no padding token and the vocabulary no spare row; train with a tokenizer that "
                      "has one, or set model.vocab_multiple so that the vocabulary has a padding row")


MAX_CONTEXT = 1 << 20  # rotary tables and position embeddings are built for the whole context at load


def check_sizes(hf: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """The config's sizes are whole numbers >= 1 (a missing required one: KeyError, named by the caller)
    and its context at most MAX_CONTEXT; for every family (models/convert.py imports it from here)."""
    for key in required + optional:
        if key not in hf or (key in optional and hf[key] is None):
            if key in required:
                raise KeyError(key)
            continue
        v = hf[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.json {key}={v!r} must be a whole number >= 1")
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(hf.get(key), int) and hf[key] > MAX_CONTEXT:
            raise ConfigError(f"config.json {key}={hf[key]:,}: clusterlm builds its position tables for the whole "
                              f"context when it loads a model; at most {MAX_CONTEXT:,} (lower it in config.json)")


def _tanh_gelu(hf: dict[str, Any], key: str, default: str) -> None:
    act = hf.get(key, default)
    if act not in TANH_GELU:
        raise ConfigError(f"config.json {key}={act!r}; clusterlm's MLP is GELU's tanh approximation "
                          f"({' or '.join(TANH_GELU)}), not the same function")


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a roberta-prelayernorm or mbart config.json dict."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if any("ForSequenceClassification" in a or "ForTokenClassification" in a or "ForQuestionAnswering" in a
           for a in archs):
        raise ConfigError(f"config.json architectures {archs}: its task head (dense + tanh on the first token, or "
                          "per-token heads) has no clusterlm equivalent; convert the masked-LM / seq2seq model")
    if mt == ROBERTA:
        _tanh_gelu(hf, "hidden_act", "gelu")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError("config.json is_decoder/add_cross_attention: a RoBERTa decoder is not a clusterlm encoder")
        if hf.get("pad_token_id") is None:
            raise ConfigError("config.json pad_token_id is null; RoBERTa's positions count from it")
        check_sizes(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "max_position_embeddings"))
        pad, rows = hf["pad_token_id"], hf["max_position_embeddings"]
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < rows - 1:
            raise ConfigError(f"config.json pad_token_id={pad!r}: RoBERTa numbers positions from pad_token_id + 1, so "
                              f"it must be a whole number from 0 to max_position_embeddings - 2 = {rows - 2}")
        D, H = hf["hidden_size"], hf["num_attention_heads"]
        return ModelConfig(arch="encoder", vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], dim=D,
                           n_heads=H, ffn_dim=hf["intermediate_size"],
                           max_seq_len=hf["max_position_embeddings"] - hf["pad_token_id"] - 1, pos="learned",
                           norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), mlp="gelu", bias=True,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=0.0,
                           init_std=float(hf.get("initializer_range", 0.02)))
    if mt == MBART:
        _tanh_gelu(hf, "activation_function", "gelu")
        if hf.get("scale_embedding", False):
            raise ConfigError("config.json scale_embedding=true (embeddings times sqrt(d_model)); clusterlm's "
                              "embeddings are unscaled")
        for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
            if hf.get(a) != hf.get(b):
                raise ConfigError(f"config.json {a}={hf.get(a)} and {b}={hf.get(b)} differ; clusterlm's two stacks "
                                  "share heads and MLP width")
        check_sizes(hf, ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                         "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"))
        return ModelConfig(arch="encdec", vocab_size=hf["vocab_size"], n_layers=hf["decoder_layers"],
                           n_enc_layers=hf["encoder_layers"], dim=hf["d_model"], n_heads=hf["decoder_attention_heads"],
                           ffn_dim=hf["decoder_ffn_dim"], max_seq_len=hf["max_position_embeddings"], pos="learned",
                           norm="layernorm", norm_eps=MBART_EPS, mlp="gelu", bias=True,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=0.0,
                           init_std=float(hf.get("init_std", 0.02)))
    raise ConfigError(f"model_type={mt!r} is not an encoder family model_type ({ROBERTA}, {MBART})")


# ---- state dicts ----------------------------------------------------------------------------------
_RB = "roberta_prelayernorm."
_ROBERTA_LAYER = {  # HF name under roberta_prelayernorm.encoder.layer.{i}. -> ours under layers.{i}.
    "attention.LayerNorm": "attention_norm", "attention.self.query": "attention.wq",
    "attention.self.key": "attention.wk", "attention.self.value": "attention.wv",
    "attention.output.dense": "attention.wo", "intermediate.LayerNorm": "ffn_norm",
    "intermediate.dense": "feed_forward.w1", "output.dense": "feed_forward.w2",
}
_ROBERTA_TOP = {"embeddings.LayerNorm": "emb_norm", "LayerNorm": "norm"}  # under roberta_prelayernorm.
_ROBERTA_HEAD = {"lm_head.dense": "mlm_head.dense", "lm_head.layer_norm": "mlm_head.norm"}
_MBART_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "out_proj": "wo"}
_MBART_LAYER = {  # HF name under model.{encoder,decoder}.layers.{i}. -> ours
    **{f"self_attn.{h}": f"attention.{o}" for h, o in _MBART_ATTN.items()},
    **{f"encoder_attn.{h}": f"cross_attention.{o}" for h, o in _MBART_ATTN.items()},
    "self_attn_layer_norm": "attention_norm", "encoder_attn_layer_norm": "cross_norm",
    "fc1": "feed_forward.w1", "fc2": "feed_forward.w2", "final_layer_norm": "ffn_norm",
}
_MBART_STACK = {"layernorm_embedding": "emb_norm", "layer_norm": "norm"}  # under model.{encoder,decoder}.


def _pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(HF module name, our module name) of every Linear and LayerNorm (each has .weight and .bias in HF)."""
    if cfg.arch == "encoder":
        out = [(f"{_RB}{h}", o) for h, o in _ROBERTA_TOP.items()] + list(_ROBERTA_HEAD.items())
        for i in range(cfg.n_layers):
            out += [(f"{_RB}encoder.layer.{i}.{h}", f"layers.{i}.{o}") for h, o in _ROBERTA_LAYER.items()]
        return out
    out = []
    for hf_stack, ours, n in (("encoder", "encoder.", cfg.enc_layers), ("decoder", "", cfg.n_layers)):
        out += [(f"model.{hf_stack}.{h}", f"{ours}{o}") for h, o in _MBART_STACK.items()]
        for i in range(n):
            out += [(f"model.{hf_stack}.layers.{i}.{h}", f"{ours}layers.{i}.{o}") for h, o in _MBART_LAYER.items()
                    if hf_stack == "decoder" or "encoder_attn" not in h]
    return out


def _take(state: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{where}: weight {name!r} is missing")
    return state.pop(name)


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, pad_id: int | None) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict from ours; biases our config leaves out are written as zeros. Tied
    embedding/output weights are written once (transformers ties them on load)."""
    kind = check_exportable(cfg)
    D, V = cfg.dim, cfg.padded_vocab_size

    def get(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name in state:
            return state[name]
        if shape is not None:  # a bias our config leaves out
            return torch.zeros(shape)
        raise CheckpointError(f"checkpoint weight {name!r} is missing")

    def positions(table: torch.Tensor, offset: int) -> torch.Tensor:
        return torch.cat([torch.zeros(offset, D, dtype=table.dtype), table])  # rows below the offset unused

    out: dict[str, torch.Tensor] = {}
    for hf_n, ours in _pairs(cfg):
        w = get(f"{ours}.weight")
        out[f"{hf_n}.weight"] = w
        out[f"{hf_n}.bias"] = get(f"{ours}.bias", (w.shape[0],))
    if kind == ROBERTA:
        out[f"{_RB}embeddings.word_embeddings.weight"] = get("tok_embeddings.weight")
        out[f"{_RB}embeddings.position_embeddings.weight"] = positions(get("pos_embeddings.weight"),
                                                                      roberta_pad_id(cfg, pad_id) + 1)
        out[f"{_RB}embeddings.token_type_embeddings.weight"] = torch.zeros(1, D)
        # transformers ties lm_head.decoder.bias to lm_head.bias only with tied embeddings: write both
        out["lm_head.bias"] = get("output.bias", (V,))
        out["lm_head.decoder.bias"] = out["lm_head.bias"].clone()  # its own storage: safetensors refuses aliases
        if not cfg.tie_embeddings:
            out["lm_head.decoder.weight"] = get("output.weight")
    else:
        out["model.shared.weight"] = get("tok_embeddings.weight")
        out["model.encoder.embed_positions.weight"] = positions(get("encoder.pos_embeddings.weight"), MBART_POS_OFFSET)
        out["model.decoder.embed_positions.weight"] = positions(get("pos_embeddings.weight"), MBART_POS_OFFSET)
        out["final_logits_bias"] = torch.zeros(1, V)
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = get("output.weight")
            # transformers (5.x) ties each stack's embed_tokens to model.shared only with tied embeddings:
            # untied, the stacks read their own tables, which must be written (else randomly initialized)
            for stack in ("encoder", "decoder"):
                out[f"model.{stack}.embed_tokens.weight"] = out["model.shared.weight"].clone()  # no aliases
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def check_position_rows(hf_state: dict[str, torch.Tensor], hf: dict[str, Any], where: str) -> None:
    """A RoBERTa position table must have config.json's max_position_embeddings rows: hf_to_state finds
    row pad_token_id + 1 as (its rows - max_seq_len), so a table of another size would shift every
    position (transformers refuses such a folder as a size mismatch)."""
    if hf.get("model_type") != ROBERTA:
        return
    name = f"{_RB}embeddings.position_embeddings.weight"
    table = hf_state.get(name, hf_state.get(f"module.{name}"))
    rows = hf.get("max_position_embeddings")
    if table is not None and table.dim() == 2 and table.shape[0] != rows:
        raise CheckpointError(f"{where}: weight {name} has {table.shape[0]} rows but config.json describes "
                              f"max_position_embeddings={rows}; the weights and config.json are from different models")


def hf_to_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, kind: str,
                where: str = "Hugging Face weights") -> dict[str, torch.Tensor]:
    """Our state dict (float32, contiguous) from a RobertaPreLayerNormForMaskedLM (`kind`
    roberta-prelayernorm) or MBartForConditionalGeneration (mbart) state dict; `cfg` from hf_to_config."""
    if kind != {"encoder": ROBERTA, "encdec": MBART}.get(cfg.arch):
        raise ConfigError(f"weights of model_type {kind!r} do not fit model.arch={cfg.arch!r}")
    st = {k.removeprefix("module."): v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    for hf_n, ours in _pairs(cfg):
        out[f"{ours}.weight"] = _take(st, f"{hf_n}.weight", where)
        out[f"{ours}.bias"] = _take(st, f"{hf_n}.bias", where)
    T = cfg.max_seq_len
    if cfg.arch == "encoder":
        out["tok_embeddings.weight"] = _take(st, f"{_RB}embeddings.word_embeddings.weight", where)
        pos = _take(st, f"{_RB}embeddings.position_embeddings.weight", where)
        offset = pos.shape[0] - T  # pad_token_id + 1 (hf_to_config: max_seq_len = rows - pad_token_id - 1)
        tte = _take(st, f"{_RB}embeddings.token_type_embeddings.weight", where)
        if tte.shape[0] > 1:
            log.warning("%s: type_vocab_size=%d; clusterlm has no segment ids: token type 0 (every token's by "
                        "default) is kept, folded into the position table", where, tte.shape[0])
        out["pos_embeddings.weight"] = pos[offset:offset + T] + tte[0]  # (T, D): every token gets type 0
        # forward adds lm_head.decoder.bias, which transformers ties to lm_head.bias only with tied embeddings
        bias = _take(st, "lm_head.bias", where)
        out["output.bias"] = st.pop("lm_head.decoder.bias", bias)
        head = st.pop("lm_head.decoder.weight", None)
        for k in (f"{_RB}embeddings.position_ids", f"{_RB}embeddings.token_type_ids"):
            st.pop(k, None)  # buffers of older transformers versions
    else:
        shared = _take(st, "model.shared.weight", where)
        for stack, ours in (("encoder", "encoder."), ("decoder", "")):
            out[f"{ours}pos_embeddings.weight"] = _take(st, f"model.{stack}.embed_positions.weight", where)[
                MBART_POS_OFFSET:MBART_POS_OFFSET + T]
        # the tables the stacks read: model.shared when tied (transformers ties them to it on load; 4.x
        # always), else each stack's own embed_tokens where the file has it (transformers 5.x, untied)
        own = {stack: t for stack in ("encoder", "decoder")
               if (t := st.pop(f"model.{stack}.embed_tokens.weight", None)) is not None}
        tables = {"shared": shared} if cfg.tie_embeddings or not own else own
        if cfg.tie_embeddings:
            tables.update(own)
        first = next(iter(tables.values()))
        differ = [name for name, t in tables.items() if t.shape != first.shape or not torch.equal(t, first)]
        if differ:
            raise CheckpointError(f"{where}: the token embeddings of {' and '.join(tables)} differ (tie_word_embeddings="
                                  f"{str(cfg.tie_embeddings).lower()}); clusterlm's encdec reads one table in both "
                                  "stacks (and, tied, in lm_head)")
        out["tok_embeddings.weight"] = first
        bias = st.pop("final_logits_bias", None)
        if bias is not None and bias.abs().max() > 0:
            raise CheckpointError(f"{where}: final_logits_bias is not zero; clusterlm's encdec output layer has no bias")
        head = st.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise CheckpointError(f"{where}: the output weights are missing and tie_word_embeddings is false")
        out["output.weight"] = head
    if st:
        raise CheckpointError(f"{where}: unexpected weights {sorted(st)[:5]} (of {len(st)}) for a {kind} "
                              f"model with {cfg.n_layers} layers")
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}
