"""Issue 12, class 1: a user's mistake gets one line naming the problem, exit 2, no traceback,
and nothing written. Real files and folders; the CLI called as a user would."""

from __future__ import annotations

import pytest

from bd4nn.cli import main
from bd4nn.db import Database, DatabaseError
from bd4nn.train import resolve_device
from localizers import LocalizerError, get_localizer


def _one_line_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_a_file_or_a_missing_or_empty_folder_is_not_a_database(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a database")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    for cmd in ("list", "info", "verify"):
        _one_line_error(capsys, [cmd, str(afile)], "is a file")
        _one_line_error(capsys, [cmd, str(empty)], "no index.jsonl")
        _one_line_error(capsys, [cmd, str(missing)], "does not exist")
    _one_line_error(capsys, ["build", "--db", str(afile), "--profile", "tiny"], "is a file")
    _one_line_error(capsys, ["localize", "--db", str(missing), "--entry", "x", "--localizer", "clp"], "does not exist")
    assert not missing.exists() and list(empty.iterdir()) == [] and afile.read_text() == "not a database"
    with pytest.raises(DatabaseError):
        Database(afile)


@pytest.mark.parametrize("argv,needle", [
    (["models", "vgg13", "--width", "inf"], "finite"),
    (["models", "vgg13", "--width", "nan"], "finite"),
    (["models", "vgg13", "--width", "-1"], "> 0"),
    (["models", "vgg13", "--num-classes", "1.5"], "whole number"),
    (["verify", "db", "--remeasure", "-1"], ">= 0"),
    (["verify", "db", "--tolerance", "-1"], ">= 0"),
    (["localize", "--db", "db", "--entry", "e", "--localizer", "clp", "--clean-images", "-5"], ">= 1"),
    (["list", "db", "--threads", "0"], ">= 1"),
    (["data", "cifar10", "--fraction", "2"], "<= 1"),
])
def test_bad_numbers_are_one_line_usage_errors(argv, needle, capsys):
    _one_line_error(capsys, argv, needle)


def test_unknown_or_absent_devices_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_a_device_this_machine_lacks_is_refused_before_anything_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("bd4nn.build.build_parallel", lambda *a, **k: pytest.fail("the build started"))
    with pytest.raises(SystemExit) as exc:  # argparse: a usage error, exit status 2
        main(["build", "--db", str(tmp_path / "db"), "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("name,settings,needle", [
    ("nc", {"epochs": "abc"}, "whole number"),
    ("nc", {"epochs": -1}, ">= 1"),
    ("nc", {"epochs": 1.5}, "whole number"),
    ("nc", {"lr": float("inf")}, "finite"),
    ("clp", {"u": float("nan")}, "finite"),
    ("clp", {"standardize": 1}, "true or false"),
    ("anp", {"batch_size": 0}, ">= 1"),
    ("deepmufl", {"formula": 3}, "string"),
])
def test_localizer_settings_are_coerced_and_validated(name, settings, needle):
    with pytest.raises(LocalizerError, match=needle):
        get_localizer(name, **settings)


def test_localizer_settings_of_the_right_kind_are_coerced():
    nc = get_localizer("nc", epochs=3, betas=[0.4, 0.8], amp="true")
    assert (nc.settings.epochs, nc.settings.betas, nc.settings.amp) == (3, (0.4, 0.8), True)
    assert get_localizer("deepmufl", max_tests=None).settings.max_tests is None
    assert get_localizer("clp", u=2).settings.u == 2.0




@pytest.mark.parametrize("extra,needle", [
    ('width = "abc"\n', "width must be a finite number"),
    ("width = inf\n", "width must be a finite number"),
    ("train_subset = -5\n", "train_subset must be a whole number >= 1"),
    ("rc_images = 2.5\n", "rc_images must be a whole number"),
    ("[benign]\nepochz = 3\n", "no setting 'epochz'"),
    ('[recipe]\nlr = "fast"\n', "lr='fast' must be a number"),
    ("[recipe]\nepochs = -2\n", "epochs=-2 must be >= 1"),
    ("[benign.vgg13]\nepochs = 2.5\n", "epochs=2.5 must be a whole number"),
])
def test_bad_profile_values_are_one_line_errors(tmp_path, capsys, extra, needle):
    prof = tmp_path / "p.toml"
    prof.write_text('name = "x"\ndatasets = ["cifar10"]\narchs = ["vgg13"]\nattacks = ["badnets"]\n'
                    'levels = ["small"]\n' + extra)
    db = tmp_path / "db"
    _one_line_error(capsys, ["build", "--db", str(db), "--profile", str(prof)], needle)
    assert not db.exists()  # nothing written


def test_main_reports_user_errors_in_one_line_and_lets_bugs_raise(tmp_path, monkeypatch, capsys):
    """Only the user-error types become one line and exit 2; a bug (any other exception, even a
    ValueError or KeyError) keeps its traceback."""
    import dataclasses

    import bd4nn.cli as cli
    from bd4nn.build import ProfileError
    from bd4nn.data import DatasetError
    from bd4nn.errors import BadInputError, UnknownNameError, UserError
    from bd4nn.settings import SettingError

    for t in (DatabaseError, DatasetError, LocalizerError, ProfileError, SettingError, BadInputError,
              UnknownNameError):
        assert issubclass(t, UserError), t

    def raising(exc):
        def run(args):
            raise exc
        return run

    (tmp_path / "index.jsonl").write_text("")
    for exc in (BadInputError("the shard 3/2 is out of range"), UnknownNameError("unknown model 'x'")):
        monkeypatch.setitem(cli.COMMANDS, "list", dataclasses.replace(cli.COMMANDS["list"], run=raising(exc)))
        assert main(["list", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"bd4nn: error: {exc.args[0]}\n"
    for bug in (ValueError("a bug"), KeyError("a bug"), ZeroDivisionError("a bug")):
        monkeypatch.setitem(cli.COMMANDS, "list", dataclasses.replace(cli.COMMANDS["list"], run=raising(bug)))
        with pytest.raises(type(bug)):
            main(["list", str(tmp_path)])
