"""`clusterlm generate --pack`: fp32 packed weights (the default) give the same greedy text as the
weights as loaded (`none`); bf16 runs where the CPU has AVX512-BF16/AMX and is refused, naming why and
what to use, where it has not."""

from __future__ import annotations

import io

import pytest

from clusterlm.generate.cli import generate_main
from clusterlm.optimize.packed import bf16_unavailable
from tests.e2e.test_serve_multi import TEXT
from tests.helpers import random_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("pack"), "byte", TEXT, bpe_vocab=0, n_layers=2, context=64)


def _generate(run, pack: str) -> str:
    out = io.StringIO()
    generate_main([str(run), "--prompt", "Line 3:", "--temperature", "0", "--max-new-tokens", "24", "--pack", pack],
                  out=out)
    return out.getvalue()


def test_packed_and_plain_weights_give_the_same_greedy_text(run):
    plain = _generate(run, "none")
    assert plain.startswith("Line 3:") and len(plain) > len("Line 3:")
    assert _generate(run, "fp32") == plain == _generate(run, "auto")


def test_bf16_runs_or_is_refused_with_the_reason(run):
    problem = bf16_unavailable()
    if problem is None:
        assert _generate(run, "bf16").startswith("Line 3:")
    else:
        with pytest.raises(ValueError, match="--pack bf16: .*use --pack auto"):
            _generate(run, "bf16")
