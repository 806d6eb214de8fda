"""Results files and baselines: keys, directory statistics, regression checks."""

from __future__ import annotations

import json

import pytest

from bd4nn.results import Baseline, case_key, diff_results, directory_lines, read, save_baseline


def _case(loc, entry, wji, t, case="localization", outcome="passed"):
    return {"kind": "case", "case": case, "nodeid": f"bench/test_{case}.py::test_{case}[{loc}-{entry}]",
            "outcome": outcome, "localizer": loc, "entry": entry, "wji": wji, "time_s": t}


def test_case_key_is_kind_localizer_repair_entry_whatever_the_node_id():
    a = _case("clp", "cifar10-vgg13-badnets-narrow-00", 0.5, 0.1)
    assert case_key(a) == "localization:clp:-:cifar10-vgg13-badnets-narrow-00"
    assert case_key({**a, "nodeid": "renamed.py::test_x[anything]"}) == case_key(a)
    assert case_key({**a, "case": "repair", "repair": "prune"}) == "repair:clp:prune:cifar10-vgg13-badnets-narrow-00"
    assert case_key({"case": "database", "entry": "e1"}) == "database:-:-:e1"


def test_directory_lines_count_and_average_kept_entries_only():
    lines = [
        {"dataset": "c", "arch": "v", "attack": "b", "level": "narrow", "kept": True, "ca": 0.8, "asr": 1.0, "asr_cor": 0.9},
        {"dataset": "c", "arch": "v", "attack": "b", "level": "narrow", "kept": True, "ca": 0.6, "asr": 0.9, "asr_cor": 0.7},
        {"dataset": "c", "arch": "v", "attack": "b", "level": "narrow", "kept": False, "ca": 0.1, "asr": 0.1, "asr_cor": 0.0},
        {"dataset": "c", "arch": "v", "attack": "b", "level": "large", "kept": False, "ca": 0.5, "asr": 0.2, "asr_cor": 0.1},
    ]
    out = {d["level"]: d for d in directory_lines(lines, {("c", "v"): 0.85})}
    assert out["narrow"]["kept"] == 2 and out["narrow"]["rejected"] == 1
    assert out["narrow"]["mean_ca"] == pytest.approx(0.7) and out["narrow"]["mean_asr_cor"] == pytest.approx(0.8)
    assert out["large"]["kept"] == 0 and out["large"]["mean_ca"] is None
    assert out["large"]["benign_ca"] == 0.85


def test_baseline_flags_wji_drops_and_slowdowns_beyond_tolerance(tmp_path):
    results = tmp_path / "run.jsonl"
    rows = [{"kind": "header", "schema": 1}, _case("clp", "e1", 0.50, 1.0), _case("nc", "e1", 0.30, 10.0),
            _case("fp", "e1", 0.9, 1.0, outcome="failed")]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "base.jsonl"
    with pytest.raises(ValueError, match="1 cases did not pass.*--partial"):
        save_baseline(results, out)  # a baseline of part of the cases would pass the rest
    assert save_baseline(results, out, partial=True) == 2  # failed cases are not a reference
    base = Baseline.load(out, wji_tol=0.05, time_factor=2.0, time_slack=0.5)
    assert base.compare(_case("clp", "e1", 0.46, 1.0)) == []  # within tolerance
    assert "WJI" in str(base.compare(_case("clp", "e1", 0.44, 1.0))[0])
    assert base.compare(_case("nc", "e1", 0.30, 20.4)) == []  # 2 x 10 + 0.5
    assert "time" in str(base.compare(_case("nc", "e1", 0.30, 20.6))[0])
    assert base.compare(_case("anp", "e1", 0.0, 99.0)) == []  # not in the baseline
    assert base.compare(_case("fp", "e1", 0.0, 1.0)) == []


def test_another_model_is_reported_as_differing_not_compared():
    ref = {**_case("clp", "e1", 0.50, 1.0), "weights_sha": "a" * 16}
    rep = {**ref, "case": "repair", "repair": "prune", "asrd": 0.9, "cad": 0.0}
    base = Baseline({case_key(ref): ref, case_key(rep): rep}, head={"db_fingerprint": "f" * 16})
    same, other = {"weights_sha": "a" * 16}, {"weights_sha": "b" * 16}
    assert base.fingerprint == "f" * 16
    assert [r.metric for r in base.compare({**ref, **same, "wji": 0.1})] == ["WJI"]
    assert base.compare({**ref, **other, "wji": 0.1}) == [] and base.differs({**ref, **other})
    assert not base.differs({**ref, **same}) and not base.differs({k: v for k, v in ref.items() if k != "weights_sha"})
    # a repair case repeats its localization's WJI: a drop is reported on the localization only
    assert [r.metric for r in base.compare({**rep, **same, "wji": 0.1, "asrd": 0.5})] == ["ASRD"]
    assert base.compare({**rep, **other, "wji": 0.1, "asrd": 0.5}) == []


def test_times_scale_with_the_calibration_and_are_not_compared_across_device_kinds():
    ref = _case("nc", "e1", 0.3, 10.0)
    head = {"calibration_s": 0.1, "machine": {"device_kind": "cpu"}}
    base = Baseline({case_key(ref): ref}, time_factor=2.0, time_slack=0.5, head=head)
    assert "unscaled" in base.set_run({})  # a run without calibration: the plain rule, 2 x 10 + 0.5
    assert base.compare(_case("nc", "e1", 0.3, 20.4)) == [] and base.compare(_case("nc", "e1", 0.3, 20.6))
    assert "1.50" in base.set_run({"calibration_s": 0.15, "machine": {"device_kind": "cpu"}})
    assert base.compare(_case("nc", "e1", 0.3, 30.4)) == []  # 2 x 10 x 1.5 + 0.5 on a machine 1.5x slower
    (slow,) = base.compare(_case("nc", "e1", 0.3, 30.6))
    assert slow.metric == "time" and "x 1.50 (calibration)" in slow.limit
    assert "not compared" in base.set_run({"calibration_s": 0.01, "machine": {"device_kind": "NVIDIA H200"}})
    assert base.compare(_case("nc", "e1", 0.3, 1000.0)) == []


def test_read_names_the_corrupt_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"kind": "header"}\n{"kind": "case",\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read(p)
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing.jsonl")


def test_baseline_flags_repair_asrd_drops_and_cad_rises_beyond_tolerance(tmp_path):
    def repair(asrd, cad, outcome="passed"):
        return {"kind": "case", "case": "repair", "nodeid": "bench/test_repair.py::test_repair[clp-prune-e1]",
                "localizer": "clp", "repair": "prune", "entry": "e1",
                "outcome": outcome, "wji": 0.5, "time_s": 1.0, "asrd": asrd, "cad": cad}

    results = tmp_path / "run.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ({"kind": "header", "schema": 1}, repair(0.80, 0.10))))
    base = Baseline.load(results, repair_tol=0.05)
    assert base.compare(repair(0.76, 0.14)) == []  # within 0.05 both ways
    assert base.compare(repair(0.95, 0.00)) == []  # better is never a regression
    assert [str(r).split(": ")[1].split(" ")[0] for r in base.compare(repair(0.74, 0.10))] == ["ASRD"]
    assert [str(r).split(": ")[1].split(" ")[0] for r in base.compare(repair(0.80, 0.16))] == ["CAD"]
    assert len(base.compare(repair(0.50, 0.50))) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**repair(0.8, 0.1), "asrd": "high"}) + "\n")
    with pytest.raises(ValueError, match="asrd must be a finite number"):
        Baseline.load(bad)


def test_a_baseline_without_case_fields_is_refused(tmp_path):
    p = tmp_path / "old.jsonl"
    p.write_text(json.dumps({"kind": "case", "nodeid": "x[clp-e1]", "outcome": "passed", "wji": 0.5}) + "\n")
    with pytest.raises(ValueError, match="no case/entry field"):
        Baseline.load(p)


def test_save_baseline_keeps_the_context_and_refuses_to_overwrite_or_filter(tmp_path):
    head = {"kind": "header", "schema": 1, "options": {"keyword": ""}}
    directory = {"kind": "directory", "dataset": "cifar10", "arch": "vgg13", "attack": "badnets", "level": "narrow",
                 "kept": 1, "rejected": 0, "mean_ca": 0.8}
    case = {**_case("clp", "e1", 0.5, 1.0), "dataset": "cifar10", "arch": "vgg13", "ca": 0.8, "asr": 0.97,
            "scores": [1, 2, 3], "score_max_z": 4.2, "weights_sha": "a" * 16}
    results = tmp_path / "run.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (head, directory, case)))
    out = tmp_path / "base.jsonl"
    assert save_baseline(results, out) == 1
    saved = read(out)
    assert [ln["kind"] for ln in saved] == ["header", "directory", "case"]
    assert saved[2]["ca"] == 0.8 and saved[2]["arch"] == "vgg13" and "scores" not in saved[2]
    assert saved[2]["score_max_z"] == 4.2 and saved[2]["weights_sha"] == "a" * 16  # detection table; same model?
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        save_baseline(results, out)
    assert save_baseline(results, out, overwrite=True) == 1
    filtered = tmp_path / "k.jsonl"
    filtered.write_text("".join(json.dumps(r) + "\n" for r in ({**head, "options": {"keyword": "clp"}}, case)))
    with pytest.raises(ValueError, match="filtered with -k 'clp'"):
        save_baseline(filtered, tmp_path / "k-base.jsonl")


def test_diff_pairs_cases_and_lists_what_changed(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in (_case("clp", "e1", 0.5, 1.0), _case("fp", "e1", 0.2, 1.0))))
    b.write_text("".join(json.dumps(r) + "\n" for r in (_case("clp", "e1", 0.25, 1.0), _case("nc", "e1", 0.1, 9.0))))
    rows = diff_results(a, b)
    assert rows == [["localization:clp:-:e1", "wji", "0.5000", "0.2500", "-0.2500"],
                    ["localization:fp:-:e1", "only in A", "", "", ""],
                    ["localization:nc:-:e1", "only in B", "", "", ""]]
    assert diff_results(a, a) == []
