"""Generation engine: cached decoding against a naive full-recompute loop, eos, context limits.

Run: .venv/bin/python -m pytest -q tests/model/test_engine.py
"""

from __future__ import annotations

import pytest
import torch

from clusterlm.generate.engine import complete, generate
from clusterlm.generate.sampling import sample_next
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig

_T = dict(vocab_size=37, vocab_multiple=8, n_layers=2, dim=32, n_heads=4, max_seq_len=24, ffn_multiple=16)
MODELS: dict[str, ModelConfig] = {
    "gpt": ModelConfig(**_T, pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": ModelConfig(**_T, pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, tie_embeddings=False),
    "lstm": ModelConfig(arch="lstm", vocab_size=37, vocab_multiple=8, n_layers=2, dim=32, pos="none"),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    model = build_model(MODELS[name])
    model.init_weights(seed)
    return model.eval()


@torch.no_grad()
def naive(model: torch.nn.Module, prompt: list[list[int]], n: int, *, temperature: float = 0.0,
          top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> list[list[int]]:
    """Reference: re-run the full forward over the whole sequence for every new token, no cache;
    logits are restricted to the real vocabulary (37) as the engine is expected to do."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    idx = torch.tensor(prompt)
    for _ in range(n):
        logits = model(idx)[:, -1, :37]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
    return idx[:, len(prompt[0]):].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_naive_loop(name: str) -> None:
    """Greedy cached generation of 12 tokens for a batch of 3 prompts equals the naive loop that
    recomputes the full forward each step and takes argmax; every sequence ends with "length"."""
    model = make(name)
    prompts = torch.randint(0, 37, (3, 6), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, reasons = complete(model, prompts, max_new_tokens=12, temperature=0.0)
    assert tokens == naive(model, prompts, 12)
    assert reasons == ["length"] * 3


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_seeded_sampling_equals_naive_and_repeats(name: str) -> None:
    """Seeded sampling (temperature 0.9, top_k 10, top_p 0.95) equals the naive loop drawing with a
    generator of the same seed, and repeating the call gives the same tokens."""
    model = make(name)
    prompts = [[1, 2, 3, 4]] * 4  # num_samples = 4 by repeating the prompt
    kw = dict(temperature=0.9, top_k=10, top_p=0.95, seed=123)
    a, _ = complete(model, prompts, max_new_tokens=10, **kw)
    b, _ = complete(model, prompts, max_new_tokens=10, **kw)
    assert a == b == naive(model, prompts, 10, **kw)
    assert len({tuple(t) for t in a}) > 1  # the four samples are not all the same


def test_padding_ids_never_sampled() -> None:
    """With the output bias of the 3 padding ids (37..39, from vocab_multiple=8) at +1e4, greedy
    generation still yields only real ids, equal to the naive loop over the first 37 logits."""
    cfg = ModelConfig(arch="lstm", vocab_size=37, vocab_multiple=8, n_layers=1, dim=16, pos="none", bias=True)
    model = build_model(cfg)
    model.init_weights(0)
    with torch.no_grad():
        model.output.bias[37:] = 1e4
    tokens, _ = complete(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.0)
    assert tokens == naive(model, [[1, 2, 3]], 8) and max(tokens[0]) < 37
    tokens, _ = complete(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=0)
    assert max(tokens[0]) < 37


def test_stream_yields_per_step_and_eos_stops() -> None:
    """Streaming yields one list per step with a token per sequence; a sequence that samples eos_id
    yields None from then on, keeps only its tokens before eos (reference: the naive greedy
    continuation cut at its first eos) and finishes with "stop"; the other runs to "length"."""
    model = make("gpt")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    ref = naive(model, prompts, 10)
    eos = ref[0][3]  # row 0 stops at step 4 (or earlier if this token came before)
    cut = [r[: r.index(eos)] if eos in r else r for r in ref]
    stream = generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_id=eos)
    steps = list(stream)
    assert all(len(s) == 2 for s in steps)
    assert [s[0] for s in steps if s[0] is not None] == cut[0]
    assert steps[len(cut[0])][0] is None
    assert stream.tokens == cut
    assert stream.finish_reasons[0] == "stop"
    assert stream.finish_reasons[1] == ("stop" if eos in ref[1] else "length")
    assert stream.done


def test_all_sequences_stop_at_eos() -> None:
    """When every sequence samples eos the stream ends early with all reasons "stop"."""
    model = make("gpt")
    prompt = [[3, 4, 5]] * 2
    eos = naive(model, prompt, 1)[0][0]
    tokens, reasons = complete(model, prompt, max_new_tokens=20, temperature=0.0, eos_id=eos)
    assert tokens == [[], []] and reasons == ["stop", "stop"]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_stops_at_context_length(name: str) -> None:
    """A 20-token prompt on a max_seq_len=24 Transformer yields 24 - 20 + 1 = 5 tokens (the last is
    never fed back), equal to the naive loop, with reason "length" set as the 5th token is yielded;
    a 24-token prompt yields 1."""
    model = make(name)
    prompt = [list(range(20))]
    tokens, reasons = complete(model, prompt, max_new_tokens=50, temperature=0.0)
    assert tokens == naive(model, prompt, 5) and reasons == ["length"]
    stream = generate(model, prompt, max_new_tokens=50, temperature=0.0)
    for _ in range(5):
        next(stream)
    assert stream.done and stream.finish_reasons == ["length"]  # known at once, without another next()
    tokens, reasons = complete(model, [list(range(24))], max_new_tokens=50, temperature=0.0)
    assert len(tokens[0]) == 1 and reasons == ["length"]


def test_rnn_has_no_context_limit() -> None:
    """An LSTM generates all 40 requested tokens after a 30-token prompt (no positional table)."""
    tokens, reasons = complete(make("lstm"), [list(range(30))], max_new_tokens=40, temperature=0.0)
    assert len(tokens[0]) == 40 and reasons == ["length"]


def test_mode_and_grad_state_restored() -> None:
    """Generating from a model in training mode leaves it in training mode, with no grads created."""
    model = make("gpt").train()
    complete(model, [1, 2, 3], max_new_tokens=3)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_eval_model_is_not_walked_per_step(monkeypatch) -> None:
    """A model already in eval mode is generated from without train()/eval() calls: each walks
    every module (0.3 ms per call for gpt2-124m; two per token cost the Shakespeare model 30% of
    its decode speed). A model in training mode is switched per step and restored (test above)."""
    model = make("gpt").eval()
    calls = []
    monkeypatch.setattr(model, "train", lambda mode=True: calls.append(mode) or model)
    tokens, _ = complete(model, [1, 2, 3], max_new_tokens=5, temperature=0.0)
    assert len(tokens[0]) == 5 and calls == []


def test_zero_new_tokens() -> None:
    """max_new_tokens=0 yields nothing and finishes with "length"."""
    assert complete(make("gpt"), [1, 2], max_new_tokens=0) == ([[]], ["length"])


@pytest.mark.parametrize("prompt, kw, match", [
    ([], {}, "prompt is empty"),
    ([[1, 2], [3]], {}, r"equal lengths, got lengths \[1, 2\]"),
    ([1, 37], {}, r"token id 37; ids must be integers in \[0, 37\)"),
    ([1, -1], {}, "token id -1"),
    (list(range(25)), {}, "prompt of 25 tokens exceeds the model's context of 24"),
    ([1], dict(max_new_tokens=-1), "max_new_tokens=-1"),
    ([1], dict(top_p=0.0), "top_p=0.0"),
])
def test_bad_requests_raise(prompt: list, kw: dict, match: str) -> None:
    """Each bad request raises ValueError naming the value and what would be valid."""
    with pytest.raises(ValueError, match=match):
        generate(make("gpt"), prompt, **({"max_new_tokens": 3} | kw))


def test_sliding_window_continues_past_context_and_matches_within_it():
    """sliding_window=True: inside the context the output equals the plain engine's; past it, generation
    continues to max_new_tokens, and right after a restart the next token equals greedy over a full
    forward of the last max_seq_len // 2 tokens."""
    import torch

    from clusterlm.generate.engine import complete, generate
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=50, n_layers=2, dim=32, n_heads=4, max_seq_len=16)
    model = build_model(cfg)
    model.init_weights(3)
    prompt = [1, 2, 3, 4]
    short_plain, _ = complete(model, prompt, max_new_tokens=10, temperature=0.0)
    short_slide, _ = complete(model, prompt, max_new_tokens=10, temperature=0.0, sliding_window=True)
    assert short_plain == short_slide
    gen = generate(model, prompt, max_new_tokens=60, temperature=0.0, sliding_window=True)
    steps = list(gen)
    assert len(gen.tokens[0]) == 60 and gen.finish_reasons == ["length"]
    history = prompt + gen.tokens[0]
    # the 13th new token is the first after the first restart (4 prompt + 12 fed -> cache full at 16)
    with torch.no_grad():
        first_restart = len(prompt) + 13 - 1  # index in history of the token sampled after the restart
        window = history[first_restart - 8:first_restart]
        expect = int(model(torch.tensor([window]))[0, -1].argmax())
    assert history[first_restart] == expect
    assert len(steps) == 60


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_greedy_equals_naive_loop(method: str) -> None:
    """A model whose Linears are int8/int4 modules (clusterlm.optimize.quantize) decodes through the
    cache to the same greedy tokens as full recomputation of that same quantized model."""
    from clusterlm.optimize.quantize import quantize_model

    cfg = ModelConfig(vocab_size=37, n_layers=2, dim=64, n_heads=4, max_seq_len=24, bias=True)
    model = build_model(cfg)
    model.init_weights(0)
    quantize_model(model.eval(), method, group_size=32)
    prompt = [[3, 1, 4], [1, 5, 9]]
    tokens, _ = complete(model, prompt, max_new_tokens=10, temperature=0.0)
    assert tokens == naive(model, prompt, 10)


def _skip_without_compile() -> None:
    from clusterlm.generate.engine import compile_unavailable

    problem = compile_unavailable(torch.device("cpu"))
    if problem is not None:
        pytest.skip(problem)


@pytest.mark.slow
def test_compiled_decode_equals_eager() -> None:
    """generate(compile=True) (torch.compile'd decode step, dynamic shapes) gives the same greedy
    tokens as the eager engine, for two calls of different prompt/output lengths on one model."""
    _skip_without_compile()
    model = make("llama")
    for prompt, n in (([[1, 2, 3]] * 2, 12), ([[4, 5, 6, 7]] * 2, 16)):
        want, _ = complete(model, prompt, max_new_tokens=n, temperature=0.0)
        got, _ = complete(model, prompt, max_new_tokens=n, temperature=0.0, compile=True)
        assert got == want


def test_compile_with_bf16_packing_is_refused() -> None:
    """compile=True with pack='bf16' on the CPU: one ValueError naming both (the compiled step would
    compute in fp32: inductor cannot lower oneDNN's packed weights); nothing is packed."""
    from clusterlm.optimize.packed import PackedLinear

    _skip_without_compile()
    model = make("llama")
    with pytest.raises(ValueError, match=r"compile=True with pack='bf16'.*fp32"):
        complete(model, [[1, 2, 3]], max_new_tokens=2, temperature=0.0, compile=True, pack="bf16")
    assert not any(type(m) is PackedLinear for m in model.modules())


@pytest.mark.slow
def test_compiled_one_row_reduction_equals_eager(monkeypatch) -> None:
    """The compiled one-row step with every Linear as inductor's multiply-and-sum (reduce_linear,
    forced on whatever this CPU measured) gives the eager engine's greedy tokens for batch 1, and a
    batch-2 call of the same compiled engine runs eager (packed); the reduction is F.linear to 1e-5."""
    import torch.nn.functional as F

    import clusterlm.generate.engine as engine_mod
    from clusterlm.optimize.packed import PackedLinear, reduce_linear

    _skip_without_compile()
    x, w, b = torch.randn(1, 1, 48), torch.randn(40, 48), torch.randn(40)
    kernel = torch.compile(reduce_linear, dynamic=False)
    torch.testing.assert_close(kernel(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    model = make("gpt")
    want1, _ = complete(model, [[1, 2, 3]], max_new_tokens=12, temperature=0.0, pack="fp32")
    want2, _ = complete(model, [[4, 5, 6]] * 2, max_new_tokens=8, temperature=0.0, pack="fp32")
    monkeypatch.setattr(engine_mod, "compiled_reduction_wins", lambda threads: True)
    got1, _ = complete(model, [[1, 2, 3]], max_new_tokens=12, temperature=0.0, compile=True, pack="fp32")
    got2, _ = complete(model, [[4, 5, 6]] * 2, max_new_tokens=8, temperature=0.0, compile=True, pack="fp32")
    assert got1 == want1 and got2 == want2
    linears = [m for m in model.modules() if type(m) is PackedLinear]
    assert linears and all(m.reduce_when_compiled for m in linears)


@pytest.mark.slow
def test_cli_generate_compile_equals_eager(tmp_path) -> None:
    """`clusterlm generate --compile` prints the same greedy text as without it (a tiny Llama
    checkpoint with a byte tokenizer, 30 new tokens)."""
    import io

    from clusterlm.generate.cli import generate_main
    from tests.helpers import byte_llama_checkpoint

    _skip_without_compile()
    run, _ = byte_llama_checkpoint(tmp_path, n_layers=2, n_kv_heads=2)
    args = [str(run), "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "30", "--device", "cpu"]
    eager, compiled = io.StringIO(), io.StringIO()
    assert generate_main(args, out=eager) == 0
    assert generate_main(args + ["--compile"], out=compiled) == 0
    assert compiled.getvalue() == eager.getvalue()
    assert eager.getvalue().startswith("ab") and len(eager.getvalue()) > len("ab\n")  # something was generated


def test_compile_without_compiler_is_a_clear_error() -> None:
    """compile=True where torch.compile cannot run (inductor's C++ compiler search pointed at a path
    that does not exist) raises ValueError naming the missing compiler and the eager alternative,
    before any compilation starts."""
    import torch._inductor.config as inductor_config

    # inductor's own patch(), not monkeypatch: monkeypatch restores a class attribute it did not find in
    # the class __dict__ by deleting it, which removed cpp.cxx for every later compile in the session
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}), \
            pytest.raises(ValueError, match=r"needs a C\+\+ compiler.*/nonexistent/g\+\+.*run without compile"):
        generate(make("gpt"), [1, 2], max_new_tokens=3, compile=True)
    assert inductor_config.cpp.cxx != (None, "/nonexistent/g++")


def test_cli_compile_without_compiler_is_refused_before_anything_is_printed(tmp_path) -> None:
    """`generate --prompt ab --compile` and `chat --compile` where torch.compile cannot run: the
    ValueError (exit 2 from the CLI) comes before any output; generate printed the prompt, chat its
    'model> ', and the error followed on the same line."""
    import io

    import torch._inductor.config as inductor_config

    from clusterlm.generate.cli import chat_main, generate_main
    from tests.helpers import byte_llama_checkpoint

    byte_llama_checkpoint(tmp_path, n_layers=1, max_seq_len=32)
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        out = io.StringIO()
        with pytest.raises(ValueError, match=r"--compile: .*needs a C\+\+ compiler.*leave --compile out"):
            generate_main([str(tmp_path / "run"), "--prompt", "ab", "--compile", "--device", "cpu"], out=out)
        assert out.getvalue() == ""
        out = io.StringIO()
        with pytest.raises(ValueError, match=r"--compile: .*needs a C\+\+ compiler"):
            chat_main([str(tmp_path / "run"), "--compile", "--device", "cpu"], stdin=io.StringIO("hi\n"), out=out)
        assert out.getvalue() == ""
