"""``fuse --search`` end to end through the CLI on tiny real models (MLPs, a VGG and a ResNet):
the table and chosen settings in ``--json``, progress on stderr, the printed command reproducing
the searched output bit for bit, and the options that command uses (``--mapping``,
``--refit-head``)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from clafuse import api
from clafuse.align.mapfile import read_map
from clafuse.report import render_search
from clafuse.io.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from tests.cli_runner import invoke
from tests.helpers import mlp

BUILD, TOTAL = 120, 400


def _data(path: Path, shape: tuple[int, ...], classes: int, seed: int = 0) -> Path:
    gen = np.random.default_rng(seed)
    np.savez(path, x=gen.standard_normal((TOTAL, *shape)).astype(np.float32), y=gen.integers(0, classes, TOTAL))
    return path


@pytest.fixture(scope="module")
def mlps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    save_checkpoint(root / "a.safetensors", mlp([20, 16, 12, 10], inputs=12, classes=4, seed=0).state_dict())
    save_checkpoint(root / "b.safetensors", mlp([18, 12], inputs=12, classes=4, seed=1).state_dict())
    save_checkpoint(root / "c.safetensors", mlp([16, 14, 10], inputs=12, classes=4, seed=2).state_dict())
    _data(root / "x.npz", (12,), 4)
    api.align([root / "a.safetensors", root / "b.safetensors"], root / "map.json", data=str(root / "x.npz"),
              samples=BUILD)
    api.align([root / "a.safetensors", root / "b.safetensors", root / "c.safetensors"], root / "map3.json",
              data=str(root / "x.npz"), samples=BUILD)
    return root


def _repeat(command: str, out: Path, cwd: Path) -> tuple[list[str], object]:
    args = shlex.split(command)
    assert args[:2] == ["clafuse", "fuse"]
    args = args[1:]
    args[args.index("-o") + 1] = str(out)
    return args, invoke(*args, cwd=cwd)


def _same(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _search_and_repeat(root: Path, map_name: str, *extra: object) -> dict:
    out = root / f"searched-{map_name}-{'-'.join(map(str, extra))}.safetensors"
    run = invoke("fuse", "--map", root / map_name, "-o", out, "--search", *extra, "--json", "--progress", cwd=root)
    assert run.code == 0, run
    doc = json.loads(run.stdout)
    search = doc["search"]
    assert run.progress.count("progress: candidate ") == len(search["table"]) > 1
    assert search["table"][0]["stage"] == "start"
    assert search["score"]["objective"] == max(r["objective"] for r in search["table"])
    meta = json.loads(read_metadata(out)["search"])
    assert meta["command"] == search["command"] and meta["chosen"] == search["chosen"]
    again = root / f"again-{out.name}"
    args, rerun = _repeat(search["command"], again, root)
    assert rerun.code == 0, rerun
    assert "--search" not in args
    _same(out, again)
    assert "search" not in json.loads(invoke(*args, "--json", cwd=root).stdout)
    return doc


@pytest.mark.parametrize("target", ["deep", "shallow"])
def test_search_output_is_repeated_bit_for_bit_by_its_command(mlps: Path, target: str) -> None:
    doc = _search_and_repeat(mlps, "map.json", "--target", target, "--budget", "10")
    search = doc["search"]
    assert len(search["table"]) == 10 and search["stopped"] == "budget (candidates)"
    assert {"parent 0", "parent 1", "ensemble"} <= set(search["references"])
    chosen = search["chosen"]
    assert doc["weights"] == pytest.approx(list(reversed(chosen["weights"])) if target == "shallow"
                                           else chosen["weights"])
    assert doc["refit_head"] == chosen["refit_head"] and doc["correction"] == chosen["correction"]


def test_search_of_three_models_with_accuracy_scoring_and_a_time_budget(mlps: Path) -> None:
    doc = _search_and_repeat(mlps, "map3.json", "--budget", "1000s", "--scoring", "accuracy")
    search = doc["search"]
    assert search["stopped"] == "converged" and search["scoring"] == "accuracy"
    assert all("accuracy" in r for r in search["table"]) and len(search["chosen"]["weights"]) == 3
    assert len({tuple(r["mappings"]) for r in search["table"]}) > 1, "the alignment's other mappings were tried"


def test_search_from_fewer_samples_rebuilds_its_choice_from_the_usual_count(mlps: Path) -> None:
    """With --samples below the map's count, candidates are built from --samples and scored on
    held-out samples; the chosen settings are then built from the map's count, as plain fuse
    draws it (the repeat command says so), or, with --no-rebuild, from --samples as scored. At the
    map's count there is nothing to give back. --no-rebuild without --search is refused."""
    half = BUILD // 2
    default = _search_and_repeat(mlps, "map.json", "--budget", "4", "--samples", half)["search"]
    assert default["scored_samples"] == half and default["chosen"]["samples"] == BUILD
    assert {r["samples"] for r in default["table"]} == {half} and f"--samples {BUILD}" in default["command"]
    kept = _search_and_repeat(mlps, "map.json", "--budget", "4", "--samples", half, "--no-rebuild")["search"]
    assert kept["scored_samples"] == kept["chosen"]["samples"] == half and f"--samples {half}" in kept["command"]
    untimed = lambda table: [{k: v for k, v in r.items() if k != "seconds"} for r in table]  # noqa: E731
    assert untimed(kept["table"]) == untimed(default["table"])
    usual = _search_and_repeat(mlps, "map.json", "--budget", "4")["search"]
    assert usual["scored_samples"] == usual["chosen"]["samples"] == BUILD
    console = Console(record=True, width=200)
    render_search(default, ["A", "B"], console)
    assert f"chosen on {half} build samples, then rebuilt from {BUILD}" in console.export_text()
    run = invoke("fuse", "--map", mlps / "map.json", "-o", mlps / "n.safetensors", "--no-rebuild", cwd=mlps)
    assert run.code == 2 and "--no-rebuild" in run.stderr and not (mlps / "n.safetensors").exists()


def test_terminal_report_shows_the_table_and_the_command(mlps: Path) -> None:
    run = invoke("fuse", "--map", mlps / "map.json", "-o", mlps / "t.safetensors", "--search", "--budget", "3",
                 cwd=mlps)
    assert run.code == 0, run
    assert "search: 3 candidates" in run.stdout and "to repeat this fusion without search" in run.stdout
    assert "clafuse fuse --map" in run.stdout and "ensemble:" in run.stdout and "model B:" in run.stdout


def test_explicit_weights_do_not_search_and_fuse_as_before(mlps: Path) -> None:
    plain, weighted = mlps / "plain.safetensors", mlps / "weighted.safetensors"
    report = api.fuse(mlps / "map.json", weighted, weights="0.5,0.5")
    api.fuse(mlps / "map.json", plain)
    _same(plain, weighted)
    assert "search" not in report and report["refit_head"] is False
    both = invoke("fuse", "--map", mlps / "map.json", "-o", mlps / "x.safetensors", "--search", "--weights", "1,1")
    assert both.code == 2 and both.stderr.strip().startswith("clafuse: error: --weights fixes the fusion")
    assert len(both.stderr.strip().splitlines()) == 1 and not (mlps / "x.safetensors").exists()
    for args in (["--budget", "5"], ["--scoring", "kl"]):
        run = invoke("fuse", "--map", mlps / "map.json", "-o", mlps / "x.safetensors", *args)
        assert run.code == 2 and "add --search" in run.stderr
    for args, message in ((["--budget", "soon"], "--budget must be"), (["--scoring", "vibes"], "--scoring")):
        run = invoke("fuse", "--map", mlps / "map.json", "-o", mlps / "x.safetensors", "--search", *args)
        assert run.code == 2 and message in run.stderr, run


def test_mapping_option_replaces_the_maps_mapping(mlps: Path, tmp_path: Path) -> None:
    doc = read_map(mlps / "map.json")
    other = next(m for m in ([0, 2], [1, 3]) if m != doc.alignments[0].groups[0].mapping)
    text_option = "B=" + ",".join(map(str, other))
    edited = doc.model_copy(deep=True)
    edited.alignments[0].groups[0].mapping = other
    text = edited.model_dump_json()
    (mlps / "edited.json").write_text(text)
    by_option, by_map = tmp_path / "option.safetensors", tmp_path / "map.safetensors"
    report = api.fuse(mlps / "map.json", by_option, mapping=[text_option])
    api.fuse(mlps / "edited.json", by_map)
    _same(by_option, by_map)
    assert report["mapping"] == [other]
    assert json.loads(read_metadata(by_option)["settings"])["mapping"] == {"B": [other]}
    for bad, message in (("B=0", "invalid layer mapping"), ("B=3,1", "invalid layer mapping"),
                         ("B=0,4", "invalid layer mapping"), ("A=0,1", "is the target"), ("Z=0", "model letter"),
                         ("B=0,x", "integers"), ("B=0/2", "alignment groups"), ("B0,1", "LETTER=")):
        run = invoke("fuse", "--map", mlps / "map.json", "-o", tmp_path / "bad.safetensors", "--mapping", bad)
        assert run.code == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, (bad, run)
    twice = invoke("fuse", "--map", mlps / "map.json", "-o", tmp_path / "bad.safetensors", "--mapping", "B=0,2",
                   "--mapping", "B=1,3")
    assert twice.code == 2 and "twice" in twice.stderr


def test_refit_head_changes_only_the_head_towards_the_ensemble(mlps: Path, tmp_path: Path) -> None:
    plain, refit = tmp_path / "plain.safetensors", tmp_path / "refit.safetensors"
    api.fuse(mlps / "map.json", plain, correction="none")
    report = api.fuse(mlps / "map.json", refit, correction="none", refit_head=True)
    assert report["refit_head"] is True
    sp, sr = load_checkpoint(plain), load_checkpoint(refit)
    head = max(k for k in sp if k.endswith(".weight"))  # the last Linear of the Sequential
    changed = {k for k in sp if not torch.equal(sp[k], sr[k])}
    assert changed == {head, head.replace("weight", "bias")}
    x = torch.from_numpy(np.load(mlps / "x.npz")["x"])[-100:]
    parents = [api.load_model(mlps / n).module() for n in ("a.safetensors", "b.safetensors")]
    with torch.no_grad():
        ensemble = sum(torch.softmax(p(x), 1) for p in parents) / 2
        models = [api.load_model(p).module() for p in (plain, refit)]
        kl = [float(torch.nn.functional.kl_div(torch.log_softmax(m(x), 1), ensemble, reduction="batchmean"))
              for m in models]
    assert kl[1] < kl[0]
    no_data = mlps / "nodata.json"
    api.align([mlps / "a.safetensors", mlps / "b.safetensors"], no_data, metric="neuron")
    for flag in ("--refit-head", "--search"):
        run = invoke("fuse", "--map", no_data, "-o", tmp_path / "n.safetensors", flag)
        assert run.code == 2 and "needs calibration data" in run.stderr, run


def test_search_refuses_a_test_split(mlps: Path, tmp_path: Path) -> None:
    run = invoke("fuse", "--map", mlps / "map.json", "-o", tmp_path / "t.safetensors", "--search",
                 "--data", "digits:test")
    assert run.code == 2 and "test split" in run.stderr, run


def test_search_on_vggs(tmp_path: Path) -> None:
    from tests.test_vgg import DEEP, SHALLOW, random_state, small_spec

    save_checkpoint(tmp_path / "deep.safetensors", random_state(small_spec(DEEP, [16, 16], bn=True), 10))
    save_checkpoint(tmp_path / "shallow.safetensors", random_state(small_spec(SHALLOW, [16], bn=True), 11))
    _data(tmp_path / "x.npz", (1, 16, 16), 5)
    api.align([tmp_path / "shallow.safetensors", tmp_path / "deep.safetensors"], tmp_path / "map.json",
              data=str(tmp_path / "x.npz"), samples=64, pin_last=False)
    doc = _search_and_repeat(tmp_path, "map.json", "--budget", "4")
    assert doc["family"] == "vgg" and doc["search"]["chosen"]["inserted"] == "keep"


def test_search_on_resnets(tmp_path: Path) -> None:
    from clafuse.arch.resnet import ResNetSpec
    from tests.test_resnet import random_state

    def spec(layers: list[int]) -> ResNetSpec:
        return ResNetSpec(block="basic", layers=layers, widths=[4, 8], stem_width=4, stem="small", num_classes=3)

    save_checkpoint(tmp_path / "deep.safetensors", random_state(spec([2, 2]), 1))
    save_checkpoint(tmp_path / "shallow.safetensors", random_state(spec([1, 1]), 2))
    _data(tmp_path / "x.npz", (3, 8, 8), 3)
    api.align([tmp_path / "deep.safetensors", tmp_path / "shallow.safetensors"], tmp_path / "map.json",
              data=str(tmp_path / "x.npz"), samples=48)
    for target in ("deep", "shallow"):
        doc = _search_and_repeat(tmp_path, "map.json", "--budget", "4", "--target", target)
        assert doc["family"] == "resnet"


def test_search_of_text_encoders_scores_sentence_embeddings_and_is_repeated(tmp_path: Path) -> None:
    """BERT model folders: the search tokenizes the calibration sentences, scores candidates by
    cosine agreement with the parents' mean sentence embedding (the default for encoders), and the
    printed command writes the same model folder; class-prediction scorings and --refit-head are
    refused with one line."""
    from bert_helpers import random_bert, tiny_spec, write_folder
    from clafuse.io.hf_folder import read_hf_folder

    deep = write_folder(tmp_path / "deep", tiny_spec(3), random_bert(tiny_spec(3), 0))
    shallow = write_folder(tmp_path / "shallow", tiny_spec(2), random_bert(tiny_spec(2), 1))
    words = "the a cat dog sat on mat ran far fox over lazy".split()
    gen = np.random.default_rng(0)
    (tmp_path / "s.txt").write_text("\n".join(" ".join(gen.choice(words, 3 + i % 6)) for i in range(60)) + "\n")
    assert invoke("align", deep, shallow, "--data", tmp_path / "s.txt", "-o", tmp_path / "map.json").code == 0
    run = invoke("fuse", "--map", "map.json", "-o", "out", "--target", "shallow", "--search", "--budget", "6",
                 "--samples", "40", "--json", "--progress", cwd=tmp_path)
    assert run.code == 0, run
    search = json.loads(run.stdout)["search"]
    assert search["scoring"] == "cosine" and search["holdout_samples"] == 20 and len(search["table"]) == 6
    assert all(0 < r["cosine"] <= 1 and not r["refit"] for r in search["table"])
    assert run.progress.count("progress: candidate ") == 6 and "cosine 0." in run.progress
    args, again = _repeat(search["command"], tmp_path / "again", tmp_path)
    assert again.code == 0, again
    first, second = read_hf_folder(tmp_path / "out").state_dict, read_hf_folder(tmp_path / "again").state_dict
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    shown = invoke("fuse", "--map", tmp_path / "map.json", "-o", tmp_path / "shown", "--target", "shallow", "--search",
                   "--budget", "3", "--samples", "40", cwd=tmp_path.parent)  # the map's bare "s.txt" is beside it
    assert shown.code == 0 and "cosine" in shown.stdout and "clafuse fuse --map" in shown.stdout, shown
    for extra, said in ((["--scoring", "kl"], "--scoring cosine"), (["--refit-head"], "--refit-head")):
        r = invoke("fuse", "--map", "map.json", "-o", "x", "--search", *extra, cwd=tmp_path)
        assert r.code != 0 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r


def test_reference_makes_a_teacher_alone_the_yardstick(mlps: Path) -> None:
    """Teacher into student: with --reference A the search scores candidates against A's outputs
    alone (A itself then scores a KL of 0) and the head refit fits A's logits; the printed command
    repeats it bit for bit. Without --search or --refit-head, or with an unknown letter, refused."""
    doc = _search_and_repeat(mlps, "map.json", "--target", "B", "--reference", "A", "--budget", "10")
    search = doc["search"]
    assert doc["reference"] == ["A"] and search["references"]["parent 1"]["kl"] == pytest.approx(0, abs=1e-9)
    assert search["references"]["parent 0"]["kl"] > 0 and "ensemble" in search["references"]
    if search["chosen"]["refit_head"]:
        assert "--reference A" in search["command"]
    outs = {}
    for extra in ((), ("--reference", "A")):
        out = mlps / f"refit{len(extra)}.safetensors"
        run = invoke("fuse", "--map", "map.json", "-o", out, "--target", "B", "--refit-head", *extra, cwd=mlps)
        assert run.code == 0, run
        outs[len(extra)] = load_checkpoint(out)
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])
    for extra, said in ((("--reference", "A"), "--reference sets"), (("--search", "--reference", "C"), "letters")):
        r = invoke("fuse", "--map", "map.json", "-o", mlps / "x.safetensors", *extra, cwd=mlps)
        assert r.code != 0 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r


def test_score_data_keeps_validation_out_of_the_build(mlps: Path) -> None:
    """--score-data: candidates are built from the calibration samples plain fuse uses and scored
    on all of another labelled source; the printed command (which needs no --score-data)
    repeats the output bit for bit. A test split, or --score-data without --search, is refused."""
    gen = np.random.default_rng(7)
    np.savez(mlps / "val.npz", x=gen.standard_normal((150, 12)).astype(np.float32), y=gen.integers(0, 4, 150))
    doc = _search_and_repeat(mlps, "map.json", "--scoring", "accuracy", "--score-data", "val.npz", "--budget", "6")
    search = doc["search"]
    assert search["holdout_samples"] == 150 and search["score_data"] == "val.npz"
    assert "--score-data" not in shlex.split(search["command"]) and all("accuracy" in r for r in search["table"])
    np.savez(mlps / "wide.npz", x=gen.standard_normal((20, 30)).astype(np.float32), y=gen.integers(0, 4, 20))
    for extra, said in ((("--search", "--score-data", "mnist:test"), "test split"),
                        (("--score-data", "val.npz"), "add --search"),
                        (("--search", "--score-data", "wide.npz"), "--score-data wide.npz")):
        r = invoke("fuse", "--map", "map.json", "-o", mlps / "x.safetensors", *extra, cwd=mlps)
        assert r.code != 0 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r


@pytest.mark.parametrize("weights,expected", [([0.0, 1.0], "all weight on model B"), ([0.3, 0.7], None)])
def test_terminal_report_says_when_the_search_chose_one_model_alone(weights: list[float], expected: str | None) -> None:
    """A search whose best candidate puts all weight on one model returns that model (corrected),
    not a fusion; the report says so instead of letting the table imply a mix."""
    row = {"index": 0, "stage": "start", "weights": weights, "mappings": [0], "inserted": "keep",
           "correction": "regress", "refit": True, "samples": 100, "kl": 0.01, "agreement": 0.99,
           "objective": -0.01, "seconds": 0.1}
    search = {"scoring": "kl", "holdout_samples": 50, "score_data": None, "stopped": "converged",
              "chosen": {"weights": weights, "mappings": [0], "inserted": "keep", "correction": "regress",
                         "refit_head": True, "samples": 100},
              "table": [row], "references": {}, "seconds": 0.5, "command": "clafuse fuse --map m.json -o x"}
    console = Console(record=True, width=200)
    render_search(search, ["A", "B"], console)
    text = console.export_text()
    if expected is None:
        assert "all weight on" not in text
    else:
        assert expected in text and "with the correction and the head refit, not a fusion" in text
