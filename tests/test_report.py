"""``clafuse report`` and the alignment shown in words: exact words for known mappings, the
terminal output of ``align`` and ``fuse`` readable without colour, and the HTML page end to end on
tiny MLPs trained on digits (self-contained: nothing it references lives on the network)."""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clafuse.align.mapfile import MapFile
from clafuse.data import load_source
from clafuse.reporting.mapping import balance_changes, layer_span, mapping_words, pair_views, target_layer_notes
from clafuse.reporting.stats import plan_summary
from tests.cli_runner import invoke

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- the mapping in words, on a hand-written map ----------------------------------------------------


def _map(deep: list[str], shallow: list[str], mapping: list[int], anchor: int = 0) -> MapFile:
    def model(names: list[str], role: str) -> dict:
        return {"path": f"{role}.safetensors", "sha256": "0" * 64, "family": "mlp", "spec": {}, "role": role,
                "groups": [{"name": "hidden", "layers": [{"name": n, "width": 8} for n in names]}]}

    cost = [[0.1 * (i + j) for j in range(len(deep))] for i in range(len(shallow))]
    return MapFile.model_validate({
        "tool": "test", "models": [model(deep, "deep"), model(shallow, "shallow")], "anchor": anchor,
        "settings": {"metric": "neuron", "pin_first": True, "pin_last": True}, "data": None,
        "alignments": [{"deep": 0, "shallow": 1, "groups": [
            {"name": "hidden", "cost": cost, "mapping": mapping, "total_cost": 1.0}]}]})


FC5 = ["fc1", "fc2", "fc3", "fc4", "fc5"]


def test_words_when_identities_go_into_the_shallow_model() -> None:
    view = pair_views(_map(FC5, ["fc1", "fc2", "fc3"], [0, 1, 4]))[0]
    assert mapping_words(view, view.groups[0]) == "B.fc1 -> A.fc1; B.fc2 -> A.fc2; A.fc3-4 identity; B.fc3 -> A.fc5"
    assert balance_changes(view) == ["2 identity layers inserted into B at A.fc3-4 (group hidden)"]


def test_words_when_the_deep_models_layers_are_folded() -> None:
    doc = _map(FC5, ["fc1", "fc2", "fc3"], [0, 2, 4], anchor=1)
    view = pair_views(doc)[0]
    assert mapping_words(view, view.groups[0]) == "B.fc1 -> A.fc1; A.fc2 folded; B.fc2 -> A.fc3; A.fc4 folded; " \
                                                  "B.fc3 -> A.fc5"
    assert balance_changes(view) == ["A.fc2 dropped from A: folded into A.fc3 (group hidden)",
                                     "A.fc4 dropped from A: folded into A.fc5 (group hidden)"]
    assert target_layer_notes(doc, 1) == ["A.fc1", "A.fc3 (A.fc2 folded in)", "A.fc5 (A.fc4 folded in)"]


def test_unmatched_layers_after_the_last_match_fold_into_the_classifier() -> None:
    doc = _map(FC5, ["fc1", "fc2"], [0, 1], anchor=1)
    view = pair_views(doc)[0]
    assert balance_changes(view) == ["A.fc3-5 dropped from A: folded into the classifier (group hidden)"]


def test_target_notes_mark_inserted_identities() -> None:
    assert target_layer_notes(_map(FC5, ["fc1", "fc2", "fc3"], [0, 1, 4]), 0) == \
        ["B.fc1", "B.fc2", "identity in B", "identity in B", "B.fc3"]


def test_target_notes_follow_the_mapping_used_and_mark_carried_logits() -> None:
    """The fusion's own mapping (--mapping, a search) replaces the map's, and layers balancing
    made carry the shallower model's logits say so."""
    doc = _map(FC5, ["fc1", "fc2", "fc3"], [0, 1, 4])
    assert target_layer_notes(doc, 0, {"B": [[0, 1, 2]]}, {"B": ["fc4", "fc5"]}) == \
        ["B.fc1", "B.fc2", "B.fc3", "B's logits carried", "B's logits carried"]
    assert target_layer_notes(doc, 0, {"B": [[0, 1, 2]]}) == \
        ["B.fc1", "B.fc2", "B.fc3", "identity in B", "identity in B"]


def test_a_span_never_hides_a_layer() -> None:
    assert layer_span("A", ["features.3"]) == "A.features.3"
    assert layer_span("A", ["fc3", "fc4", "fc5"]) == "A.fc3-5"
    assert layer_span("A", ["3", "5"]) == "A.3, A.5"  # Sequential indices that skip: listed, not a range
    assert layer_span("A", ["layer1.1", "layer2.0"]) == "A.layer1.1, A.layer2.0"


def test_plan_summary_of_a_permutation_and_of_a_smear() -> None:
    cost = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    permutation = np.eye(3)[[1, 0, 2]] / 3
    summary = plan_summary(cost, permutation)
    assert summary == {"sharpness": 1.0, "nonzeros": 3, "matched_cost": pytest.approx(2 / 3),
                       "mean_cost": pytest.approx(8 / 9)}
    smear = plan_summary(cost, np.full((3, 3), 1 / 9))
    assert smear["sharpness"] == pytest.approx(1 / 3) and smear["nonzeros"] == 9
    assert smear["matched_cost"] == pytest.approx(smear["mean_cost"])


# --- end to end on tiny models ------------------------------------------------------------------------


def _mlp(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, o in zip([64, *widths], widths):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 10))
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deep (4 hidden layers) and shallow (2) MLPs trained on digits, aligned both ways and fused."""
    root = tmp_path_factory.mktemp("report")
    ds = load_source("digits")
    for name, widths, seed in (("deep", [32, 32, 24, 16], 0), ("shallow", [32, 16], 1)):
        model = _mlp(widths, seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(120):
            opt.zero_grad()
            nn.functional.cross_entropy(model(ds.x), ds.y).backward()
            opt.step()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"{name}.safetensors")
    return root


def _ok(*args: object, cwd: Path) -> str:
    outcome = invoke(*args, cwd=cwd)
    assert outcome.code == 0, str(outcome)
    assert "Traceback" not in outcome.stderr
    return outcome.stdout


@pytest.fixture(scope="module")
def aligned(ws: Path) -> dict[str, str]:
    """Terminal output of align (into the deep model) and of fuse with unequal weights."""
    return {
        "align": _ok("align", "deep.safetensors", "shallow.safetensors", "--data", "digits", "--samples", 300,
                     "-o", "map.json", cwd=ws),
        "fuse": _ok("fuse", "--map", "map.json", "-o", "fused.safetensors", "--weights", "0.7,0.3", cwd=ws),
        "align_merge": _ok("align", "deep.safetensors", "shallow.safetensors", "--anchor", "B", "--data", "digits",
                           "--samples", 300, "-o", "map-merge.json", cwd=ws),
        "fuse_merge": _ok("fuse", "--map", "map-merge.json", "-o", "fused-merge.safetensors", "--weights", "0.7,0.3",
                          cwd=ws),
    }


def test_align_prints_the_mapping_in_words_and_marks_chosen_cells(ws: Path, aligned: dict[str, str]) -> None:
    doc = json.loads((ws / "map.json").read_text())
    mapping = doc["alignments"][0]["groups"][0]["mapping"]
    deep = ["1", "3", "5", "7"]
    expected = mapping_words(pair_views(MapFile.model_validate(doc))[0], pair_views(MapFile.model_validate(doc))[0]
                             .groups[0])
    assert f"mapping: {expected}" in aligned["align"]
    assert expected.startswith("B.1 -> A.1;") and expected.endswith("B.3 -> A.7")  # both pins hold
    unmatched = [deep[j] for j in range(4) if j not in mapping]
    assert f"2 identity layers inserted into B at A.{unmatched[0]}, A.{unmatched[1]} (group hidden)" in aligned["align"]
    starred = re.findall(r"\*\d\.\d{3}", aligned["align"])
    assert len(starred) == 2 and "* = chosen" in aligned["align"]


def test_fuse_table_follows_the_weights_order_and_marks_identities(aligned: dict[str, str]) -> None:
    out = aligned["fuse"]
    assert "weights A 0.7, B 0.3" in out
    header = next(line for line in out.splitlines() if "mixing" in line and "layer" in line)
    assert header.index("mixing A") < header.index("mixing B")
    rows = [line for line in out.splitlines() if "identity in B" in line]
    assert len(rows) == 2
    merged = aligned["fuse_merge"]  # target B: B's weight still comes second, as in --weights
    assert "weights A 0.7, B 0.3" in merged
    first = next(line for line in merged.splitlines() if re.match(r"\W*1\W", line))
    assert re.search(r"0\.70\W+0\.30", first), merged
    assert "folded in" in merged


def test_report_page_is_self_contained_and_names_every_change(ws: Path, aligned: dict[str, str]) -> None:
    out = _ok("report", "map.json", "--fused", "fused.safetensors", "--data", "digits", "-o", "report.html",
              "--png-dir", "figures", cwd=ws)
    assert "report written to report.html (2 PNGs in figures)" in out
    page = (ws / "report.html").read_text()
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    view = pair_views(MapFile.model_validate(json.loads((ws / "map.json").read_text())))[0]
    assert f'<p class="mapping">{escape(mapping_words(view, view.groups[0]))}</p>' in page
    for change in balance_changes(view):
        assert f"<li>{escape(change)}</li>" in page
    assert "Neuron transport per matched layer pair" in page and "Accuracy on digits" in page
    assert page.count("identity (passes on B.1)") == 2
    pngs = sorted((ws / "figures").iterdir())
    assert [p.name for p in pngs] == ["align-B-into-A-hidden.png", "fused-similarity.png"]
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)


def test_report_numbers(ws: Path, aligned: dict[str, str]) -> None:
    doc = json.loads(_ok("report", "map-merge.json", "--fused", "fused-merge.safetensors", "--data", "digits",
                         "-o", "merge.html", "--json", cwd=ws))
    assert doc["target"] == "B"
    (section,) = doc["alignments"]
    # two layers pinned at both ends of four: A's middle layers 3 and 5 fold into its last, 7
    assert section["mapping"] == {"hidden": "B.1 -> A.1; A.3, A.5 folded; B.3 -> A.7"}
    assert section["changes"] == ["A.3, A.5 dropped from A: folded into A.7 (group hidden)"]
    for stats in section["transport"]:
        assert stats["source"].startswith("A.") and stats["target"].startswith("B.")
        assert stats["sharpness"] == pytest.approx(1.0)  # equal widths, exact solver: a permutation
        assert stats["nonzeros"] == stats["n_source"] == stats["n_target"]
        assert 0 <= stats["matched_cost"] < stats["mean_cost"]
    for row in doc["fused"]["similarity"]:
        assert set(row["similarity"]) == {"A", "B"} and all(0 <= v <= 1 + 1e-9 for v in row["similarity"].values())
    models = [r["model"] for r in doc["fused"]["accuracy"]]
    assert models == ["A", "B", "ensemble", "fused"]
    assert all(0 < r["accuracy"] <= 1 for r in doc["fused"]["accuracy"])


def test_report_without_fused_and_data_free_map(ws: Path, aligned: dict[str, str]) -> None:
    _ok("align", "deep.safetensors", "shallow.safetensors", "--metric", "neuron", "-o", "neuron.json", cwd=ws)
    doc = json.loads(_ok("report", "neuron.json", "-o", "neuron.html", "--json", cwd=ws))
    assert doc["alignments"][0]["transport"] is None and doc["fused"] is None
    assert any("no calibration data" in n for n in doc["notes"])
    with_data = json.loads(_ok("report", "neuron.json", "-o", "neuron.html", "--data", "digits", "--samples", 100,
                               "--json", cwd=ws))
    assert with_data["calibration"] == "digits (100 samples)" and len(with_data["alignments"][0]["transport"]) == 2


@pytest.mark.parametrize("args, expect", [
    (["map.json", "-o", "missing/r.html"], "directory missing does not exist"),
    (["map.json", "-o", "r.html", "--solver", "greedy"], "--solver: 'greedy' is not one of emd, sinkhorn"),
    (["map.json", "-o", "r.html", "--fused", "shallow-twin.safetensors"], "architecture of none of the map's models"),
    (["nothing.json", "-o", "r.html"], "no such map file"),
])
def test_report_errors_are_one_line(ws: Path, aligned: dict[str, str], args: list[str], expect: str) -> None:
    state = {"0.weight": torch.zeros(5, 64), "0.bias": torch.zeros(5), "2.weight": torch.zeros(10, 5),
             "2.bias": torch.zeros(10)}
    save_file(state, ws / "shallow-twin.safetensors")
    outcome = invoke("report", *args, cwd=ws)
    assert outcome.code == 2, str(outcome)
    assert outcome.stderr.strip().count("\n") == 0 and outcome.stderr.startswith("clafuse: error:")
    assert expect in outcome.stderr
    assert not (ws / "r.html").exists()


def test_report_help_lists_its_options() -> None:
    outcome = invoke("report", "--help")
    assert outcome.code == 0
    for option in ("--fused", "--data", "--png-dir", "--solver", "--json"):
        assert option in outcome.stdout
