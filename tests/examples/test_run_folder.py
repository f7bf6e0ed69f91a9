"""examples/run_folder.py: a new folder every run, clear one-line exits for an unusable results folder and Ctrl-C."""

from __future__ import annotations

import datetime
import os
import re

import pytest

from examples import run_folder
from examples.run_folder import RunFolderError, new_run_folder, run_in_new_folder


def test_runs_in_the_same_second_get_distinct_timestamped_folders(tmp_path):
    folders = [new_run_folder(tmp_path / "results", "ring8") for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() and f.parent == tmp_path / "results" for f in folders)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_ring8", folders[0].name)
    if folders[0].name == folders[1].name.removesuffix("_2"):  # same second: numbered, never reused
        assert folders[1].name.endswith("_2")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(_\d+)?", new_run_folder(tmp_path / "results").name)


def test_an_existing_folder_of_the_same_name_is_never_reused(tmp_path, monkeypatch):
    fixed = datetime.datetime(2026, 1, 2, 3, 4, 5)

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    monkeypatch.setattr(run_folder.datetime, "datetime", Frozen)
    (tmp_path / "2026-01-02_03-04-05_x").mkdir()
    (tmp_path / "2026-01-02_03-04-05_x" / "metrics.json").write_text("{}")
    assert new_run_folder(tmp_path, "x").name == "2026-01-02_03-04-05_x_2"
    assert new_run_folder(tmp_path, "x").name == "2026-01-02_03-04-05_x_3"
    assert (tmp_path / "2026-01-02_03-04-05_x" / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("label", ["a/b", "..", " x", "a b", "x\n"])
def test_a_label_that_is_not_a_plain_name_is_refused(tmp_path, label):
    if label == "..":
        assert new_run_folder(tmp_path, label).parent == tmp_path  # "<stamp>_.." is a plain name
        return
    with pytest.raises(ValueError, match="label must be"):
        new_run_folder(tmp_path, label)


def test_unusable_results_folders_are_clear_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        new_run_folder(tmp_path / "file")
    with pytest.raises(RunFolderError, match="is under a file"):
        new_run_folder(tmp_path / "file" / "deeper")
    with pytest.raises(RunFolderError, match="empty string"):
        new_run_folder("")


def test_a_read_only_results_folder_is_a_clear_error(tmp_path, monkeypatch):
    # as root a chmod'ed folder stays writable, so the refusal of mkdir is simulated
    real_mkdir = run_folder.Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(run_folder.Path, "mkdir", refuse)
    with pytest.raises(RunFolderError, match=r"cannot make a run folder in .*: Permission denied"):
        new_run_folder(tmp_path)


def test_run_in_new_folder_exits_with_one_line_when_the_folder_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --results-dir: the results folder .* is a file, not a folder$") as e:
        run_in_new_folder(tmp_path / "file", "x", lambda folder: pytest.fail("must not run"))
    assert e.value.code != 0


@pytest.mark.parametrize("writes", [False, True])
def test_ctrl_c_exits_130_with_one_line_and_removes_an_empty_run_folder(tmp_path, capsys, writes):
    def body(folder):
        if writes:
            (folder / "metrics.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_in_new_folder(tmp_path, "x", body)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted; run folder ")
    assert len(os.listdir(tmp_path)) == (1 if writes else 0)
    assert ("holds what was written" in err[0]) == writes


def test_run_in_new_folder_returns_what_the_body_returns(tmp_path):
    assert run_in_new_folder(tmp_path, "x", lambda folder: folder.name).endswith("_x")
