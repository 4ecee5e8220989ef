"""Every known bad input ends in one ``error:`` line, a non-zero exit and no traceback, and never
reaches the CLI's last-resort handler (which is for bugs)."""

import json

import pytest

from raptr.cli import main

P12 = ["plan", "--layers", "12"]
TRAIN = ["train", "--config", "bert-tiny-raptr"]


def _files(tmp):
    (tmp / "a_file").write_text("x")
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 200)
    (tmp / "bad.yaml").write_text("model: {d_model: [\n")
    (tmp / "loop.yaml").write_text("inherit: loop.yaml\nname: x\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "arms_strings.yaml").write_text("name: c\nbase: bert-tiny-baseline\narms: [standard, raptr]\n")
    (tmp / "no_arms.yaml").write_text("name: c\nbase: bert-tiny-baseline\n")
    (tmp / "dup_arms.yaml").write_text("name: c\nbase: bert-tiny-baseline\narms: [{name: a}, {name: a}]\n")
    (tmp / "bad_match.yaml").write_text("name: c\nbase: bert-tiny-baseline\nbaseline: a\narms: [{name: a, match_flops_of: zz}]\n")
    for name, summary, metrics in (("binary", b"\x00\xff\x00", True), ("notjson", b"{steps: 3", True),
                                   ("nometrics", json.dumps({"steps": 1, "total_steps": 1}).encode(), False)):
        run = tmp / f"report_{name}" / "runs" / "r"
        run.mkdir(parents=True)
        (run / "summary.json").write_bytes(summary)
        if metrics:
            (run / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "val_loss": 5.0}\n')
    (tmp / "report_empty" / "runs").mkdir(parents=True)


CASES = {
    # plan
    "plan negative layers": P12[:2] + ["-12", "--schedule", "6-8"],
    "plan zero layers": ["plan", "--layers", "0", "--schedule", "6"],
    "plan leading minus": P12 + ["--schedule=-4-8-12"],
    "plan double minus": P12 + ["--schedule", "6--8-12"],
    "plan trailing minus": P12 + ["--schedule", "6-8-10-"],
    "plan words": P12 + ["--schedule", "abc"],
    "plan decreasing": P12 + ["--schedule", "8-6-12"],
    "plan too long": P12 + ["--schedule", "6-8-10-13"],
    "plan no full final": P12 + ["--schedule", "6-8-10"],
    "plan negative d-model": P12 + ["--schedule", "6-8-10-12", "--d-model", "-5"],
    "plan head positions": P12 + ["--schedule", "6-8-10-12", "--head-positions", "2"],
    "plan bad target": P12 + ["--target", "1.5"],
    "plan bad prop": P12 + ["--schedule", "6-8-10-12", "--stages", "prop:x"],
    "plan stage count": P12 + ["--schedule", "6-8-10-12", "--stages", "1,2"],
    "plan fixed out of range": P12 + ["--schedule", "6-8-10-12", "--fixed", "99"],
    "plan fixed word": P12 + ["--schedule", "6-8-10-12", "--fixed", "bogus"],
    "plan warmup too long": P12 + ["--schedule", "6-8-10-12", "--full-warmup", "5000"],
    "plan zero steps": P12 + ["--schedule", "6-8-10-12", "--steps", "0"],
    "plan heads do not divide": P12 + ["--schedule", "6-8-10-12", "--d-model", "128", "--heads", "3"],
    "plan zero tolerance": P12 + ["--target", "0.8", "--tolerance", "0"],
    "plan layers not a number": ["plan", "--layers", "abc", "--schedule", "6"],
    "plan unknown flag": P12 + ["--schedule", "6-8-10-12", "--bogus"],
    # train
    "train no such preset": ["train", "--config", "no-such-preset"],
    "train bad yaml": ["train", "--config", "{tmp}/bad.yaml"],
    "train yaml inherits itself": ["train", "--config", "{tmp}/loop.yaml"],
    "train yaml is a list": ["train", "--config", "{tmp}/list.yaml"],
    "train unknown key": TRAIN + ["train.stepz=5"],
    "train steps not int": TRAIN + ["train.steps=abc"],
    "train negative steps": TRAIN + ["train.steps=-3"],
    "train override without =": TRAIN + ["notakeyvalue"],
    "train heads do not divide": TRAIN + ["model.n_heads=3"],
    "train unknown method": TRAIN + ["method.name=magic"],
    "train decreasing schedule": TRAIN + ["method.raptr.schedule=8-6-12"],
    "train leading minus schedule": TRAIN + ["method.raptr.schedule=-4-8-12"],
    "train double minus schedule": TRAIN + ["method.raptr.schedule=6--8-12"],
    "train one beta": TRAIN + ["optim.betas=[0.9]"],
    "train mask rate": TRAIN + ["objective.mask_rate=1.5"],
    "train negative threads": TRAIN + ["train.threads=-1"],
    "train out_dir is a file": TRAIN + ["train.out_dir={tmp}/a_file"],
    "train unknown placeholder": TRAIN + ["train.out_dir=runs/{{nope}}"],
    "train stop after zero": TRAIN + ["--stop-after", "0"],
    "train stop after negative": TRAIN + ["--stop-after", "-5"],
    "train hf bert causal": TRAIN + ["model.family=hf", "objective.name=causal", "model.hf_type=bert"],
    "train missing source": TRAIN + ["data.sources=/no/such/dir", "data.cache_dir={tmp}/cache", "train.out_dir={tmp}/o1"],
    "train binary source": TRAIN + ["data.sources={tmp}/binary.txt", "data.cache_dir={tmp}/cache", "train.out_dir={tmp}/o2"],
    "train latin-1 source": TRAIN + ["data.sources={tmp}/latin1.txt", "data.cache_dir={tmp}/cache", "train.out_dir={tmp}/o3"],
    "train unknown device": TRAIN + ["train.device=tpu"],
    "train stacking end": TRAIN + ["method.name=stacking", "method.stacking.schedule=6-9-11"],
    "train pld theta": TRAIN + ["method.name=pld", "method.pld.theta=2"],
    "train layerdrop zero": TRAIN + ["method.name=layerdrop", "method.layerdrop.keep_prob=0"],
    "train val fraction": TRAIN + ["data.val_fraction=0.7"],
    "train zero lr": TRAIN + ["optim.lr=0"],
    "train unknown flag": TRAIN + ["--bogus-flag"],
    "train precision": TRAIN + ["train.precision=fp8"],
    "train zero width": TRAIN + ["model.d_model=0"],
    "train bool": TRAIN + ["train.compile=maybe"],
    "train section not mapping": TRAIN + ["model=3"],
    # compare
    "compare no such config": ["compare", "--config", "no-such"],
    "compare arms are strings": ["compare", "--config", "{tmp}/arms_strings.yaml"],
    "compare no arms": ["compare", "--config", "{tmp}/no_arms.yaml"],
    "compare duplicate arms": ["compare", "--config", "{tmp}/dup_arms.yaml"],
    "compare unknown match": ["compare", "--config", "{tmp}/bad_match.yaml"],
    "compare unknown arm": ["compare", "--config", "compare/clm-tiny", "--only", "nosucharm", "--results", "{tmp}/r"],
    "compare bad seeds": ["compare", "--config", "compare/clm-tiny", "--seeds", "x,y", "--results", "{tmp}/r"],
    "compare no such seed": ["compare", "--config", "compare/clm-tiny", "--seeds", "7", "--results", "{tmp}/r"],
    "compare zero workers": ["compare", "--config", "compare/clm-tiny", "--workers", "0", "--results", "{tmp}/r"],
    "compare negative budget": ["compare", "--config", "compare/clm-tiny", "--budget", "-1", "--results", "{tmp}/r"],
    "compare results is a file": ["compare", "--config", "compare/clm-tiny", "--results", "{tmp}/a_file"],
    # report
    "report no such dir": ["report", "{tmp}/nowhere"],
    "report binary summary": ["report", "{tmp}/report_binary"],
    "report non-JSON summary": ["report", "{tmp}/report_notjson"],
    "report summary without metrics": ["report", "{tmp}/report_nometrics"],
    "report empty runs": ["report", "{tmp}/report_empty"],
    # data
    "data out is a file": ["data", "--out", "{tmp}/a_file"],
    "data missing source": ["data", "--source", "/no/such/path", "--out", "{tmp}/d1"],
    "data val fraction": ["data", "--val-fraction", "0.9", "--out", "{tmp}/d2"],
    "data binary source": ["data", "--source", "{tmp}/binary.txt", "--out", "{tmp}/d3"],
    # experiment
    "experiment unknown": ["experiment", "nosuch"],
    "experiment unknown preset": ["experiment", "polynomial", "--preset", "nosuch"],
    "experiment probes no runs": ["experiment", "probes", "--runs", "{tmp}/nowhere"],
    # no command
    "no command": [],
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(name, tmp_path, capsys):
    _files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{{", "{").replace("}}", "}") for a in CASES[name]]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exit (usage errors)
        rc = e.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc not in (0, None), (rc, out[-500:], err[-500:])
    assert len(errors) == 1, err
    assert "Traceback" not in err + out and "unexpected" not in errors[0], err


def test_enough_cases():
    assert len(CASES) >= 60
