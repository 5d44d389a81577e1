"""Run configuration: TOML + overrides -> typed frozen dataclasses, with pointed errors."""

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from clusterlm.config import (
    RunConfig,
    load_run_config,
    parse_override,
    resolve,
    to_toml,
)
from clusterlm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_overrides_apply_in_order(tmp_path):
    """Overrides are applied after the file, later ones win; values are parsed as TOML."""
    p = write(tmp_path, """
        [train]
        max_steps = 10
        [optim]
        lr = 1e-3
    """)
    cfg = load_run_config(p, ["--train.max_steps=20", "--optim.lr=3e-4", "--train.max_steps=30",
                              "--train.out_dir=runs/x", "--train.compile=true"])
    assert cfg.train.max_steps == 30
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.out_dir == "runs/x"
    assert cfg.train.compile is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 1  # type: ignore[misc]


def test_unknown_key_suggests_close_match(tmp_path):
    """A typo names the key and the close match."""
    with pytest.raises(ConfigError, match=r"unknown key 'train\.max_step'.*did you mean 'train\.max_steps'"):
        load_run_config(None, ["--train.max_step=3"])


def test_key_in_wrong_section_points_to_right_one():
    """`train.lr` is a real key of another section: the message names `optim.lr`."""
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        load_run_config(None, ["--train.lr=1e-3"])


def test_a_key_above_every_section_names_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"'max_steps = 5' stands outside any section; it belongs under \[train\]"):
        load_run_config(write(tmp_path, "max_steps = 5\n[train]\nseq_len = 8\n"), [])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; did you mean \[train\]"):
        resolve({"trian": {"max_steps": 1}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--train.max_steps=abc", "train.max_steps='abc' has type str; expected int"),
        ("--train.max_steps=1.5", "train.max_steps=1.5 has type float; expected int"),
        ("--train.compile=1", "train.compile=1 has type int; expected bool"),
        ("--train.dtype=bf17", "train.dtype='bf17' is not one of"),
        ("--model.n_kv_heads=x", "model.n_kv_heads='x' has type str; expected int | None"),
        # a folder named like a number or boolean: how to quote it
        ("--train.out_dir=5", """expected str (text that reads as a number or boolean is quoted: --train.out_dir='"5"'"""),
        ("--data.dir=true", """--data.dir='"true"' on the command line"""),
        # a list's element: quoted inside the list (there is no --eval.tasks[0]=... override)
        ("--eval.tasks=[1,2]", """eval.tasks[0]=1 has type int; expected str (text that reads as a number or boolean """
                               """is quoted: --eval.tasks='["1", ...]' on the command line)"""),
        ("--train.max_steps=true", "train.max_steps=true has type bool; expected int"),  # TOML's spelling
        ("--train.out_dir=", "train.out_dir='': give the run its own folder"),
        ("--data.dir=.", "data.dir='.': give the prepared data's own folder"),
        ("--train.resume=", "train.resume='': give none, auto or a checkpoint path"),
    ],
)
def test_wrong_type_names_key_value_and_type(override, fragment):
    """Type errors name the key, the value and the expected type."""
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


def test_int_accepted_for_float():
    assert load_run_config(None, ["--optim.lr=1"]).optim.lr == 1.0


def test_validation_message_has_the_arithmetic():
    """ModelConfig validation shows the numbers (STYLE.md)."""
    with pytest.raises(ConfigError, match=r"model.dim=130 is not divisible by model.n_heads=4; "
                                          r"n_heads may be 1, 2, 5, 10, 13, 26, \.\.\. \(a divisor of dim\)"):
        load_run_config(None, ["--model.dim=130"])
    with pytest.raises(ConfigError, match=r"n_heads may be 1, 2, 3, 5, 6, 10, 15, 30 \(a divisor of dim\)$"):
        load_run_config(None, ["--model.dim=30", "--model.n_heads=7"])


@pytest.mark.parametrize("override, fragment", [
    ("--model.n_kv_heads=0", "model.n_kv_heads=0 must be a divisor of model.n_heads=4 (1, 2, 4), or unset"),
    ("--model.n_kv_heads=-2", "model.n_kv_heads=-2 must be a divisor of model.n_heads=4 (1, 2, 4)"),
    ("--model.n_kv_heads=3", "model.n_heads=4 is not divisible by model.n_kv_heads=3; n_kv_heads may be 1, 2, 4"),
    ("--model.ffn_dim=0", "model.ffn_dim=0 must be >= 1"),
    ("--model.ffn_dim=-3", "model.ffn_dim=-3 must be >= 1"),
])
def test_head_and_mlp_sizes_that_cannot_build_are_refused(override, fragment):
    """n_kv_heads=0 read as unset (a silent switch to multi-head attention), a negative n_kv_heads or
    ffn_dim failed in torch when the model was built (ffn_dim=0 built an MLP of zero width); each is
    refused when the config is read, naming the valid values."""
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


def test_checkpoint_validation_names_only_the_wrong_key():
    """--checkpoint.keep_last=0 said "checkpoint.interval=500 must be >= 0, keep_last=0 >= 1", naming
    the valid interval first; each key is now refused on its own, with what would be valid."""
    with pytest.raises(ConfigError) as e:
        load_run_config(None, ["--checkpoint.keep_last=0"])
    assert str(e.value).startswith("checkpoint.keep_last=0 must be >= 1") and "interval" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^checkpoint.interval=-1 must be >= 0 \(0 saves only at the end\)$"):
        load_run_config(None, ["--checkpoint.interval=-1"])


def test_model_preset_with_overrides(tmp_path):
    """`[model] preset = ...` starts from the preset; other keys override it."""
    p = write(tmp_path, """
        [model]
        preset = "gpt2-124m"
        n_layers = 2
    """)
    cfg = load_run_config(p)
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers, cfg.model.vocab_size) == (768, 12, 2, 50257)
    with pytest.raises(ConfigError, match="unknown model preset 'gpt2-125m'.*gpt2-124m"):
        load_run_config(p, ["--model.preset=gpt2-125m"])


def test_toml_round_trip():
    """to_toml(cfg) read back gives the same config."""
    cfg = load_run_config(None, ["--model.preset=llama-nano", "--model.vocab_size=100", "--train.seed=7"])
    again = resolve(tomllib.loads(to_toml(cfg)))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_parse_override_forms():
    assert parse_override("--a.b=3") == (["a", "b"], 3)
    assert parse_override("--a.b=hello world") == (["a", "b"], "hello world")
    assert parse_override('--a.b="quoted"') == (["a", "b"], "quoted")
    assert parse_override("--a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("--a.b=2024-06-01") == (["a", "b"], "2024-06-01")  # TOML dates are names here
    assert parse_override("--a.b=12:30:00") == (["a", "b"], "12:30:00")
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("--a.b")
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("--ab=1")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe .*nope.toml does not exist; give a .toml file or a bundled "
                                                "recipe: .*shakespeare_char_cpu"):
        load_run_config(tmp_path / "nope.toml")
    with pytest.raises(FileNotFoundError, match="is a directory, not a recipe file"):
        load_run_config(tmp_path)


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    """A recipe saved in another encoding (UTF-16, Latin-1) is a ConfigError naming the file and the byte;
    it was "'utf-8' codec can't decode byte 0xff in position 0" with no file named."""
    p = tmp_path / "latin1.toml"
    p.write_bytes("[train]\nout_dir = 'runs/caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 0xe9 at offset 27\)"):
        load_run_config(p)


def test_a_recipe_with_a_byte_order_mark_loads(tmp_path):
    """A recipe saved by a Windows editor starts with a UTF-8 byte order mark; it reads as without one (as
    task and SFT files do). It was "invalid TOML: Invalid statement (at line 1, column 1)"."""
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf[train]\nmax_steps = 3\n")
    assert load_run_config(p).train.max_steps == 3


def test_config_show_cli(tmp_path):
    """`clusterlm config show RECIPE --k=v` prints TOML that resolves to the same config; errors exit 2."""
    p = write(tmp_path, "[train]\nmax_steps = 5\n")
    out = subprocess.run([sys.executable, "-m", "clusterlm", "config", "show", str(p), "--optim.lr=0.002"],
                         capture_output=True, text=True, check=True).stdout
    tree = tomllib.loads(out)
    assert tree["train"]["max_steps"] == 5 and tree["optim"]["lr"] == 0.002
    bad = subprocess.run([sys.executable, "-m", "clusterlm", "config", "show", str(p), "--optim.lrr=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "did you mean 'optim.lr'" in bad.stderr


def _float_keys() -> list[str]:
    """Every float field of every section of RunConfig (model included), as section.key."""
    import typing

    keys = []
    for section in dataclasses.fields(RunConfig):
        if section.metadata.get("internal"):  # RunConfig.given: not a section
            continue
        cls = typing.get_type_hints(RunConfig)[section.name]
        hints = typing.get_type_hints(cls)
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is float]
    return keys


@pytest.mark.parametrize("literal", ["inf", "-inf", "nan"])
def test_every_float_field_rejects_non_finite_values(tmp_path, literal):
    """Issue 12, failure 10: `--optim.lr=inf` trained and exited 3. Every float field of every section
    refuses inf, -inf and nan, from an override and from a TOML file (TOML has inf/nan literals), and
    the message names the key."""
    keys = _float_keys()
    assert {"optim.lr", "optim.eps", "train.grad_clip", "model.rope_theta", "data.val_fraction"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"{key}=.*not a finite number"):
            load_run_config(None, [f"--{key}={literal}"])
        section, name = key.split(".")
        p = write(tmp_path, f"[{section}]\n{name} = {literal}\n")
        with pytest.raises(ConfigError, match=rf"{key}=.*not a finite number"):
            load_run_config(p)


def test_sections_built_in_python_reject_non_finite_values():
    """The same check for configs built directly (the Python API), not through the loader."""
    from clusterlm.config import OptimConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"optim.lr=inf is not a finite number"):
        OptimConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match=r"train.grad_clip=nan is not a finite number"):
        TrainConfig(grad_clip=float("nan"))
    from clusterlm.models.config import ModelConfig

    with pytest.raises(ConfigError, match=r"model.rope_theta=inf must be a finite number"):
        ModelConfig(rope_theta=float("inf"))


def test_rope_with_an_odd_head_dim_names_its_source_and_the_valid_n_heads():
    """An odd head dim under rotary positions was reported as "dim/n_heads = 7" also when it came from
    model.head_size (where dim/n_heads was 8), with no valid choice; now the field it came from is named,
    and for dim/n_heads the n_heads that give an even head dim."""
    from clusterlm.models.config import ModelConfig

    with pytest.raises(ConfigError, match=r"^model.pos='rope' needs an even head dim; model.head_size=7$"):
        ModelConfig(pos="rope", dim=48, n_heads=6, head_size=7)
    with pytest.raises(ConfigError, match=r"model.dim/model.n_heads = 12/4 = 3; n_heads may be 1, 2, 3, 6$"):
        load_run_config(None, ["--model.pos=rope", "--model.dim=12"])
    with pytest.raises(ConfigError, match=r"15/3 = 5; an odd model.dim has no even head dim$"):
        ModelConfig(pos="rope", dim=15, n_heads=3)


@pytest.mark.parametrize("field, value, fragment", [
    ("mlp", "relu", "model.mlp='relu'; expected one of gelu, swiglu"),
    ("norm", "batchnorm", "model.norm='batchnorm'; expected one of layernorm, rmsnorm"),
    ("pos", "alibi", "model.pos='alibi'; expected one of learned, sinusoidal, rope, none"),
])
def test_model_config_built_in_python_rejects_unknown_choices(field, value, fragment):
    """The loader refuses an unknown mlp/norm/pos; ModelConfig built in Python accepted one and built a
    GELU MLP, a LayerNorm or a model with no positions at all, silently."""
    from clusterlm.models.config import ModelConfig

    with pytest.raises(ConfigError) as e:
        ModelConfig(vocab_size=50, **{field: value})
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("--train.seed=-1", "train.seed=-1 must be >= 0"),
    ("--data.vocab_size=-5", "data.vocab_size=-5 must be >= 0"),
    ("--optim.eps=-1e-8", "optim.eps=-1e-08 must be >= 0"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("--plan.predicted_memory_bytes=-1", "plan.predicted_memory_bytes=-1 must be >= 0"),
    ("--train.max_steps=0", "train.max_steps=0 must be >= 1"),
    ("--train.micro_batch_size=0", "train.micro_batch_size=0 must be >= 1"),
    ("--model.rope_theta=0", "model.rope_theta=0.0 and model.norm_eps=1e-05 must be > 0"),
    ("--model.norm_eps=-1e-5", "must be > 0"),
    ("--model.init_std=-0.02", "model.init_std=-0.02 must be >= 0"),
])
def test_absurd_numbers_are_refused_with_the_key(override, fragment):
    """Negative seeds, vocabularies, eps and weight decay failed late (numpy's or torch's own message,
    after the model was built) or not at all; they are refused when the config is read."""
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("--train.max_minutes=1" + "0" * 400, "train.max_minutes"),  # a float field: OverflowError, exit 1
    ("--train.seed=18446744073709551616", "train.seed"),  # 2**64: torch's "Overflow when unpacking long long"
    ("--model.vocab_size=-9223372036854775809", "model.vocab_size"),  # int | None: said "expected int | None"
])
def test_integers_past_64_bits_are_refused_with_the_key(override, key):
    """TOML's integers are 64-bit (tomllib reads any length): one outside is a ConfigError naming the key
    and the range; 2**63 - 1 itself is a value."""
    with pytest.raises(ConfigError, match=rf"^{key}=-?1?\d+ is outside the 64-bit integer range TOML allows "
                                          r"\(-9223372036854775808 \.\. 9223372036854775807\)$"):
        load_run_config(None, [override])
    assert load_run_config(None, ["--train.seed=9223372036854775807"]).train.seed == 2**63 - 1


def test_eval_section(tmp_path):
    """[eval] reads from a recipe and overrides into a typed, frozen section; it is off by default
    and bad values are refused naming the key."""
    from clusterlm.config import EvalConfig

    assert load_run_config(None).eval == EvalConfig() and EvalConfig().tasks == ()
    p = write(tmp_path, '[eval]\ntasks = ["shakespeare_word_order", "qa.jsonl"]\nevery = 250\nlimit = 100\n'
                        'batch_size = 8\nmax_new_tokens = 32\n')
    cfg = load_run_config(p, ["--eval.temperature=0.7", "--eval.seed=3"])
    assert cfg.eval == EvalConfig(tasks=("shakespeare_word_order", "qa.jsonl"), every=250, limit=100, batch_size=8,
                                  max_new_tokens=32, temperature=0.7, seed=3)
    assert load_run_config(None, [f"--{k}" for k in ("eval.tasks=['a']", "eval.truncate=true")]).eval.truncate
    for override, fragment in [
        ("--eval.every=-1", "eval.every=-1 must be >= 0"),
        ("--eval.limit=-2", "eval.limit=-2 must be >= 0"),
        ("--eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
        ("--eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1"),
        ("--eval.temperature=-0.5", "eval.temperature=-0.5 must be >= 0"),
        ("--eval.temperature=nan", "eval.temperature=nan is not a finite number"),
        ("--eval.tasks=['a', 'a']", "eval.tasks lists 'a' more than once"),
        ("--eval.tasks=['']", "eval.tasks[0]='' must be a task name or file"),
        ("--eval.tasks=[1]", "eval.tasks[0]=1 has type int"),
        ("--eval.every=10", "eval.every=10 but eval.tasks is empty"),
        ("--eval.evrey=10", "did you mean 'eval.every'"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_run_config(None, [override])
        assert fragment in str(e.value), override
