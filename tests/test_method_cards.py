"""Every method has a card in docs/methods/, and the card's code runs as written.

Python blocks run against a tiny 12-layer HF BERT (``model``), two real batches (``loader``), an
AdamW ``opt`` and ``base_lr``; ``raptr train`` lines are parsed into a validated config (keys,
choices and each method's own checks), ``raptr plan`` lines run.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch

from raptr.cli import main
from raptr.methods import METHODS
from raptr.training.config import load_config

CARDS = Path(__file__).resolve().parent.parent / "docs" / "methods"


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def test_every_registered_method_has_a_card():
    assert {p.stem for p in CARDS.glob("*.md")} >= set(METHODS)


@pytest.fixture
def namespace():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=16))
    ids = torch.randint(5, 100, (2, 16))
    loader = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(0), "labels": ids.flip(0)}]
    return {"model": model, "loader": loader, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3),
            "base_lr": lambda step: 1e-3}


@pytest.mark.parametrize("card", sorted(p.stem for p in CARDS.glob("*.md")))
def test_card_code_runs(card, namespace, capsys):
    path = CARDS / f"{card}.md"
    for code in blocks(path, "python"):
        exec(compile(code, str(path), "exec"), dict(namespace))
    for code in blocks(path, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            argv = shlex.split(line.split("#", 1)[0])
            if argv[:2] == ["raptr", "train"]:
                config = argv[argv.index("--config") + 1]
                load_config(config, [a for a in argv[2:] if "=" in a])
            elif argv[:2] == ["raptr", "plan"]:
                assert main(argv[1:]) == 0, line
