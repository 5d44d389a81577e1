"""Fine-tuning data: labelled records -> token ids with a loss mask (SFT) or a label (classify),
prepared once into a data directory that `ExampleLoader` reads (docs/finetune.md).

    from clusterlm.data.sft import prepare_examples, ExampleLoader
    prepare_examples("data/sst2", task="classify", source="train.tsv", tokenizer=tok)
    loader = ExampleLoader("data/sst2", "train", batch_size=32, seq_len=128, seed=0)
    x, y = next(loader)        # SFT: (B, T) ids and targets (IGNORE_INDEX off the responses)
                               # classify: (B, T) ids right-padded with pad_id, and (B,) label ids

Record forms (JSONL, one object a line; TSV with a header; two parallel text files "SRC,TGT"):
- SFT: {"prompt": ..., "completion": ...}; {"messages": [{"role", "content"}, ...]} (the loss is on
  every assistant turn); or the task harness's generate records ({"prompt" | "messages",
  "references"}: the first reference is the response) and parallel files (the harness's prompt
  "en: {source}\\nfr:", the target line the response).
- classify: {"text": ..., "label": ...} or a TSV with `sentence`/`text` and `label` columns.

An example is [EOS] + its text's ids. Without a chat template it is [EOS] prompt completion [EOS]
(the loss on completion and the final EOS; a space joins prompt and completion unless the prompt
ends in whitespace). With a template the conversation is rendered by it, each assistant turn's text
(its content and end-of-turn marker) is trained and the rest is not; the pieces are tokenized one
by one, so a response's ids never merge with its prompt's.

The prepared directory: meta.json (layout "examples"), tokenizer.json (and chat_template.jinja),
and per split `SPLIT.tokens.npy` (int32, all examples end to end), `SPLIT.offsets.npy` (int64,
n + 1 example starts), `SPLIT.mask.npy` (uint8, 1 = trained; SFT) or `SPLIT.labels.npy` (int64;
classify). Written into a staging folder and renamed, so a half-prepared directory never exists;
every array is checked against its SHA-256 in meta.json when a loader opens it.

Loader stream: as TokenLoader (data/loader.py), the global stream is the concatenation over epochs
of seeded permutations of the examples and the whole state is one position p (examples consumed by
all ranks). A global batch of W*B rows is packed from the stream at p: with `pack`, examples are
laid end to end into rows of T+1 tokens (an example that does not fit starts the next row; one
longer than a row is cut), else one example per row; rank r takes rows r*B..(r+1)*B. Every rank
computes the same packing from the lengths alone, so a resume on another number of ranks with the
same global batch continues with the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterlm.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

LAYOUT = "examples"
STATE_VERSION = 1
IGNORE_INDEX = -100  # = clusterlm.eval.metrics.IGNORE_INDEX (F.cross_entropy's default)
TASKS = ("sft", "classify")


# ---- records -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTRecord:
    """One supervised example: a plain prompt and completion, or chat messages (role, content)."""

    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    where: str = ""  # file:line, for messages


@dataclass(frozen=True)
class ClassifyRecord:
    text: str
    label: str
    where: str = ""


def _sft_jsonl(path: Path) -> list[SFTRecord]:
    from clusterlm.eval.tasks import ROLES, text_lines

    out = []
    for n, line in text_lines(path):  # a byte that is not UTF-8 is named with its line
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        if "kind" in rec and not ({"prompt", "messages", "completion"} & rec.keys()):
            continue  # a task file's header record
        if "messages" in rec and "prompt" in rec:
            raise DataError(f"{where}: the record has both 'prompt' and 'messages'; give one of them (a prompt + "
                            "'completion', or chat 'messages')")
        if "messages" in rec:
            raw = rec["messages"]
            if not isinstance(raw, list) or not raw:
                raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
            msgs = []
            for i, m in enumerate(raw):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    got = (f"got {type(m).__name__}" if not isinstance(m, dict) else
                           "; ".join(f"{k!r} is {m[k]!r:.80}" if k in m else f"no {k!r}" for k in ("role", "content")
                                     if not isinstance(m.get(k), str)))
                    raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content' "
                                    f"({got})")
                if m["role"] not in ROLES:
                    raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
                if m["role"] == "assistant" and not m["content"].strip():
                    raise DataError(f"{where}: messages[{i}] is an assistant turn with empty content; a response "
                                    "must be a non-empty string (as 'completion' must)")
                msgs.append((m["role"], m["content"]))
            refs = rec.get("references", rec.get("completion"))
            if refs is not None and msgs[-1][0] == "assistant":  # it trained two assistant turns in a row
                key = "references" if "references" in rec else "completion"
                raise DataError(f"{where}: 'messages' ends with an assistant turn and the record has {key!r} too; "
                                f"give the reply once: as the last assistant message, or as {key!r} after "
                                "messages that end with a user turn")
            if refs is not None:  # the harness's form: the reply is the first reference
                reply = refs[0] if isinstance(refs, list) and refs else refs
                if not isinstance(reply, str) or not reply.strip():
                    raise DataError(f"{where}: 'references' must hold a non-empty string response")
                msgs.append(("assistant", reply))
            if not any(r == "assistant" for r, _ in msgs):
                raise DataError(f"{where}: the record has no response: 'messages' has no assistant turn and there is "
                                "no 'completion' field (an SFT record needs 'prompt' + 'completion', or 'messages' "
                                "with an assistant turn)")
            out.append(SFTRecord(messages=tuple(msgs), where=where))
            continue
        if "prompt" not in rec:
            raise DataError(f"{where}: the record has no 'prompt' field (an SFT record needs 'prompt' + 'completion', "
                            f"or 'messages'); it has: {', '.join(rec) or 'nothing'}")
        field = "completion" if "completion" in rec or "references" not in rec else "references"
        reply = rec.get(field)
        if field == "references":
            reply = reply[0] if isinstance(reply, list) and reply else reply
        if field not in rec:
            raise DataError(f"{where}: the record has no response field 'completion' (an SFT record needs 'prompt' + "
                            "'completion', or 'messages' with an assistant turn)")
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{where}: field 'prompt' must be a string, got {rec['prompt']!r:.80}")
        if not isinstance(reply, str) or not reply.strip():
            want = ("a non-empty string" if field == "completion"
                    else "a non-empty list whose first item is a non-empty string")
            raise DataError(f"{where}: field {field!r} must be {want}, got {rec[field]!r:.80}")
        out.append(SFTRecord(prompt=rec["prompt"], completion=reply, where=where))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def read_records(spec: str, task: str, labels: Sequence[str] = (), field: str = "data.source"
                 ) -> list[SFTRecord] | list[ClassifyRecord]:
    """The records of `spec` (a .jsonl/.tsv file, or "SRC,TGT" parallel files) for `task`; `field` is the
    option that named `spec`, for the messages."""
    from clusterlm.eval.tasks import load_task

    if task not in TASKS:
        raise ConfigError(f"finetune.task={task!r}; records are read for {', '.join(TASKS)}")
    paths = [Path(p) for p in spec.split(",")] if "," in spec and not Path(spec).exists() else [Path(spec)]
    valid = "give a .jsonl or .tsv file or two parallel text files as 'SRC,TGT'"
    if len(paths) > 2:
        raise DataError(f"{field}={spec!r} names {len(paths)} files; {valid}")
    if len(paths) == 2 and not all(part.strip() for part in spec.split(",")):  # Path("") is ".", a directory
        raise DataError(f"{field}={spec!r} has an empty file name beside the comma; {valid}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        what = "is a directory, not a file:" if Path(missing[0]).is_dir() else "no such file"
        raise DataError(f"{field}={spec!r}: {what} {', '.join(missing)}; {valid}")
    if task == "classify":
        if len(paths) != 1:
            raise DataError(f"{field}={spec!r}: classification reads one .jsonl or .tsv file of text and label")
        t = load_task(paths[0], kind="classify", labels=list(labels) or None)
        return [ClassifyRecord(e.text, e.label, f"{paths[0]}:{e.line}") for e in t.examples]
    if len(paths) == 1 and paths[0].name.endswith((".jsonl", ".jsonl.gz")):
        return _sft_jsonl(paths[0])
    t = load_task(tuple(paths) if len(paths) == 2 else paths[0], kind="generate")
    if t.kind != "generate":
        raise DataError(f"{spec}: a {t.kind} task file; SFT needs prompts and responses (generate records)")
    out = []
    for e in t.examples:
        where = f"{t.source}:{e.line}"
        if e.messages is not None:
            msgs = tuple((m.role, m.content) for m in e.messages) + (("assistant", e.references[0]),)
            out.append(SFTRecord(messages=msgs, where=where))
        else:
            out.append(SFTRecord(prompt=e.prompt, completion=e.references[0], where=where))
    return out


# ---- records -> pieces of text, trained or not --------------------------------------------------
def _messages(r: SFTRecord) -> list[dict[str, str]]:
    if r.messages is not None:
        return [{"role": role, "content": c} for role, c in r.messages]
    return [{"role": "user", "content": r.prompt or ""}, {"role": "assistant", "content": r.completion or ""}]


def segments(r: SFTRecord, template: Any | None) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one SFT example, without the EOS ids at its ends."""
    if template is None:
        if r.messages is not None:
            raise DataError(f"{r.where}: a chat record needs a chat template; set finetune.template = 'clusterlm' "
                            "(or 'auto', or a .jinja file)")
        prompt = r.prompt or ""
        sep = "" if not prompt or prompt[-1].isspace() else " "
        return [(prompt, False), (sep + (r.completion or ""), True)]
    msgs = _messages(r)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            prefix = template.render(msgs[:i], add_generation_prompt=True)
            full = template.render(msgs[:i + 1])
        except Exception as e:  # noqa: BLE001 - a template error is the user's input
            raise ConfigError(f"{r.where}: the chat template does not render this record: {e}") from None
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ConfigError(f"{r.where}: the chat template is not prefix-stable (rendering one more message changes "
                              "the text before it), so the response tokens cannot be located; use a template that "
                              "only appends")
        pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    rest = template.render(msgs)[len(done):]
    if rest:
        pieces.append((rest, False))
    return pieces


def _encode_pieces(tokenizer: Any, pieces: list[list[tuple[str, bool]]], prompt_loss: bool,
                   final_eos: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32, mask uint8, offsets int64) of the examples made of `pieces`."""
    flat = [t for ex in pieces for t, _ in ex]
    ids = tokenizer.encode_batch(flat) if flat else []
    eos = tokenizer.eos_id
    tokens, mask, offsets = [], [], [0]
    k = 0
    for ex in pieces:
        t, m = [eos], [0]
        for _, trained in ex:
            piece = ids[k]
            k += 1
            t.extend(piece)
            m.extend([1 if (trained or prompt_loss) else 0] * len(piece))
        if final_eos:
            t.append(eos)
            m.append(1)
        tokens.append(np.asarray(t, dtype=np.int32))
        mask.append(np.asarray(m, dtype=np.uint8))
        offsets.append(offsets[-1] + len(t))
    return (np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
            np.concatenate(mask) if mask else np.zeros(0, np.uint8), np.asarray(offsets, dtype=np.int64))


# ---- preparing -----------------------------------------------------------------------------------
def _source_stamp(spec: str, *, content: bool = True) -> list[dict[str, Any]]:
    """Each file of a data.source spec: resolved path, size, mtime and (with `content`) its sha256, so
    that a copy with a new mtime but the same bytes still matches (source_differs)."""
    out = []
    for p in (spec.split(",") if "," in spec and not Path(spec).exists() else [spec]):
        st = Path(p).stat()
        entry = {"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if content and Path(p).is_file():
            entry["sha256"] = _hash(Path(p))
        out.append(entry)
    return out


def source_differs(made: list[dict[str, Any]], spec: str) -> str | None:
    """None when data.source `spec` is what a directory was made from (`made`, its _source_stamp),
    else what differs, in words. Same path and size with another mtime counts as the same when the
    content's sha256 matches (a copy, a `touch`); the hash is read only then."""
    try:
        now = _source_stamp(spec, content=False)
    except OSError as e:
        return f"{spec!r} cannot be read ({e.strerror})"
    if [m.get("path") for m in made] != [n["path"] for n in now]:
        return f"it was made from {', '.join(str(m.get('path')) for m in made) or 'unknown records'}"
    for m, n in zip(made, now):
        if m.get("size") != n["size"]:
            return f"{n['path']} is now {n['size']:,} bytes, was {m.get('size', 0):,}"
        if m.get("mtime_ns") != n["mtime_ns"]:
            if m.get("sha256") is None or not Path(n["path"]).is_file():
                return f"{n['path']} was modified since (and the folder kept no content hash to compare)"
            if _hash(Path(n["path"])) != m["sha256"]:
                return f"{n['path']}'s content changed since (same size, another sha256)"
    return None


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _split_val(n: int, fraction: float) -> np.ndarray:
    """A boolean mask of the records held out for validation (a fixed seeded draw)."""
    k = int(round(n * fraction))
    if fraction > 0 and k == 0 and n > 1:
        k = 1
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(0).permutation(n)[:k]] = True
    return held


def describe_source(task: str, source: str, val_source: str, template_source: str | None,
                    tokenizer_file: Path) -> dict[str, Any]:
    """What a prepared directory was made from; a directory made from anything else is refused."""
    return {"task": task, "source": _source_stamp(source), "val_source": _source_stamp(val_source) if val_source else [],
            "template_sha256": hashlib.sha256(template_source.encode()).hexdigest() if template_source else None,
            "tokenizer_sha256": _hash(tokenizer_file)}


def prepare_examples(out_dir: str | os.PathLike, *, task: str, source: str, tokenizer: Any, val_source: str = "",
                     val_fraction: float = 0.1, template: Any | None = None, labels: Sequence[str] = (),
                     prompt_loss: bool = False, records: list | None = None,
                     val_records: list | None = None, augment: int = 0,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the prepared directory `out_dir` (module docstring) and return its meta.json.
    `tokenizer` must already hold the template's special tokens. `records`/`val_records`: the
    already-read records (else read from `source`/`val_source`). `augment` (classify): that many
    augmented copies of each training text (data/augment.py) after the originals, flagged in the
    train split's `augmented` array. `options`: the settings it was made with, kept in meta.json's
    made_from["options"] (finetune/data.py compares them when the directory is reused)."""
    from clusterlm.data.shards import META_VERSION
    from clusterlm.fsutil import atomic_write_json, atomic_write_text, staging_dir

    out_dir = Path(out_dir)
    if template is not None:
        missing = [t for t in getattr(template, "special_tokens", ()) if tokenizer.token_id(t) is None]
        if missing:
            raise ConfigError(f"the tokenizer lacks the chat template's special tokens {', '.join(missing)}")
    recs = records if records is not None else read_records(source, task, labels)
    if val_records is None and val_source:
        val_records = read_records(val_source, task, labels, field="finetune.val_source")
    if val_records is None:
        held = _split_val(len(recs), val_fraction)
        splits = {"train": [r for r, h in zip(recs, held) if not h], "val": [r for r, h in zip(recs, held) if h]}
    else:
        splits = {"train": list(recs), "val": list(val_records)}
    if not splits["train"]:
        raise DataError(f"data.source={source!r}: no training records left after holding out validation")
    n_real = len(splits["train"])
    if augment and task == "classify":  # after the hold-out: no copy of a validation text trains
        from clusterlm.data.augment import augment_texts

        train = splits["train"]
        splits["train"] = train + [ClassifyRecord(text, train[i].label, f"{train[i].where} (augmented)")
                                   for i, text in augment_texts([r.text for r in train], augment)]
    label_names: tuple[str, ...] = ()
    if task == "classify":
        # data.source's labels, its held-out share included: a rare class drawn wholly into validation
        # is still a class (its weight under class_weights = "balanced" is 0), not a refused record
        label_names = tuple(labels) or tuple(sorted({r.label for r in recs}))
        index = {name: i for i, name in enumerate(label_names)}
        for split, rs in splits.items():
            for r in rs:
                if r.label not in index:
                    raise DataError(f"{r.where}: label {r.label!r} is not in the label set "
                                    f"{', '.join(label_names)} (finetune.labels, else data.source's labels)")
        if len(label_names) < 2:
            raise DataError(f"data.source={source!r}: the training records have {len(label_names)} distinct label(s); "
                            "a classifier needs at least 2")
    with staging_dir(out_dir, overwrite=out_dir.exists()) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
        if template is not None:
            atomic_write_text(tmp / "chat_template.jinja", template.source)
        meta_splits = {}
        for split, rs in splits.items():
            files: dict[str, str] = {}
            if task == "classify":
                tokens, _, offsets = _encode_pieces(tokenizer, [[(r.text, False)] for r in rs], False, False)
                arrays = {"tokens": tokens, "offsets": offsets,
                          "labels": np.asarray([index[r.label] for r in rs], dtype=np.int64)}
                if augment and split == "train":
                    arrays["augmented"] = (np.arange(len(rs)) >= n_real).astype(np.uint8)
            else:
                pieces = [segments(r, template) for r in rs]
                tokens, mask, offsets = _encode_pieces(tokenizer, pieces, prompt_loss, final_eos=template is None)
                arrays = {"tokens": tokens, "offsets": offsets, "mask": mask}
            for name, arr in arrays.items():
                fname = f"{split}.{name}.npy"
                np.save(tmp / fname, arr, allow_pickle=False)
                files[name] = fname
            meta_splits[split] = {"examples": len(rs), "tokens": int(tokens.size),
                                  "trained_tokens": int(arrays["mask"].sum()) if "mask" in arrays else len(rs),
                                  "files": files, "sha256": {n: _hash(tmp / f) for n, f in files.items()}}
        meta = {"format_version": META_VERSION, "layout": LAYOUT, "task": task,
                "tokenizer": {"file": "tokenizer.json", "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
                "chat_template": "chat_template.jinja" if template is not None else None,
                "labels": list(label_names), "prompt_loss": prompt_loss, "augment": augment, "splits": meta_splits,
                "made_from": {**describe_source(task, source, val_source, template.source if template else None,
                                                tmp / "tokenizer.json"), **({"options": options} if options else {})}}
        atomic_write_json(tmp / "meta.json", meta)
    log.info("prepared %s: %s", out_dir, ", ".join(f"{s} {m['examples']:,} examples ({m['tokens']:,} tokens)"
                                                   for s, m in meta_splits.items()))
    return meta


def is_examples_dir(meta: dict[str, Any]) -> bool:
    return meta.get("layout") == LAYOUT


# ---- reading -----------------------------------------------------------------------------------
class ExampleSplit:
    """The arrays of one split, checked against meta.json's SHA-256s."""

    def __init__(self, data_dir: str | os.PathLike, split: str) -> None:
        from clusterlm.data.shards import read_meta

        self.data_dir = data_dir = Path(data_dir)
        meta = read_meta(data_dir)
        if not is_examples_dir(meta):
            raise DataError(f"{data_dir} holds token shards (pre-training data), not fine-tuning examples; "
                            "prepare fine-tuning data with finetune.task and data.source")
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}/meta.json has no split {split!r}; it has {', '.join(meta['splits'])}")
        info = meta["splits"][split]
        self.task = meta["task"]
        self.labels = tuple(meta.get("labels") or ())
        self.arrays: dict[str, np.ndarray] = {}
        digest = hashlib.sha256(f"{split}\n".encode())
        for name, fname in info["files"].items():
            path = data_dir / fname
            if not path.is_file():
                raise DataError(f"{path} is missing (listed in {data_dir}/meta.json); prepare the data again")
            sha = _hash(path)
            if sha != info["sha256"][name]:
                raise DataError(f"{path} does not match its SHA-256 in meta.json (changed or truncated); "
                                "prepare the data again")
            self.arrays[name] = np.load(path, allow_pickle=False)
            digest.update(sha.encode())
        self.fingerprint = digest.hexdigest()[:16]
        self.offsets = self.arrays["offsets"]
        self.tokens = self.arrays["tokens"]
        self.n = len(self.offsets) - 1
        self.lengths = np.diff(self.offsets)

    def example(self, i: int, cap: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Example i's tokens (and mask), at most `cap`: an SFT example keeps its start (a response
        cut short still trains), a text to classify its end (as serving and eval.lm.classifier_ids
        left-truncate)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.task == "classify":
            a = max(a, b - cap)
        else:
            b = min(b, a + cap)
        mask = self.arrays.get("mask")
        return self.tokens[a:b], (mask[a:b] if mask is not None else None)


def check_responses_fit(data_dir: str | os.PathLike, seq_len: int) -> None:
    """SFT examples are cut to seq_len + 1 tokens from their start (ExampleSplit.example): one whose
    trained tokens all lie beyond that trains nothing. Warns with the count; refuses a split where
    no example keeps a trained token (its loss would be 0/0: steps of zero gradient, then an empty
    validation)."""
    from clusterlm.data.shards import read_meta

    for split, info in read_meta(data_dir)["splits"].items():
        if not info.get("examples") or "mask" not in info["files"]:
            continue
        data = ExampleSplit(data_dir, split)
        cs = np.concatenate([[0], np.cumsum(data.arrays["mask"], dtype=np.int64)])
        a = data.offsets[:-1].astype(np.int64)
        b = np.minimum(data.offsets[1:].astype(np.int64), a + seq_len + 1)
        empty = int((cs[b] - cs[np.minimum(a + 1, b)] == 0).sum())  # position 0 (the leading EOS) is no target
        if empty == data.n:
            raise DataError(f"{data_dir}/{split}: every one of its {data.n} examples has its response beyond the "
                            f"first {seq_len + 1} tokens (train.seq_len={seq_len} + 1), so nothing would train; "
                            f"raise train.seq_len (the longest example has {int(data.lengths.max())} tokens) or "
                            "shorten the prompts")
        if empty:
            log.warning("%s/%s: %d of %d examples have their response beyond the first %d tokens and train "
                        "nothing; raise train.seq_len to keep them", data_dir, split, empty, data.n, seq_len + 1)


class ExampleLoader:
    """Deterministic, resumable, rank-aware batches of fine-tuning examples (module docstring)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, pack: bool = True, pad_id: int,
                 shuffle: bool = True, warn_cut: bool = True, soft_targets: np.ndarray | None = None,
                 soft_weight: float = 0.0) -> None:
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}, rank={rank}, world_size={world_size}")
        self.data = ExampleSplit(data_dir, split)
        if self.data.n == 0:
            raise DataError(f"{data_dir}: split {split!r} has no examples")
        self.B, self.T, self.seed, self.rank, self.W = batch_size, seq_len, seed, rank, world_size
        self.classify = self.data.task == "classify"
        # distillation (finetune/distill.py): a classifier's targets become label distributions
        if soft_targets is not None and (not self.classify or soft_targets.shape != (self.data.n, len(self.data.labels))):
            raise ValueError(f"soft_targets {getattr(soft_targets, 'shape', None)} must be (examples, labels) = "
                             f"({self.data.n}, {len(self.data.labels)}) of a classification split")
        self.soft, self.soft_weight = soft_targets, soft_weight
        self.pack = pack and not self.classify
        self.pad_id, self.shuffle = pad_id, shuffle
        self.cap = seq_len if self.classify else seq_len + 1  # tokens of an example that are used
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}
        cut = int((self.data.lengths > self.cap).sum()) if warn_cut else 0
        if cut:
            log.warning("%s/%s: %d of %d examples are longer than %d tokens and are cut (longest %d); raise "
                        "train.seq_len to keep them whole", data_dir, split, cut, self.data.n, self.cap,
                        int(self.data.lengths.max()))

    @property
    def num_samples(self) -> int:
        return self.data.n

    @property
    def epoch(self) -> int:
        return self.position // self.data.n

    def _index(self, p: int) -> int:
        n = self.data.n
        e, i = divmod(p, n)
        if not self.shuffle:
            return i
        if e not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[e] = np.random.default_rng([self.seed, e]).permutation(n)
        return int(self._perms[e][i])

    def _rows(self) -> tuple[list[list[int]], int]:
        """The global batch's rows (lists of example indices) and the examples they consume."""
        rows: list[list[int]] = [[] for _ in range(self.W * self.B)]
        p, r, used = self.position, 0, 0
        while True:
            i = self._index(p)
            n = min(int(self.data.lengths[i]), self.cap)
            if not self.pack:
                rows[r].append(i)
                r, p = r + 1, p + 1
                if r == len(rows):
                    break
                continue
            if rows[r] and used + n > self.cap:
                r, used = r + 1, 0
                if r == len(rows):
                    break
            rows[r].append(i)
            used += n
            p += 1
        return rows, p - self.position

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, consumed = self._rows()
        mine = rows[self.rank * self.B:(self.rank + 1) * self.B]
        self.position += consumed
        return self._collate(mine)

    def _collate(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.classify:
            seqs = [self.data.example(r[0], self.cap)[0] for r in rows]
            width = max(len(s) for s in seqs)
            x = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            for k, s in enumerate(seqs):
                x[k, :len(s)] = s
            idx = [r[0] for r in rows]
            labels = self.data.arrays["labels"][idx]
            if self.soft is not None:  # (B, C): (1 - w) * one-hot(label) + w * the teachers' probabilities
                onehot = np.eye(len(self.data.labels), dtype=np.float32)[labels]
                w = np.full((len(idx), 1), self.soft_weight, dtype=np.float32)
                aug = self.data.arrays.get("augmented")
                if aug is not None:  # an augmented copy: the teachers' probabilities alone
                    w[aug[idx] == 1] = 1.0
                dist = (1.0 - w) * onehot + w * self.soft[idx]
                return torch.from_numpy(x), torch.from_numpy(dist.astype(np.float32))
            return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
        parts = [[self.data.example(i, self.cap) for i in r] for r in rows]
        width = self.T + 1 if self.pack else max(sum(len(t) for t, _ in p) for p in parts)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        tgt = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for k, p in enumerate(parts):
            at = 0
            for t, m in p:
                ids[k, at:at + len(t)] = t
                # position j predicts j+1 inside one example, where j+1 is trained
                keep = m[1:].astype(bool)
                tgt[k, at:at + len(t) - 1] = np.where(keep, t[1:], IGNORE_INDEX)
                at += len(t)
        return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(tgt[:, :-1].copy())

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "layout": LAYOUT, "position": self.position, "seed": self.seed,
                "fingerprint": self.data.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layout") != LAYOUT:
            raise CheckpointError("the checkpoint's loader state is for token shards (pre-training), but this run "
                                  "reads fine-tuning examples; resume it with its own data")
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.data.fingerprint:
            raise CheckpointError(f"the checkpoint was written while reading other examples (fingerprint "
                                  f"{state.get('fingerprint')} vs {self.data.fingerprint} of {self.data.data_dir}); "
                                  "resume with the data it was trained on")
        if state.get("seed") != self.seed:
            raise CheckpointError(f"the checkpoint's loader seed is {state.get('seed')} but train.seed={self.seed}")
        self.position = int(state["position"])


def iter_example_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, *, pad_id: int,
                         pack: bool = True, max_batches: int | None = None
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over `split` in file order (the last batch may be short), at most `max_batches`."""
    loader = ExampleLoader(data_dir, split, batch_size=batch_size, seq_len=seq_len, pack=pack, pad_id=pad_id,
                           shuffle=False)
    n, k = loader.data.n, 0
    while loader.position < n and (max_batches is None or k < max_batches):
        rows, consumed = loader._rows()
        if loader.position + consumed > n:  # the pass ends inside this batch: only this epoch's examples
            left = n - loader.position
            flat, out = 0, []
            for r in rows:
                if flat >= left:
                    break
                out.append(r[:left - flat])
                flat += len(out[-1])
            rows, consumed = [r for r in out if r], left
        loader.position += consumed
        k += 1
        yield loader._collate(rows)
