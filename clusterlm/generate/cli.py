"""`clusterlm generate` and `clusterlm chat`: text in, streamed text out, from a checkpoint.

    clusterlm generate runs/shakespeare_char --prompt "ROMEO." --max-new-tokens 200 --temperature 0.8
    clusterlm generate runs/shakespeare_char --num-samples 3 --seed 1
    clusterlm generate runs/shakespeare_char --compile     # torch.compile the decode step
    clusterlm chat runs/shakespeare_char

The prompt is preceded by EOS, the document separator the model saw in training, so generation
starts as a fresh document. Chat uses the plain template in `render_chat` (models trained here
have no chat template of their own): "User: ...\\n\\nAssistant: ..." turns, stopping at the next
"User:" line or EOS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

log = logging.getLogger(__name__)

USER, ASSISTANT = "User", "Assistant"
CHAT_STOP = f"\n{USER}:"


def render_chat(messages: list[dict[str, str]]) -> str:
    """The documented fallback chat template: one 'Role: content' paragraph per message, then
    'Assistant:' for the reply. Roles: system, user, assistant."""
    names = {"system": "System", "user": USER, "assistant": ASSISTANT}
    parts = []
    for m in messages:
        if m.get("role") not in names:
            raise ValueError(f"chat message role {m.get('role')!r}; valid roles: {', '.join(names)}")
        parts.append(f"{names[m['role']]}: {m['content'].strip()}\n\n")
    return "".join(parts) + f"{ASSISTANT}:"


class TextStream:
    """Turns a growing list of token ids into newly completed text, holding back an incomplete
    UTF-8 sequence (shown as U+FFFD by decode) until its last byte arrives."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - clusterlm.tokenizer.Tokenizer
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def prompt_ids(tokenizer, text: str, context: int | None, max_new_tokens: int) -> list[int]:  # noqa: ANN001
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    if context is not None and len(ids) + 1 > context:
        keep = max(1, context - min(max_new_tokens, context // 2))
        log.warning("prompt is %d tokens; the model's context is %d: keeping the last %d", len(ids), context, keep)
        ids = ids[-keep:]
    return ids


def _context(model) -> int | None:  # noqa: ANN001
    cfg = model.config
    return cfg.max_seq_len if cfg.arch == "transformer" else None


def stream_text(loaded, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None,  # noqa: ANN001
                top_p: float | None, seed: int | None, stop: str | None = None,
                compile: bool = False) -> Iterator[str]:
    """Yield text pieces of one sample as they are generated; stops at EOS, the limit or `stop`.
    `compile`: run the decode step through torch.compile (clusterlm.generate.engine)."""
    from clusterlm.generate.engine import generate

    tok, model = loaded.tokenizer, loaded.model
    ids = prompt_ids(tok, prompt, _context(model), max_new_tokens)
    gen = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_id=tok.eos_id, sliding_window=True, compile=compile)
    ts = TextStream(tok)
    text = ""
    for step in gen:
        piece = ts.push(step[0]) if step[0] is not None else ""
        if stop is not None and piece:
            text += piece
            cut = text.find(stop)
            if cut >= 0:
                yield piece[: len(piece) - (len(text) - cut)]
                return
        if piece:
            yield piece
    rest = ts.flush()
    if rest:
        yield rest


def sample_texts(ckpt: str, *, prompt: str = "", num_samples: int = 1, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, device: str = "cpu") -> list[str]:
    """Generate `num_samples` continuations of `prompt` in one batch; returns prompt + continuation."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.engine import complete

    loaded = load_for_inference(ckpt, device=device)
    tok = loaded.tokenizer
    ids = prompt_ids(tok, prompt, _context(loaded.model), max_new_tokens)
    new, _ = complete(loaded.model, [ids] * num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eos_id, sliding_window=True)
    return [prompt + tok.decode(t) for t in new]


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, checkpoints folder or step folder")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy, and so is any value below 1e-6 (sampling.GREEDY_TEMPERATURE)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="run the one-token decode step through torch.compile (compiled on first use: "
                        "seconds to a minute; needs a C++ compiler on CPU)")


def _load(args):  # noqa: ANN001, ANN202
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.sampling import check_sampling_args
    from clusterlm.device import resolve_device

    check_sampling_args(args.temperature, args.top_k, args.top_p)
    # torch.Generator.manual_seed takes a signed or unsigned 64-bit integer; sample i uses seed + i
    if args.seed is not None and not -(2**63) <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed={args.seed} must be in [-2^63, 2^63 - 1]")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    return load_for_inference(args.checkpoint, device=resolve_device(args.device, "--device"))


def generate_main(argv: list[str], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    p = argparse.ArgumentParser(prog="clusterlm generate", description="Sample text from a checkpoint.")
    _common_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--num-samples", type=int, default=1)
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
    loaded = _load(args)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"----- sample {i + 1} -----\n")
        out.write(args.prompt)
        seed = None if args.seed is None else args.seed + i
        for piece in stream_text(loaded, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                                 compile=args.compile):
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
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
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
        out.write("model> ")
        reply = ""
        seed = None if args.seed is None else args.seed + turn
        for piece in stream_text(loaded, render_chat(messages), max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                                 stop=CHAT_STOP, compile=args.compile):
            reply += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
        turn += 1
    return 0
