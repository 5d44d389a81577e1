"""`clusterlm generate` and `clusterlm chat`: text in, streamed text out, from a checkpoint.

    clusterlm generate runs/shakespeare_char --prompt "ROMEO." --max-new-tokens 200 --temperature 0.8
    clusterlm generate runs/shakespeare_char --num-samples 3 --seed 1
    clusterlm generate runs/shakespeare_char --compile     # torch.compile the decode step
    clusterlm chat runs/shakespeare_char
    clusterlm generate runs/multi30k_enfr_encdec --src "A dog runs." --num-beams 4 --max-new-tokens 60

An encoder-decoder (arch "encdec") reads --src (or --prompt) with its encoder and prints the
decoder's output only (generate/seq2seq.py; greedy, sampling or beam search).

The prompt is preceded by EOS, the document separator the model saw in training, so generation
starts as a fresh document. Chat (and `generate --chat`, which sends --prompt as one user message)
renders the conversation with the checkpoint's own chat template (chat_template.jinja, written by
fine-tuning; docs/chat_templates.md) and stops at its end-of-turn token or EOS. A model without
one uses the plain template in `render_chat`: "User: ...\\n\\nAssistant: ..." turns, stopping at the
next "User:" line or EOS. The text helpers live in clusterlm.generate.text (shared with `serve`); this
module is the command line only.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import TextIO

from clusterlm.generate.text import chat_format, refuse_pack_for_encdec, stream_text

log = logging.getLogger(__name__)
DEFAULT_TEMPERATURE = 0.8
DEFAULT_MAX_NEW_TOKENS = 200


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, checkpoints folder or step folder")
    # None when not given: DEFAULT_MAX_NEW_TOKENS, or an encoder-decoder's max_seq_len if that is fewer
    # (its decoder has no more positions; a value given above it is a warning)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS} (an encoder-decoder: at most its model.max_seq_len)")
    # None when not given (then DEFAULT_TEMPERATURE), so that beam search can refuse one that was given
    p.add_argument("--temperature", type=float, default=None,
                   help=f"default {DEFAULT_TEMPERATURE}; 0 = greedy, and so is any value below 1e-6 "
                        "(sampling.GREEDY_TEMPERATURE)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="run the one-token decode step through torch.compile (compiled on first use: "
                        "seconds to a minute; needs a C++ compiler on CPU)")
    p.add_argument("--pack", default="auto", choices=["auto", "fp32", "bf16", "none"],
                   help="CPU weights: auto = fp32 packed for oneDNN (same precision), bf16 = bf16 packed (AMX; "
                        "~1e-2 relative logits error, docs/compression.md), none = as loaded")


def _pack(args) -> str | None:  # noqa: ANN001
    """--pack as generate() takes it: "auto", "fp32", "bf16", or None for none. bf16 is refused on a
    CPU without AVX512-BF16/AMX (its matmuls would be emulated: slower than fp32)."""
    if args.pack == "bf16":
        from clusterlm.optimize.packed import bf16_unavailable

        problem = bf16_unavailable()
        if problem:
            raise ValueError(f"--pack bf16: {problem}; use --pack auto (fp32 packed) or none")
    return None if args.pack == "none" else args.pack


def warn_unknown_chars(tokenizer, text: str, what: str) -> None:  # noqa: ANN001
    """A char tokenizer reads characters it never saw as <|unk|>: say so, with examples, instead of
    letting the model continue text it was not given (byte and BPE tokenizers encode any text)."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or not text:
        return
    for special in getattr(tokenizer, "added_tokens", ()):  # a chat token encodes as its own id, not its characters
        text = text.replace(special, "")
    unknown = sorted({c for c in text if tokenizer.encode(c) == [unk]})
    if unknown:
        shown = "".join(unknown[:10]) + ("..." if len(unknown) > 10 else "")
        log.warning("%d distinct character(s) of %s are not in the model's character vocabulary and are read as "
                    "<|unk|>: %r", len(unknown), what, shown)


def _greedy_notes(args) -> None:  # noqa: ANN001
    """Options greedy decoding makes pointless, noted once every refusal has passed (a note, then the text)."""
    from clusterlm.generate.sampling import GREEDY_TEMPERATURE, greedy_seed_note

    note = greedy_seed_note(args.seed, args.temperature)
    if note:
        log.warning("%s", note)
    samples = getattr(args, "num_samples", 1)
    if samples > 1 and getattr(args, "num_beams", 1) == 1 and args.temperature < GREEDY_TEMPERATURE:
        log.warning("--num-samples=%d with greedy decoding (--temperature %g) prints the same text %d times; "
                    "give --temperature > 0 to sample different ones", samples, args.temperature, samples)


def warn_encdec_limits(loaded, source: str, max_new_tokens: int) -> None:  # noqa: ANN001
    """An encoder-decoder reads at most max_seq_len source tokens (a longer source is cut to its first
    max_seq_len - 1 + EOS) and writes at most max_seq_len target tokens: say so when the source or
    --max-new-tokens is past that, instead of cutting them without a word."""
    from clusterlm.data.seq2seq import source_ids

    L = loaded.config.model.max_seq_len
    n = len(source_ids(loaded.tokenizer, source))
    if n > L:
        log.warning("the source is %d tokens with EOS but the encoder's context is %d (model.max_seq_len): only its "
                    "first %d tokens and EOS are read", n, L, L - 1)
    if max_new_tokens > L:
        log.warning("--max-new-tokens=%d is more than the decoder's %d positions (model.max_seq_len): the output "
                    "stops at %d tokens", max_new_tokens, L, L)


def _load(args):  # noqa: ANN001, ANN202
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.sampling import check_sampling_args
    from clusterlm.device import resolve_device

    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE
    check_sampling_args(args.temperature, args.top_k, args.top_p, as_options=True)
    _pack(args)  # refused here, before anything is printed (a sample's header was left on stdout)
    # torch.Generator.manual_seed takes a signed or unsigned 64-bit integer; sample i uses seed + i
    if args.seed is not None and not -(2**63) <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed={args.seed} must be in [-2^63, 2^63 - 1]")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    loaded = load_for_inference(args.checkpoint, device=resolve_device(args.device, "--device"))
    if args.max_new_tokens is None:
        cap = loaded.config.model.max_seq_len if loaded.config.model.arch == "encdec" else DEFAULT_MAX_NEW_TOKENS
        args.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, cap)
    if loaded.config.model.arch == "encoder" and not loaded.config.model.labels:
        from clusterlm.errors import ConfigError

        raise ConfigError(f"{loaded.path} is a masked-LM encoder (arch 'encoder'): it fills in <|mask|> tokens, it "
                          "does not generate; fine-tune it as a classifier (docs/encdec.md)")
    if loaded.config.model.arch == "encdec" and args.compile:
        raise ValueError(f"--compile compiles a decoder-only model's decode step; {loaded.path} is an encoder-decoder "
                         "(arch 'encdec'), which decodes eagerly: leave --compile out")
    refuse_pack_for_encdec(args.pack, loaded.config.model.arch, loaded.path)  # it would be ignored
    if args.compile:  # refused before anything is printed (the prompt was left on stdout before the error)
        from clusterlm.generate.engine import compile_unavailable

        problem = compile_unavailable(next(loaded.model.parameters()).device)
        if problem is not None:
            raise ValueError(f"--compile: {problem}; leave --compile out (eager decode)")
    if loaded.config.model.labels:
        from clusterlm.errors import ConfigError

        raise ConfigError(f"{loaded.path} is a classifier (labels {', '.join(loaded.config.model.labels)}): it "
                          "labels text, it does not generate; use `clusterlm eval RUN --task FILE` or `clusterlm "
                          "serve` (POST /classify)")
    return loaded


def generate_main(argv: list[str], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    p = argparse.ArgumentParser(prog="clusterlm generate", description="Sample text from a checkpoint.")
    _common_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--src", default=None,
                   help="encoder-decoder: the source text for the encoder (same as --prompt; the output is the target)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="encoder-decoder: beam search with this width (deterministic; docs/encdec.md). Decoder-only "
                        "models beam-search in `clusterlm eval --task`")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logprob / length ** this")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as one user message through the model's chat template and print the reply")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
    if not math.isfinite(args.length_penalty):
        raise ValueError(f"--length-penalty={args.length_penalty} must be a finite number")
    if args.length_penalty != 1.0 and args.num_beams == 1:
        raise ValueError(f"--length-penalty={args.length_penalty} scores beam search only: add --num-beams N (N >= 2, "
                         "an encoder-decoder model) or leave it out")
    if args.num_beams > 1:  # beam search is deterministic: these would be ignored
        given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
                                ("--seed", args.seed)) if v is not None]
        given += ["--num-samples"] if args.num_samples > 1 else []
        if given:
            raise ValueError(f"--num-beams={args.num_beams} is beam search, which is deterministic: {', '.join(given)} "
                             "only apply to sampling; leave them out, or drop --num-beams to sample")
    loaded = _load(args)
    encdec = loaded.config.model.arch == "encdec"
    if args.src is not None and not encdec:
        raise ValueError(f"--src is for encoder-decoder models; {loaded.path} is arch {loaded.config.model.arch!r}: "
                         "use --prompt")
    if args.num_beams < 1:
        raise ValueError(f"--num-beams={args.num_beams} must be >= 1 (1 = no beam search)")
    if args.num_beams != 1 and not encdec:
        raise ValueError(f"--num-beams={args.num_beams}: `clusterlm generate` beam-searches encoder-decoder models "
                         f"only, and {loaded.path} is arch {loaded.config.model.arch!r}; a decoder-only model "
                         "beam-searches in `clusterlm eval --task ... --num-beams N`")
    if encdec and args.src is not None:
        if args.prompt:
            raise ValueError("--src and --prompt both give an encoder-decoder its source text; pass one of them")
        args.prompt = args.src
    prompt, stops, stop_ids = args.prompt, (), ()
    if args.chat:
        fmt = chat_format(loaded.tokenizer, loaded.chat_template)
        prompt = fmt.render([{"role": "user", "content": args.prompt}])
        stops, stop_ids = fmt.stop_strings, fmt.stop_ids
    if args.num_beams > 1:  # refused before any output: too wide for the vocabulary or the memory (docs/encdec.md)
        from clusterlm.generate.beam import check_beam_width
        from clusterlm.generate.seq2seq import fit_sources

        (src,) = fit_sources(loaded.tokenizer, [prompt], loaded.config.model.max_seq_len, True)
        check_beam_width(loaded.model, args.num_beams, max_new_tokens=args.max_new_tokens, input_len=len(src),
                         name="--num-beams")
    _greedy_notes(args)  # after every refusal
    warn_unknown_chars(loaded.tokenizer, prompt, "the prompt" + (" as the chat template renders it" if args.chat else ""))
    if encdec:
        warn_encdec_limits(loaded, prompt, args.max_new_tokens)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"----- sample {i + 1} -----\n")
        if not args.chat and not encdec:  # an encoder-decoder's output is the target alone
            out.write(args.prompt)
        seed = None if args.seed is None else args.seed + i
        if encdec:
            from clusterlm.generate.seq2seq import stream_seq2seq

            pieces = stream_seq2seq(loaded, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=seed, stop=stops, stop_ids=stop_ids,
                                    num_beams=args.num_beams, length_penalty=args.length_penalty)
        else:
            pieces = stream_text(loaded, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=seed, compile=args.compile, stop=stops,
                                 stop_ids=stop_ids, pack=_pack(args))
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
    return 0


def chat_main(argv: list[str], stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    p = argparse.ArgumentParser(prog="clusterlm chat",
                                description="Interactive chat with a checkpoint (empty line or Ctrl-D quits).")
    _common_args(p)
    p.add_argument("--system", default=None, help="a system message placed before the conversation")
    args = p.parse_args(argv)
    loaded = _load(args)
    fmt = chat_format(loaded.tokenizer, loaded.chat_template)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if messages:  # a template without a system role refuses it: before the first turn is typed, not after
        try:
            fmt.render(messages + [{"role": "user", "content": "Hi"}])
        except ValueError as e:
            raise ValueError(f"--system: {e}; leave --system out") from None
    _greedy_notes(args)
    interactive = stdin.isatty()
    turn = 0
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line or not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        # the first turn checks the template's own text (role names) too; later ones the new message
        warn_unknown_chars(loaded.tokenizer, fmt.render(messages) if turn == 0 else line.strip(),
                           "the conversation as the chat template renders it" if turn == 0 else "your message")
        out.write("model> ")
        reply = ""
        seed = None if args.seed is None else args.seed + turn
        if loaded.config.model.arch == "encdec":  # the rendered conversation is the encoder's source
            from clusterlm.generate.seq2seq import stream_seq2seq

            warn_encdec_limits(loaded, fmt.render(messages), args.max_new_tokens if turn == 0 else 0)

            pieces = stream_seq2seq(loaded, fmt.render(messages), max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                                    stop=fmt.stop_strings, stop_ids=fmt.stop_ids)
        else:
            pieces = stream_text(loaded, fmt.render(messages), max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                                 stop=fmt.stop_strings, stop_ids=fmt.stop_ids, compile=args.compile, pack=_pack(args))
        for piece in pieces:
            reply += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
        turn += 1
    return 0
