"""Hugging Face <-> clusterlm: configs, weight names and layouts for the GPT-2 and Llama families.

    cfg = hf_to_config(json.load(open("gpt2/config.json")))
    state = hf_to_state(hf_state_dict, cfg, "gpt2")      # and back: state_to_hf(state, cfg)

Reading and writing Hugging Face folders (config.json, safetensors, pickles, tokenizer files) and
the `clusterlm convert` / `clusterlm export` commands are in clusterlm/interop/.

GPT-2 (`model_type = "gpt2"`): HF's Conv1D stores weights as (in, out), so every matrix is
transposed; `c_attn` is wq|wk|wv concatenated on the output axis and is split; lm_head is tied to
wte; positions are a learned table; the MLP is gelu_new (our GELU tanh); LayerNorm has a bias.
Llama (`model_type = "llama"`): names map one to one. HF Llama's rotary is `rotate_half`, which
is the convention of our Transformer, so wq/wk copy without any permutation. GQA via
num_key_value_heads; RMSNorm; tied or untied output. Rope scaling (Llama 3.1+) is refused: our
rotary tables have no scaling.

The encoder families (arch "encoder" <-> RobertaPreLayerNormForMaskedLM, "encdec" <->
MBartForConditionalGeneration) are in models/convert_encdec.py; the functions here dispatch to it.

Conversion of config dicts and state dicts only: no files, no device, no training here (models/
stays math-only).
"""

from __future__ import annotations

from typing import Any

import torch

from clusterlm.errors import CheckpointError, ConfigError
from clusterlm.models import convert_encdec
from clusterlm.models.config import ModelConfig
from clusterlm.models.convert_encdec import check_sizes

ENCODER_FAMILIES = (convert_encdec.ROBERTA, convert_encdec.MBART)
SUPPORTED = ("gpt2", "llama", *ENCODER_FAMILIES)


# ---- configs --------------------------------------------------------------------------------------
def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from a transformers 4.x (top-level) or 5.x (`rope_parameters`) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None  # {"rope_type": "default"} is transformers' spelling of no scaling
    rope_type = (params.get("rope_type") or params.get("type") or "default") if params else "default"
    if scaling or rope_type != "default":
        raise ConfigError(f"config.json uses rope scaling ({scaling or params}); clusterlm's rotary tables have "
                          "no scaling (supported: rope_type 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        return 10000.0  # transformers' default
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"config.json rope_theta={theta!r} must be a number > 0")
    return float(theta)


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json dict (gpt2, llama, roberta-prelayernorm or mbart)."""
    mt = hf.get("model_type")
    if mt in ENCODER_FAMILIES:
        return convert_encdec.hf_to_config(hf)
    if mt == "gpt2":
        check_sizes(hf, ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), ("n_inner",))
    elif mt == "llama":
        check_sizes(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "max_position_embeddings"), ("num_key_value_heads", "head_dim"))
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"config.json activation_function={act!r}; clusterlm's GPT-2 MLP is gelu_new (tanh)")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise ConfigError(f"config.json {key}={hf[key]!r} is not supported (expected {want!r})")
        D = hf["n_embd"]
        return ModelConfig(arch="transformer", vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], dim=D,
                           n_heads=hf["n_head"], ffn_dim=hf.get("n_inner") or 4 * D,
                           max_seq_len=hf["n_positions"], pos="learned", norm="layernorm",
                           norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu", bias=True,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=0.0,
                           init_std=float(hf.get("initializer_range", 0.02)))
    if mt == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}; clusterlm's SwiGLU uses silu")
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ConfigError(f"config.json attention_bias={attn_bias} and mlp_bias={mlp_bias} differ; clusterlm has "
                              "one bias flag for every linear layer")
        D, H = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim")  # may differ from D / H (e.g. after head pruning)
        return ModelConfig(arch="transformer", vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], dim=D,
                           n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H,
                           head_size=head_dim if head_dim not in (None, D // H) else None,
                           ffn_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"], pos="rope",
                           rope_theta=_rope_theta(hf), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                           mlp="swiglu", bias=attn_bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           dropout=0.0, init_std=float(hf.get("initializer_range", 0.02)))
    raise ConfigError(f"config.json model_type={mt!r} (architectures {hf.get('architectures')}) is not supported; "
                      f"clusterlm converts {', '.join(SUPPORTED)}")


def family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama', 'roberta-prelayernorm' or 'mbart': which Hugging Face model_type expresses `cfg`
    exactly (ConfigError naming what none can express)."""
    if cfg.arch in ("encoder", "encdec"):
        return convert_encdec.check_exportable(cfg)
    if cfg.arch != "transformer":
        raise ConfigError(f"model.arch={cfg.arch!r} has no Hugging Face export; the attention families "
                          "(transformer, encoder, encdec) export")
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        if cfg.head_dim * cfg.n_heads != cfg.dim:
            raise ConfigError(f"GPT-2 needs n_heads * head_dim = dim; this model has {cfg.n_heads} x {cfg.head_dim} "
                              f"!= {cfg.dim} (structurally pruned heads): no Hugging Face GPT-2 equivalent")
        if cfg.kv_heads != cfg.n_heads:  # c_attn holds three (D, D) blocks: one key/value head per query head
            raise ConfigError(f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) has no Hugging Face GPT-2 "
                              f"equivalent: GPT-2 has one key/value head per query head (n_kv_heads = n_heads = "
                              f"{cfg.n_heads}); Llama (rope, rmsnorm, swiglu) exports grouped-query attention")
        return "gpt2"  # bias=False exports as zero biases: same function
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "llama"
    raise ConfigError(f"model with pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} has no Hugging Face architecture; "
                      "exportable: GPT-2 (learned, layernorm, gelu) or Llama (rope, rmsnorm, swiglu)")


def config_to_hf(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
    """A Hugging Face config.json dict for `cfg` (vocab_size = the padded vocabulary: all logits rows)."""
    if family(cfg) in ENCODER_FAMILIES:
        return convert_encdec.config_to_hf(cfg, bos_id, eos_id, pad_id)
    V = cfg.padded_vocab_size
    common = {"vocab_size": V, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
              "eos_token_id": eos_id, "initializer_range": cfg.init_std, "dtype": "float32"}
    if family(cfg) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.dim,
                "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.hidden_dim,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
            "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0, **common}


# ---- state dicts ----------------------------------------------------------------------------------
_LLAMA_LAYER = {  # HF name under model.layers.{i}. -> ours under layers.{i}.
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def _take(state: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{where}: weight {name!r} is missing")
    return state.pop(name)


def hf_to_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, kind: str,
                where: str = "Hugging Face weights") -> dict[str, torch.Tensor]:
    """Our state dict (float32, contiguous) from a Hugging Face state dict of `kind` (a model_type of SUPPORTED)."""
    if kind in ENCODER_FAMILIES:
        return convert_encdec.hf_to_state(hf_state, cfg, kind, where)
    st = {k.removeprefix("module."): v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    D = cfg.dim
    if kind == "gpt2":
        # checkpoints saved from GPT2Model lack the "transformer." prefix
        st = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in st.items()}
        out["tok_embeddings.weight"] = _take(st, "transformer.wte.weight", where)
        out["pos_embeddings.weight"] = _take(st, "transformer.wpe.weight", where)
        for i in range(cfg.n_layers):
            p, q = f"transformer.h.{i}.", f"layers.{i}."
            for hf_n, ours in (("ln_1", "attention_norm"), ("ln_2", "ffn_norm")):
                out[f"{q}{ours}.weight"] = _take(st, f"{p}{hf_n}.weight", where)
                out[f"{q}{ours}.bias"] = _take(st, f"{p}{hf_n}.bias", where)
            w = _take(st, f"{p}attn.c_attn.weight", where).t()  # Conv1D (D, 3D) -> Linear (3D, D)
            b = _take(st, f"{p}attn.c_attn.bias", where)
            for j, name in enumerate(("wq", "wk", "wv")):
                out[f"{q}attention.{name}.weight"] = w[j * D:(j + 1) * D]
                out[f"{q}attention.{name}.bias"] = b[j * D:(j + 1) * D]
            for hf_n, ours in (("attn.c_proj", "attention.wo"), ("mlp.c_fc", "feed_forward.w1"),
                               ("mlp.c_proj", "feed_forward.w2")):
                out[f"{q}{ours}.weight"] = _take(st, f"{p}{hf_n}.weight", where).t()
                out[f"{q}{ours}.bias"] = _take(st, f"{p}{hf_n}.bias", where)
            st.pop(f"{p}attn.bias", None)  # causal-mask buffers of older transformers versions
            st.pop(f"{p}attn.masked_bias", None)
        out["norm.weight"] = _take(st, "transformer.ln_f.weight", where)
        out["norm.bias"] = _take(st, "transformer.ln_f.bias", where)
        lm_head = st.pop("lm_head.weight", None)
    elif kind == "llama":
        out["tok_embeddings.weight"] = _take(st, "model.embed_tokens.weight", where)
        for i in range(cfg.n_layers):
            for hf_n, ours in _LLAMA_LAYER.items():
                for suffix in ("weight", "bias"):
                    name = f"model.layers.{i}.{hf_n}.{suffix}"
                    if suffix == "weight" or (cfg.bias and "layernorm" not in hf_n):
                        out[f"layers.{i}.{ours}.{suffix}"] = _take(st, name, where)
            st.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
        out["norm.weight"] = _take(st, "model.norm.weight", where)
        st.pop("model.rotary_emb.inv_freq", None)
        lm_head = st.pop("lm_head.weight", None)
    else:
        raise ConfigError(f"unknown family {kind!r}; expected one of {', '.join(SUPPORTED)}")
    if not cfg.tie_embeddings:
        if lm_head is None:
            raise CheckpointError(f"{where}: lm_head.weight is missing and tie_word_embeddings is false")
        out["output.weight"] = lm_head
    if st:
        raise CheckpointError(f"{where}: unexpected weights {sorted(st)[:5]} (of {len(st)}) for a {kind} model "
                              f"with {cfg.n_layers} layers")
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict from ours (tied lm_head left out: transformers ties it on load;
    biases our config leaves out are exported as zeros for GPT-2, which always has them). `pad_id`:
    the tokenizer's padding id (RoBERTa's positions count from it)."""
    kind = family(cfg)
    if kind in ENCODER_FAMILIES:
        return convert_encdec.state_to_hf(state, cfg, pad_id)
    st = dict(state)
    out: dict[str, torch.Tensor] = {}
    D = cfg.dim

    def get(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name in st:
            return st[name]
        if shape is not None:  # a bias our config leaves out
            return torch.zeros(shape)
        raise CheckpointError(f"checkpoint weight {name!r} is missing")

    if kind == "gpt2":
        out["transformer.wte.weight"] = get("tok_embeddings.weight")
        out["transformer.wpe.weight"] = get("pos_embeddings.weight")
        for i in range(cfg.n_layers):
            p, q = f"transformer.h.{i}.", f"layers.{i}."
            for hf_n, ours in (("ln_1", "attention_norm"), ("ln_2", "ffn_norm")):
                out[f"{p}{hf_n}.weight"] = get(f"{q}{ours}.weight")
                out[f"{p}{hf_n}.bias"] = get(f"{q}{ours}.bias", (D,))
            out[f"{p}attn.c_attn.weight"] = torch.cat(
                [get(f"{q}attention.{n}.weight") for n in ("wq", "wk", "wv")], 0).t()  # (D, 3D) Conv1D
            out[f"{p}attn.c_attn.bias"] = torch.cat([get(f"{q}attention.{n}.bias", (D,)) for n in ("wq", "wk", "wv")])
            for hf_n, ours in (("attn.c_proj", "attention.wo"), ("mlp.c_fc", "feed_forward.w1"),
                               ("mlp.c_proj", "feed_forward.w2")):
                w = get(f"{q}{ours}.weight")
                out[f"{p}{hf_n}.weight"] = w.t()
                out[f"{p}{hf_n}.bias"] = get(f"{q}{ours}.bias", (w.shape[0],))
        out["transformer.ln_f.weight"] = get("norm.weight")
        out["transformer.ln_f.bias"] = get("norm.bias", (D,))
    else:
        out["model.embed_tokens.weight"] = get("tok_embeddings.weight")
        for i in range(cfg.n_layers):
            for hf_n, ours in _LLAMA_LAYER.items():
                out[f"model.layers.{i}.{hf_n}.weight"] = get(f"layers.{i}.{ours}.weight")
                if cfg.bias and "layernorm" not in hf_n:
                    out[f"model.layers.{i}.{hf_n}.bias"] = get(f"layers.{i}.{ours}.bias")
        out["model.norm.weight"] = get("norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("output.weight")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}
