"""`fasteer generate` applies what `fasteer extract` makes: --add (several), --clamp (targets
from the vector's metadata), --ablate, --feature (SAE feature edits); its greedy text is the
Python API's, and every bad input is one line, exit code 2, before transformers is imported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fasteer as fs
from fasteer.cli import main
from fasteer.demo import language

N_NEW = 16


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """Vector files written by `fasteer extract` on the demo model."""
    root = tmp_path_factory.mktemp("vectors")
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"positive": p, "negative": n})
                               for p, n in language.contrastive_pairs(32)))
    out = {}
    for name, method, layer in (("caa", "caa", "2"), ("caa1", "caa", "1"),
                                ("instr", "instruction", "2"), ("abl", "ablation", "2")):
        out[name] = root / f"{name}.safetensors"
        assert main(["extract", "--pairs", str(pairs), "--method", method, "--layers", layer,
                     "--out", str(out[name]), "--quiet"]) == 0
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(language.neutral_prompts(6)))
    out["prompts"] = prompts
    return out


@pytest.fixture(scope="module")
def demo():
    from fasteer.demo.world import load_demo_model
    return load_demo_model()


def api_texts(demo, prompts, *interventions):
    """The Python API's greedy continuations, as `fasteer generate` prints them."""
    model, tok = demo
    batch = tok(prompts, return_tensors="pt", padding=True)
    ctx = fs.steer(model, *interventions) if interventions else None
    with torch.inference_mode():
        if ctx is None:
            out = model.generate(**batch, max_new_tokens=N_NEW, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        else:
            with ctx:
                out = model.generate(**batch, max_new_tokens=N_NEW, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
    conts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [f"{p} {c.strip()}" for p, c in zip(prompts, conts)]


def cli_texts(capsys, vectors, *steering):
    capsys.readouterr()
    rc = main(["generate", "--prompts-file", str(vectors["prompts"]), "--greedy",
               "--max-new-tokens", str(N_NEW), "--quiet", *steering])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    lines = cap.out.splitlines()
    assert lines[0].startswith("steering: "), cap.out
    texts = [l.split("] steered: ", 1)[1] for l in lines[1:] if "] steered: " in l]
    assert len(texts) == 6, cap.out
    return lines[0], texts


def test_generate_matches_the_python_api(vectors, demo, capsys):
    prompts = vectors["prompts"].read_text().splitlines()
    load = fs.SteeringVector.load
    plain = api_texts(demo, prompts)
    caa, caa1 = load(vectors["caa"]), load(vectors["caa1"])
    instr, abl = load(vectors["instr"]), load(vectors["abl"])
    from fasteer.demo.sae import SAE_DIR
    sae = fs.SAE.load(SAE_DIR)
    cases = [
        (["--clamp", str(vectors["instr"])], [fs.Clamp(instr)], "stored targets"),
        (["--clamp", f"{vectors['instr']}:-20"], [fs.Clamp(instr, value=-20.0)], "to -20"),
        (["--ablate", str(vectors["abl"])], [fs.Ablate(abl)], "ablate"),
        (["--add", f"{vectors['caa']}:1.5", "--add", f"{vectors['caa1']}:1"],
         [fs.Add(caa, alpha=1.5), fs.Add(caa1, alpha=1.0)], "x1.5; add"),
        (["--feature", "demo:73:set:40"], [fs.FeatureEdit(sae, feature=73, op="set", value=40.0)],
         "feature 73 set 40"),
        # order matters and is kept: ablate the CAA direction, then add the layer-1 vector
        (["--ablate", str(vectors["caa"]), "--add", f"{vectors['caa1']}:-1"],
         [fs.Ablate(caa), fs.Add(caa1, alpha=-1.0)], "ablate"),
    ]
    seen = set()
    for argv, ivs, label in cases:
        header, texts = cli_texts(capsys, vectors, *argv)
        assert label in header, header
        assert texts == api_texts(demo, prompts, *ivs), argv
        assert texts != plain, f"{argv} should change the greedy text"
        seen.add(tuple(texts))
    assert len(seen) >= 4, "the steerings should not all give the same text"


def test_vector_and_alpha_still_work(vectors, capsys):
    argv = ["generate", "--prompt", "we found the street .", "--greedy", "--max-new-tokens", "8",
            "--quiet", "--vector", str(vectors["caa"]), "--alpha", "2", "--compare"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[0] unsteered: " in out and "[0] alpha 2: " in out
    assert "steering:" not in out      # the old output, unchanged
    # --vector FILE --alpha A is --add FILE:A
    assert main([*argv[:-5], "--add", f"{vectors['caa']}:2"]) == 0
    new = capsys.readouterr().out
    assert out.splitlines()[-1].split(": ", 1)[1] == new.splitlines()[-1].split(": ", 1)[1]


_ERRORS = r"""
import contextlib, io, json, sys
from fasteer.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue(), "transformers" in sys.modules])
print(json.dumps(results))
"""


def run_isolated(cases):
    """Each argv through fasteer.cli.main in ONE fresh interpreter: (rc, stderr, whether
    transformers had been imported by then)."""
    res = subprocess.run([sys.executable, "-c", _ERRORS, json.dumps([a for a, _ in cases])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bad_steering_input_is_one_line_before_any_heavy_import(vectors, tmp_path):
    wide = tmp_path / "wide.safetensors"
    fs.SteeringVector({2: torch.randn(64)}).save(wide)
    deep = tmp_path / "deep.safetensors"
    fs.SteeringVector({7: torch.randn(128)}).save(deep)
    caa, instr = str(vectors["caa"]), str(vectors["instr"])
    g = ["generate", "--prompt", "hi"]
    cases = [
        (g + ["--add", str(tmp_path / "nope.safetensors") + ":2"], ["--add", "no such file"]),
        (g + ["--clamp", str(tmp_path / "nope.safetensors")], ["--clamp", "no such file"]),
        (g + ["--ablate", str(tmp_path / "nope.gguf")], ["--ablate", "no such file"]),
        (g + ["--vector", str(tmp_path / "nope.gguf")], ["--vector", "no such file"]),
        (g + ["--add", f"{caa}:lots"], ["--add", "ALPHA must be a number"]),
        (g + ["--clamp", caa], ["--clamp", "clamp_targets"]),
        (g + ["--feature", "demo:99999:set:4"], ["--feature", "0..511"]),
        (g + ["--feature", "demo:x:set:4"], ["--feature", "K must be a feature number"]),
        (g + ["--feature", "demo:3:bump:4"], ["--feature", "unknown OP 'bump'"]),
        (g + ["--feature", "demo:3:set:"], ["--feature", "VALUE"]),
        (g + ["--feature", "demo:3:clamp:5,1"], ["--feature", "LO <= HI"]),
        (g + ["--feature", str(tmp_path / "nosae") + ":3:set:4"], ["--feature", "no such SAE"]),
        (g + ["--add", str(wide)], ["--add", "hidden size 64", "128"]),
        (g + ["--ablate", str(deep)], ["--ablate", "layers [7]"]),
        (g + ["--add", caa, "--layers", "9"], ["--layers", "0..3"]),
        (g + ["--clamp", instr, "--layers", "1"], ["--clamp", "no target for layers [1]"]),
        (g + ["--alpha", "2"], ["--alpha", "--vector"]),
        (g, ["nothing to steer"]),
    ]
    for (argv, words), (rc, err, tf) in zip(cases, run_isolated(cases)):
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1, (argv, rc, err)
        assert "Traceback" not in err
        for w in words:
            assert w in lines[0], (argv, lines[0])
        assert not tf, f"{argv}: transformers was imported before the error"


def test_alpha_scale_resid_is_passed_to_add(vectors, monkeypatch, capsys):
    """--alpha-scale resid becomes fs.Add(..., scale="resid"); raw passes no scale=."""
    from fasteer.commands import _common, generate
    seen = []

    class Spy:
        def __init__(self, *a, **k):
            seen.append(k)
            raise ValueError("stop here")
    monkeypatch.setattr(fs, "Add", Spy)
    monkeypatch.setattr(_common, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for scale in ("raw", "resid"):
        assert main(["generate", "--prompt", "hi", "--add", f"{vectors['caa']}:0.5",
                     "--alpha-scale", scale]) == 2
        assert "stop here" in capsys.readouterr().err
    assert "scale" not in seen[0] and seen[1]["scale"] == "resid"
    assert seen[1]["alpha"] == 0.5
    assert generate.SCALES == ("raw", "resid")
