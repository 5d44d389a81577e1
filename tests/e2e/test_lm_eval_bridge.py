"""The lm-evaluation-harness bridge (clusterlm/eval/lm_eval_bridge.py), offline, on a tiny trained model.

References: the same local multiple-choice task scored by `clusterlm eval --task` (eval.harness) gives
the same acc and acc_norm, and the same per-choice log-likelihoods, through lm-eval's simple_evaluate
(a local task YAML over the same JSONL, tests/unit/fixtures/lm_eval/); generate_until and
loglikelihood_rolling equal clusterlm.eval.lm called directly, and rolling equals lm-eval's
definition for a text within the context (loglikelihood of the text after the separator).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]' (scripts/setup.sh does)")

from clusterlm.cli import main as cli  # noqa: E402
from tests.helpers import train_tiny_byte_run

FIXTURES = Path(__file__).resolve().parent.parent / "unit" / "fixtures" / "lm_eval"
TASK = "clusterlm_choice_fixture"  # the task name in choice.yaml
TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(300))


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access: datasets and huggingface_hub offline, their caches in a temporary folder."""
    cache = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache),
                     "HF_DATASETS_CACHE": str(cache / "datasets")}.items():
            mp.setenv(k, v)
        import datasets.config  # read at its import; patched in case an earlier test imported it

        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A byte-level llama-nano (context 64) trained 30 steps on a tiny corpus (as test_eval_tasks.py)."""
    return train_tiny_byte_run(tmp_path_factory.mktemp("bridge"), TEXT, context=64)


@pytest.fixture(scope="module")
def bridge(run):
    from clusterlm.eval.lm_eval_bridge import ClusterLM

    return ClusterLM(checkpoint=str(run), batch_size=4, device="cpu")


def _instance(kind: str, args: tuple, i: int = 0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _eval(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_choice_task_same_scores_through_lm_eval(run, tmp_path, capsys, monkeypatch):
    """choice.jsonl scored by `clusterlm eval --task` and choice.yaml (the same records) by lm-eval,
    from the command line and through simple_evaluate(model="clusterlm"): equal acc and acc_norm, and
    every choice's log-likelihood equal."""
    from clusterlm.eval.lm_eval_bridge import register

    samples = tmp_path / "samples.jsonl"
    ours = _eval(capsys, str(run), "--task", str(FIXTURES / "choice.jsonl"), "--samples", str(samples),
                 "--batch-size", "4")["tasks"]["choice"]
    assert ours["n"] == 16
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # a task where the two metrics differ

    monkeypatch.chdir(FIXTURES)  # the YAML's data_files is relative, datasets' rule
    cli_res = _eval(capsys, str(run), "--lm-eval", TASK, "--lm-eval-include", str(FIXTURES), "--batch-size", "4")
    theirs = cli_res["results"][TASK]
    assert cli_res["n-samples"][TASK]["effective"] == 16
    assert cli_res["lm_eval_version"] == lm_eval.__version__
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)

    register()
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model="clusterlm", model_args=f"checkpoint={run},batch_size=16,device=cpu",
                                  tasks=[TASK], task_manager=TaskManager(include_path=str(FIXTURES),
                                                                         include_defaults=False),
                                  log_samples=True)
    assert res["results"][TASK]["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert res["results"][TASK]["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    ours_ll = {r["line"]: r["logprobs"] for r in map(json.loads, samples.read_text().splitlines())}
    for s in res["samples"][TASK]:
        ll = [r[0][0] for r in s["resps"]]
        assert ll == pytest.approx(ours_ll[s["doc_id"] + 1], abs=1e-5)


def test_a_task_in_the_include_folder_is_found_without_indexing_lm_evals_own():
    """--lm-eval-include DIR with plain tasks that are all in DIR: lm-eval's TaskManager indexes DIR
    alone (its thousands of bundled YAMLs took ~18 s of every such eval); a task not there, or a group
    (it may name bundled tasks), indexes both."""
    from lm_eval.tasks import TaskManager

    from clusterlm.eval.lm_eval_bridge import _task_manager

    made = []

    class Recording(TaskManager):
        def __init__(self, **kw) -> None:
            made.append(kw.get("include_defaults", True))
            if kw.get("include_defaults", True):  # stand-in for the full index: DIR's tasks only, quickly
                kw = {**kw, "include_defaults": False}
            super().__init__(**kw)

    assert _task_manager(Recording, [TASK], [str(FIXTURES)]).all_tasks == [TASK] and made == [False]
    made.clear()
    _task_manager(Recording, [TASK, "hellaswag"], [str(FIXTURES)])
    assert made == [False, True]
    made.clear()
    _task_manager(Recording, ["hellaswag"], [])
    assert made == [True]


def test_register_keeps_lm_eval_models():
    """register() adds "clusterlm" and lm-eval's own models stay reachable (its registry is filled
    only when found empty)."""
    from lm_eval.api.registry import get_model, model_registry

    from clusterlm.eval.lm_eval_bridge import ClusterLM, register

    register()
    register()  # idempotent
    assert get_model("clusterlm") is ClusterLM
    assert "hf" in model_registry and "dummy" in model_registry


def _cut(text: str, stops: list[str]) -> str:
    return text[:min([text.index(s) for s in stops if s in text], default=len(text))]


def test_generate_until_honours_stop_strings(run, bridge):
    """generate_until equals the stop-free greedy generation cut before the first of `until` (and
    lm.generate_batch with the same stops), at most max_gen_toks tokens; requests with other settings
    in the same call come back in input order."""
    from clusterlm.eval import lm

    prompts = [f"Line {i}: the quick" for i in (5, 17, 250)]
    free = lm.generate_batch(bridge.model, bridge.tokenizer, prompts, max_new_tokens=30)
    until = ["he t", "\n"]
    assert any(_cut(f, until) != f for f in free)  # a stop string does cut the text
    reqs = [_instance("generate_until", (p, {"until": until, "max_gen_toks": 30, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    reqs.insert(1, _instance("generate_until", (prompts[0], {"until": "\n", "max_gen_toks": 5}), 3))
    out = bridge.generate_until(reqs)
    assert out[0:1] + out[2:] == [_cut(f, until) for f in free]
    assert out[0:1] + out[2:] == lm.generate_batch(bridge.model, bridge.tokenizer, prompts, max_new_tokens=30,
                                                   stops=until)
    assert out[1] == _cut(free[0][:5], ["\n"])  # byte tokenizer: 5 tokens are 5 characters here
    assert all("he t" not in o for o in out[0:1] + out[2:]) and all("\n" not in o for o in out)


def test_loglikelihood_rolling_and_loglikelihood(run, bridge):
    """loglikelihood_rolling equals lm.loglikelihood_rolling (a text over the context of 64 tokens:
    several windows); for a text within the context it equals loglikelihood(("", text)), lm-eval's
    definition; loglikelihood returns (logprob, is_greedy) of lm.loglikelihood."""
    from clusterlm.eval import lm

    texts = ["Line 7: the quick brown fox.", TEXT[:200], "x"]
    got = bridge.loglikelihood_rolling([_instance("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    ref = lm.loglikelihood_rolling(bridge.model, bridge.tokenizer, texts)
    assert got == pytest.approx([r[0] for r in ref], abs=1e-6)
    assert ref[1][1] == 200 and ref[1][1] > 64  # byte tokenizer: 200 tokens, 4 windows
    whole = bridge.loglikelihood([_instance("loglikelihood", ("", texts[0]))])[0]
    assert whole[0] == pytest.approx(got[0], abs=1e-4)

    pairs = [("Line 3: the quick", " brown fox"), ("Line 3: the quick ", "brown fox"), ("", "Line")]
    got = bridge.loglikelihood([_instance("loglikelihood", p, i) for i, p in enumerate(pairs)])
    ref = lm.loglikelihood(bridge.model, bridge.tokenizer, pairs)
    assert got == [(r.logprob, r.is_greedy) for r in ref]
    assert got[0] == got[1]  # trailing white space of the context moves to the continuation (lm-eval's rule)


def test_unknown_task_is_one_line(run, capsys):
    """An unknown lm-eval task name: exit 2, one line naming it and a close match."""
    assert cli(["eval", str(run), "--lm-eval", "clusterlm_choice_fixtur", "--lm-eval-include", str(FIXTURES)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clusterlm_choice_fixtur'" in err[0] and TASK in err[0]


def test_generation_settings_follow_lm_eval():
    """lm-eval's normalize_gen_kwargs rules: `until` a string or a list, max_gen_toks before its
    aliases, do_sample false means greedy whatever the temperature; top_p/top_k only when sampling."""
    from clusterlm.eval.lm_eval_bridge import ClusterLM, generation_settings

    s = generation_settings({"until": "\n\n", "max_new_tokens": 7, "max_tokens": 9}, 256)
    assert s == {"stops": ("\n\n",), "max_new_tokens": 7, "temperature": 0.0, "top_p": None, "top_k": None,
                 "seed": None}
    s = generation_settings({"until": ["Q:", "\n"], "max_gen_toks": 3, "max_new_tokens": 7, "do_sample": False,
                             "temperature": 0.8, "top_k": 5}, 256)
    assert (s["stops"], s["max_new_tokens"], s["temperature"], s["top_k"]) == (("Q:", "\n"), 3, 0.0, None)
    s = generation_settings({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3}, 32)
    assert (s["stops"], s["max_new_tokens"], s["temperature"], s["top_p"], s["seed"]) == ((), 32, 0.7, 0.9, 3)
    with pytest.raises(ValueError, match="batch_size=0"):
        ClusterLM(model=object(), tokenizer=object(), batch_size=0)


CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]


def test_chat_model_is_asked_in_its_template_and_stops_at_end_of_turn(tmp_path, monkeypatch):
    """Reference: `clusterlm eval --task`'s prompt and answer for the same chat checkpoint (its template;
    "4", ending at <|end|>: tests/e2e/test_eval_tasks.py). The bridge's apply_chat_template renders the
    checkpoint's template, also inside lm-eval's simple_evaluate(apply_chat_template=True), and leaves
    a gen_prefix open for the model to continue; generate_until ends the reply at <|end|>. Before, the
    bridge used the plain 'User:/Assistant:' template and read on past the end of turn."""
    from lm_eval.tasks import TaskManager

    from clusterlm.eval.lm_eval_bridge import ClusterLM
    from tests.helpers import chat_run

    bridge = ClusterLM(checkpoint=str(chat_run(tmp_path, CHAT, "4")), batch_size=2, device="cpu")
    prompt = bridge.apply_chat_template(CHAT)
    assert prompt == "<|system|>\nBe terse.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    begun = CHAT + [{"role": "assistant", "content": "Answer:"}]
    assert bridge.apply_chat_template(begun, add_generation_prompt=False) == prompt + "Answer:"
    assert bridge.chat_template(True) == (Path(bridge.checkpoint) / "chat_template.jinja").read_text()
    gen = {"until": [], "max_gen_toks": 8}  # no stop string: only <|end|> ends the reply (it read on: '4\n\n\n')
    assert bridge.generate_until([_instance("generate_until", (prompt, gen))]) == ["4"]

    monkeypatch.chdir(FIXTURES)  # the YAML's data_files is relative, datasets' rule
    manager = TaskManager(include_path=str(FIXTURES), include_defaults=False)  # not lm-eval's own tasks: 20 s
    res = lm_eval.simple_evaluate(model=bridge, tasks=[TASK], task_manager=manager, apply_chat_template=True, limit=2,
                                  log_samples=True)
    contexts = {ctx for s in res["samples"][TASK] for ctx, _ in s["arguments"]}  # (context, choice) pairs
    docs = [json.loads(line) for line in (FIXTURES / "choice.jsonl").read_text().splitlines()[:2]]
    assert contexts == {f"<|user|>\n{d['context']}<|end|>\n<|assistant|>\n" for d in docs}


def test_apply_chat_template_from_the_command_line(tmp_path, capsys, monkeypatch):
    """`clusterlm eval --lm-eval T --apply-chat-template` on a chat checkpoint: lm-eval renders the
    prompts with the checkpoint's template (its sha256 in the result, as lm-eval's tracker records it) and the
    scores equal simple_evaluate(apply_chat_template=True) on the bridge; without a chat template
    run the same prompts score otherwise. --apply-chat-template without --lm-eval is refused (exit 2)."""
    import functools
    import hashlib

    import lm_eval.tasks

    from clusterlm.eval.lm_eval_bridge import ClusterLM
    from tests.helpers import chat_run

    run = chat_run(tmp_path, CHAT, "4")
    monkeypatch.chdir(FIXTURES)  # the YAML's data_files is relative, datasets' rule
    # only the fixture task, not lm-eval's own (20 s to index), for the command's TaskManager too
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    args = [str(run), "--lm-eval", TASK, "--lm-eval-include", str(FIXTURES), "--limit", "4", "--batch-size", "4"]
    chat = _eval(capsys, *args, "--apply-chat-template")
    bridge = ClusterLM(checkpoint=str(run), batch_size=4, device="cpu")
    assert "<|assistant|>" in bridge.chat_template(True)  # the checkpoint's own, not the plain one
    assert chat["chat_template_sha256"] == hashlib.sha256(bridge.chat_template(True).encode()).hexdigest()
    direct = lm_eval.simple_evaluate(model=bridge, tasks=[TASK], task_manager=lm_eval.tasks.TaskManager(
        include_path=str(FIXTURES)), apply_chat_template=True, limit=4)
    assert chat["results"][TASK] == direct["results"][TASK]
    plain = _eval(capsys, *args)
    assert "chat_template_sha256" not in plain and plain["results"][TASK] != chat["results"][TASK]
    assert cli(["eval", str(run), "--task", str(FIXTURES / "choice.jsonl"), "--apply-chat-template"]) == 2
    assert "--apply-chat-template is for --lm-eval" in capsys.readouterr().err
