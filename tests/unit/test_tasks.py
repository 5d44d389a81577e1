"""Task files and adapters (clusterlm/eval/tasks.py): JSONL of each kind, TSV in both column orders,
parallel text plain and .gz, and one clear DataError line for each kind of bad input.

    .venv/bin/python -m pytest -q tests/unit/test_tasks.py

The reference is the format written down in docs/tasks.md; fixtures are in fixtures/tasks/.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from clusterlm.errors import DataError
from clusterlm.eval.tasks import (PARALLEL_TEMPLATE, ChoiceExample, ClassifyExample, GenerateExample, Message,
                                  load_jsonl, load_parallel, load_task, load_tsv)

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
SST2 = [("it is a charming and often affecting journey . ", "1"), ("unflinchingly bleak and desperate ", "0"),
        ("the acting , costumes , music , cinematography and sound are all astounding ", "1")]


def _write(path: Path, lines: list, gz: bool = False) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _gzip_copy(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return dst


# ------------------------------------------------------------------------------------------------
# Adapters


@pytest.mark.parametrize("gz", [False, True])
def test_parallel_pair_plain_and_gz(tmp_path, gz):
    """news.en/news.fr (plain, and the same gzipped as news.en.gz/news.fr.gz): one generate example per
    line pair, prompt = the default template, reference = the target line; the pair whose source line is
    empty (line 3) is skipped; language codes come from the file names."""
    src, tgt = FIXTURES / "news.en", FIXTURES / "news.fr"
    if gz:
        src, tgt = _gzip_copy(src, tmp_path / "news.en.gz"), _gzip_copy(tgt, tmp_path / "news.fr.gz")
    task = load_task((src, tgt))
    assert (task.name, task.kind, task.labels, len(task)) == ("news.en-fr", "generate", None, 3)
    assert task.examples[0] == GenerateExample(references=("Le chat était assis sur le tapis.",),
                                               prompt="en: The cat sat on the mat.\nfr:", line=1)
    assert [e.line for e in task.examples] == [1, 2, 4]
    assert task.examples[2].references == ("Le comité a approuvé le nouveau budget lundi.",)
    assert load_task(f"{src},{tgt}") == task  # "SRC,TGT" names the same pair
    assert PARALLEL_TEMPLATE == "{src_lang}: {source}\n{tgt_lang}:"


def test_parallel_template_and_limit():
    """A custom template replaces the default; limit keeps the first N examples; a template without
    {source} or with an unknown placeholder is refused, naming the valid ones."""
    task = load_parallel(FIXTURES / "news.en", FIXTURES / "news.fr", template="Translate to French: {source} =>",
                         limit=2, name="mt")
    assert task.name == "mt" and [e.prompt for e in task.examples] == [
        "Translate to French: The cat sat on the mat. =>", "Translate to French: It is raining in Paris today. =>"]
    for bad in ("no placeholder", "{source} {language}", "{source"):
        with pytest.raises(ValueError, match="template"):
            load_parallel(FIXTURES / "news.en", FIXTURES / "news.fr", template=bad)


def test_parallel_files_with_one_language_tag_warn(tmp_path, caplog):
    """src.txt and tgt.txt both give the tag 'txt' ("txt: ...\ntxt:"): a warning says so; distinct tags or a
    template without them say nothing."""
    src, tgt = _write(tmp_path / "src.txt", ["one"]), _write(tmp_path / "tgt.txt", ["un"])
    with caplog.at_level("WARNING", logger="clusterlm"):
        task = load_parallel(src, tgt)
    assert task.examples[0].prompt == "txt: one\ntxt:"
    assert any("both files give the language tag 'txt'" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clusterlm"):
        load_parallel(src, tgt, template="Translate: {source} =>")
        load_parallel(FIXTURES / "news.en", FIXTURES / "news.fr")
    assert not [r for r in caplog.records if "language tag" in r.getMessage()], caplog.text


def test_task_files_given_as_a_parallel_pair_are_refused(tmp_path):
    """"qa.jsonl,dev.tsv" (two tasks, written as --lm-eval lists its tasks) was read as a parallel pair:
    each JSON line a sentence to translate, the TSV's lines its references, tags 'jsonl' and 'tsv'."""
    qa = _write(tmp_path / "qa.jsonl", [{"prompt": "a", "references": "b"}, {"prompt": "c", "references": "d"}])
    dev = _write(tmp_path / "dev.tsv", ["sentence\tlabel", "x\t1"])
    for spec in (f"{qa},{dev}", (qa, dev), (FIXTURES / "news.en", qa)):
        with pytest.raises(DataError, match=r"\.jsonl is a task file, not a parallel text file"):
            load_task(spec)


def test_parallel_files_of_different_lengths(tmp_path):
    """Both line counts are named, also when limit would have stopped reading early."""
    src = _write(tmp_path / "a.en", ["one", "two", "three"])
    tgt = _write(tmp_path / "a.de", ["eins", "zwei"], gz=True)
    tgt = tgt.rename(tmp_path / "a.de.gz")
    with pytest.raises(DataError, match=r"a\.en has 3 lines, .*a\.de\.gz has 2"):
        load_parallel(src, tgt, limit=1)


@pytest.mark.parametrize("name", ["sst2_dev.tsv", "label_first.tsv"])
def test_tsv_both_column_orders(name):
    """sentence<TAB>label (SST-2) and label<TAB>sentence give the same examples: columns are found by
    header name; with no label set given, it is the sorted labels found (numeric order)."""
    task = load_task(FIXTURES / name)
    assert task.kind == "classify" and task.labels == ("0", "1")
    assert [(e.text, e.label) for e in task.examples] == SST2
    assert [e.line for e in task.examples] == [2, 3, 4]


def test_tsv_label_names_gz_and_renamed_column(tmp_path):
    """labels={"0": "negative", ...} renames raw labels and fixes the set's order; .tsv.gz reads the same;
    fields= points at a differently named column."""
    gz = _gzip_copy(FIXTURES / "sst2_dev.tsv", tmp_path / "dev.tsv.gz")
    task = load_task(gz, labels={"0": "negative", "1": "positive"}, limit=2)
    assert task.labels == ("negative", "positive") and task.name == "dev"
    assert [e.label for e in task.examples] == ["positive", "negative"]
    review = _write(tmp_path / "r.tsv", ["stars\treview", "5\tgreat", "1\tawful"])
    task = load_tsv(review, fields={"text": "review", "label": "stars"}, labels=["1", "5"])
    assert task.examples == (ClassifyExample("great", "5", 2), ClassifyExample("awful", "1", 3))


def test_jsonl_generate_with_header_prompts_and_messages():
    """qa.jsonl: header (kind, name), references as a list or a string, chat messages; blank lines skip."""
    task = load_jsonl(FIXTURES / "qa.jsonl")
    assert (task.name, task.kind, len(task)) == ("tiny-qa", "generate", 3)
    assert task.examples[0].references == ("Paris", "in Paris, France")
    assert task.examples[1] == GenerateExample(references=("blue",), prompt="Q: What colour is the sky?\nA:", line=3)
    assert task.examples[2].messages == (Message("system", "Answer briefly."), Message("user", "Capital of Italy?"))
    assert task.examples[2].prompt is None and task.examples[2].line == 5


def test_jsonl_classify_and_choice(tmp_path):
    """Classify with the label set in the header (kept in header order); choice with no header (the kind
    read from the fields); a .jsonl.gz reads the same; limit keeps the first N."""
    senti = load_task(FIXTURES / "sentiment.jsonl", limit=3)
    assert senti.labels == ("negative", "neutral", "positive") and len(senti) == 3
    assert senti.examples[0] == ClassifyExample("I loved it.", "positive", 2)
    cloze = load_task(FIXTURES / "cloze.jsonl")
    assert cloze.kind == "choice" and cloze.name == "cloze"
    assert cloze.examples[1] == ChoiceExample("Now is the winter of our", ("discontent", "summer"), 0, 2)
    assert load_task(_gzip_copy(FIXTURES / "cloze.jsonl", tmp_path / "cloze.jsonl.gz")).examples == cloze.examples
    quiz = _write(tmp_path / "quiz.jsonl", [{"question": "2+2=", "options": ["3", "4"], "answer": "1"}])
    task = load_task(quiz, kind="choice", fields={"context": "question", "choices": "options", "gold": "answer"})
    assert task.examples == (ChoiceExample("2+2=", ("3", "4"), 1, 1),)  # renamed fields; "1" read as 1
    ints = _write(tmp_path / "i.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    assert load_task(ints, labels=["0", "1"]).examples[0].label == "1"  # integer labels read as strings


def test_kind_on_each_record(tmp_path):
    """Instead of a header, each record may carry "kind" (the form of the bundled Shakespeare task); one
    kind per file: a record of another kind is refused; a header with a misspelt key is named."""
    rec = {"kind": "choice", "context": "c", "choices": ["a", "b"], "gold": 1}
    task = load_task(_write(tmp_path / "k.jsonl", [rec, rec]))
    assert task.kind == "choice" and task.examples[1] == ChoiceExample("c", ("a", "b"), 1, 2)
    _fails(tmp_path, [rec, {"kind": "generate", "prompt": "p", "references": "r"}],
           r":2: kind='generate' but the task is 'choice'")
    _fails(tmp_path, [{"kind": "classify", "lables": ["a", "b"]}], r":1: header record has unknown keys \['lables'\]")
    # without any "kind", the first record's fields give it; a record of another kind is named as such.
    # Before: "the generate record has no field 'prompt'", as if a generate record had lost a field
    gen, choice = {"prompt": "p", "references": "r"}, {"context": "c", "choices": ["a", "b"], "gold": 0}
    _fails(tmp_path, [gen, choice], r":2: a choice record \(fields context, choices, gold\) in a generate task "
                                    r"\(the kind read from line 1's fields\); one kind per task file")
    _fails(tmp_path, [{"text": "t", "label": "a"}, gen], r":2: a generate record .* in a classify task")
    _fails(tmp_path, [gen, {"prompt": "p"}], r":2: the generate record has no field 'references'")  # same kind


# ------------------------------------------------------------------------------------------------
# Bad input: one DataError line naming the file, the line and the field


def _fails(tmp_path, lines, match, **kw):
    path = _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError, match=match) as e:
        load_task(path, **kw)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


def test_missing_field_names_field_line_and_file(tmp_path):
    msg = _fails(tmp_path, [{"kind": "choice"}, {"context": "a", "choices": ["b", "c"], "gold": 0},
                            {"context": "a", "choices": ["b", "c"]}], r"t\.jsonl:3: .*no field 'gold'")
    assert "fields present: context, choices" in msg
    _fails(tmp_path, [{"text": "hi", "label": "a"}, {"label": "a"}], r":2: the classify record has no field 'text'")
    _fails(tmp_path, [{"kind": "generate"}, {"references": ["x"]}], r":2: .*no field 'prompt'.*'messages'")


def test_unknown_label(tmp_path):
    _fails(tmp_path, [{"kind": "classify", "labels": ["neg", "pos"]}, {"text": "a", "label": "pos"},
                      {"text": "b", "label": "postive"}],
           r":3: field 'label' has unknown label 'postive'; the label set is neg, pos")
    # the loader's labels win over the header's
    _fails(tmp_path, [{"kind": "classify", "labels": ["neg", "pos"]}, {"text": "a", "label": "pos"}],
           "unknown label 'pos'", labels=["yes", "no"])
    tsv = _write(tmp_path / "d.tsv", ["sentence\tlabel", "fine\t1", "bad\t2"])
    with pytest.raises(DataError, match=r"d\.tsv:3: field 'label' has unknown label '2'"):
        load_task(tsv, labels=["0", "1"])


def test_label_set_names_are_stripped_and_empty_or_invalid_names_refused(tmp_path):
    """A label set's names are stripped like record labels and predictions: " negative" kept as it is made
    the scorer count every right answer of that class as outside the set (accuracy 0 for a perfect model)."""
    from clusterlm.eval.scorers import score_task
    task = load_task(_write(tmp_path / "m.jsonl", [{"kind": "classify", "labels": {"0": " negative", "1": "positive "}},
                                                   {"text": "bad", "label": 0}, {"text": "good", "label": 1}]))
    assert task.labels == ("negative", "positive")
    got = score_task(task, list(task.labels))  # what the harness predicts: the label set's own names
    assert (got["accuracy"], got["n_invalid"]) == (1.0, 0)
    task = load_task(_write(tmp_path / "l.jsonl", [{"kind": "classify", "labels": ["neg ", "pos"]},
                                                   {"text": "a", "label": "neg"}]))
    assert task.labels == ("neg", "pos")
    assert load_task(_write(tmp_path / "r.jsonl", [{"text": "a", "label": "neg"}]),
                     labels={" neg": "no", "pos": "yes"}).examples[0].label == "no"
    for labels in (["", "pos"], ["neg", " "], {"0": "neg", "1": ""}, ["<invalid>", "pos"]):
        _fails(tmp_path, [{"kind": "classify", "labels": labels}, {"text": "a", "label": "pos"}],
               "the label set has an empty label or '<invalid>'")
    _fails(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "<invalid>"}],
           r":2: field 'label' is '<invalid>', which marks predictions outside the label set")


def test_references_missing_or_empty(tmp_path):
    _fails(tmp_path, [{"prompt": "p", "references": ["r"]}, {"prompt": "q"}], r":2: .*no field 'references'")
    _fails(tmp_path, [{"prompt": "p", "references": []}], r":1: field 'references' must be a non-empty")
    _fails(tmp_path, [{"prompt": "p", "references": ["ok", " "]}], r":1: field 'references' must be")


def test_empty_task_file(tmp_path):
    for lines in ([], ["", "  "], [{"kind": "generate", "name": "x"}]):
        _fails(tmp_path, lines, "empty task file: no examples")
    with pytest.raises(DataError, match="empty TSV file"):
        load_task(_write(tmp_path / "e.tsv", []))
    with pytest.raises(DataError, match="no examples"):
        load_parallel(_write(tmp_path / "e.en", []), _write(tmp_path / "e.fr", []))


def test_gold_index_out_of_range(tmp_path):
    _fails(tmp_path, [{"context": "c", "choices": ["a", "b", "c"], "gold": 3}],
           r":1: field 'gold' is 3, out of range: .* 0 to 2")
    _fails(tmp_path, [{"context": "c", "choices": ["a", "b"], "gold": True}], r":1: field 'gold' is True")
    # "²" passed str.isdigit and int() raised a bare "invalid literal for int()" with no file or line
    _fails(tmp_path, [{"context": "c", "choices": ["a", "b"], "gold": "\u00b2"}], r":1: field 'gold' is '\u00b2', out")
    text_gold = _write(tmp_path / "g.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": " 1"}])
    assert load_task(text_gold).examples[0].gold == 1
    _fails(tmp_path, [{"context": "c", "choices": ["a"], "gold": 0}], r"'choices' must be a list of at least two")


def test_other_bad_records(tmp_path):
    """Invalid JSON, a non-object, prompt and messages both, a bad role, a bad header, a TSV row with the
    wrong number of cells or a missing column: each one line with its place."""
    _fails(tmp_path, [{"prompt": "p", "references": "r"}, "{not json"], r":2: invalid JSON")
    # an unpaired surrogate escape: the run scored it, then writing --samples raised UnicodeEncodeError
    # (no file, no line, the scores lost); a pair (an emoji written as two escapes) is text
    _fails(tmp_path, [{"prompt": "p", "references": "r"}, '{"prompt": "a \\ud800", "references": "r"}'],
           r":2: field 'prompt' has an unpaired surrogate escape \('\\ud800'\)")
    emoji = _write(tmp_path / "e.jsonl", ['{"prompt": "\\ud83d\\ude00", "references": "r"}'])
    assert load_task(emoji).examples[0].prompt == "\U0001F600"
    _fails(tmp_path, [[1, 2]], r":1: a record must be a JSON object, got list")
    _fails(tmp_path, [{"prompt": "p", "messages": [], "references": "r"}], r":1: .*both 'prompt' and 'messages'")
    _fails(tmp_path, [{"messages": [{"role": "robot", "content": "x"}], "references": "r"}],
           r":1: field 'messages' item 0 has role 'robot'; valid roles: system, user, assistant")
    _fails(tmp_path, [{"kind": "ranking"}], r":1: header kind='ranking'; valid: generate, classify, choice")
    _fails(tmp_path, [{"kind": "choice", "labels": ["a"]}], r"'labels' is only for classify")
    for bad in ("", "  "):  # the name keys the scores (JSON, TensorBoard's task/<name>/...): none is no name
        _fails(tmp_path, [{"kind": "choice", "name": bad}, {"context": "", "choices": ["a", "b"], "gold": 0}],
               r":1: header name must be a non-empty string")
    _fails(tmp_path, [{"kind": "choice", "version": True}], r":1: header version=True; this clusterlm reads version 1")
    _fails(tmp_path, [{"kind": "choice"}], r"kind='choice' but kind='generate' was asked for", kind="generate")
    _fails(tmp_path, [{"foo": 1}], r":1: cannot tell the task's kind")
    tsv = _write(tmp_path / "bad.tsv", ["sentence\tlabel", "ok\t1", "too\tmany\tcells"])
    with pytest.raises(DataError, match=r"bad\.tsv:3: 3 tab-separated cells, but the header has 2"):
        load_task(tsv)
    with pytest.raises(DataError, match=r"test\.tsv:1: the header has no column 'label'.*columns: index, sentence"):
        load_task(_write(tmp_path / "test.tsv", ["index\tsentence", "0\thello"]))
    # a column read named twice: the last one was read without a word (here every label 0, accuracy of a wrong file)
    with pytest.raises(DataError, match=r"two\.tsv:1: the header names column 'label' 2 times"):
        load_task(_write(tmp_path / "two.tsv", ["sentence\tlabel\tlabel", "x\t1\t0", "y\t0\t0"]))
    ok = load_task(_write(tmp_path / "extra.tsv", ["sentence\tlabel\tid\tid", "x\t1\ta\tb"]))  # not read: fine
    assert [(e.text, e.label) for e in ok.examples] == [("x", "1")]
    with pytest.raises(DataError, match="unsupported file"):
        load_task(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="limit=0"):
        load_task(FIXTURES / "cloze.jsonl", limit=0)


def test_corrupt_gzip_and_bad_utf8(tmp_path):
    """A truncated .gz and a file that is not UTF-8 are named, not a traceback."""
    full = _gzip_copy(FIXTURES / "qa.jsonl", tmp_path / "full.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full[: len(full) - 12])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip"):
        load_task(cut)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.tsv:2: not valid UTF-8"):
        load_task(latin)
    # the line of the bad byte, not of the last line decoded before it (the file is decoded in blocks:
    # this said "after line 0" for a byte on line 3); lines end at \n, \r\n or \r as they are read
    bad = "".join(f'{{"text": "fine {i}", "label": "a"}}\r\n' for i in range(300)) + '{"text": "caf\xe9", "label": "a"}\n'
    (tmp_path / "bad.jsonl").write_bytes(bad.encode("latin-1"))
    with pytest.raises(DataError, match=r"bad\.jsonl:301: not valid UTF-8"):
        load_task(tmp_path / "bad.jsonl")
    _gzip_copy(tmp_path / "bad.jsonl", tmp_path / "bad.jsonl.gz")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:301: not valid UTF-8"):
        load_task(tmp_path / "bad.jsonl.gz")
    (tmp_path / "cr.jsonl").write_bytes(b'{"text": "a", "label": "a"}\r{"text": "caf\xe9", "label": "a"}\n')
    with pytest.raises(DataError, match=r"cr\.jsonl:2: not valid UTF-8"):
        load_task(tmp_path / "cr.jsonl")


@pytest.mark.parametrize("gz", [False, True])
def test_a_leading_byte_order_mark_is_ignored(tmp_path, gz):
    """Reference: the same files without the BOM. A UTF-8 BOM (Windows editors, Excel) at the start of
    a task JSONL, a TSV, a parallel pair and SFT JSONL reads as if absent; before, the JSONL's first
    line was invalid JSON and the TSV's first column was named '\\ufeffsentence' (header refused)."""
    from clusterlm.data.sft import read_records

    def write(name: str, text: str) -> Path:
        path = tmp_path / (name + (".gz" if gz else ""))
        data = ("\ufeff" + text).encode("utf-8")
        path.write_bytes(gzip.compress(data) if gz else data)
        return path

    jsonl = write("qa.jsonl", '{"prompt": "Q", "references": ["A"]}\n')
    assert load_task(jsonl).examples[0].prompt == "Q"
    tsv = write("dev.tsv", "sentence\tlabel\nfine .\t1\nbad .\t0\n")
    assert [e.text for e in load_task(tsv).examples] == ["fine .", "bad ."]
    src, tgt = write("t.en", "Hello\n"), write("t.fr", "Bonjour\n")
    assert load_task((src, tgt)).examples[0].references == ("Bonjour",)
    assert "\ufeff" not in load_task((src, tgt)).examples[0].prompt
    sft = write("sft.jsonl", '{"prompt": "p", "completion": "c"}\n')
    assert read_records(str(sft), "sft")[0].prompt == "p"
    assert read_records(str(tsv), "classify")[0].text == "fine ."


def test_labels_that_mix_integers_and_words_warn_once_naming_a_line(tmp_path, caplog):
    """{"label": "pos"}, {"label": "neg"} and one {"label": 1}: three classes (pos, neg and "1"), said only
    in an INFO line. Now one warning names both kinds and the line of the rarer one; a set of words alone,
    or integers alone, says nothing."""
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(6)] + [{"text": "x", "label": 1}]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="clusterlm"):
        task = load_task(mixed, kind="classify")
    assert task.labels == ("1", "neg", "pos")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "mix integers (1) and words (neg, pos)" in warned[0], warned
    assert "make 3 classes; line 7 has label '1'" in warned[0], warned
    caplog.clear()
    for labels in (("pos", "neg"), (0, 1)):
        plain = tmp_path / f"plain{labels[0]}.jsonl"
        plain.write_text("".join(json.dumps({"text": f"t{i}", "label": labels[i % 2]}) + "\n" for i in range(4)))
        with caplog.at_level("WARNING", logger="clusterlm"):
            load_task(plain, kind="classify")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
