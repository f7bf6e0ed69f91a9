"""examples/diffusion/folders.py: where a command will write is checked by really writing (and
removing) a file, without creating anything; new timestamped folders never reuse a name."""

import os

import pytest

from examples.diffusion.folders import FolderError, check_can_create, check_writable, new_timestamped_folder


def test_a_missing_folder_under_a_writable_one_passes_and_nothing_is_created(tmp_path):
    check_can_create(tmp_path / "a" / "b" / "c", "--results-dir")
    check_writable(tmp_path, "the run folder")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_path_is_refused(path):
    with pytest.raises(FolderError, match="must name a folder"):
        check_can_create(path, "--out")


def test_a_read_only_folder_is_refused_naming_it(tmp_path, make_read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(ro)
    with pytest.raises(FolderError, match=f"the run folder '{ro}' is not writable: "):
        check_writable(ro, "the run folder")
    with pytest.raises(FolderError, match=f"--out '{ro / 'x' / 'y'}': its parent '{ro}' is not writable"):
        check_can_create(ro / "x" / "y", "--out")


def test_new_folders_made_in_the_same_second_get_distinct_names(tmp_path):
    made = [new_timestamped_folder(tmp_path / "samples", "steps5_eta1", stamp="2026-01-01_00-00-00") for _ in range(3)]
    assert [p.name for p in made] == ["2026-01-01_00-00-00_steps5_eta1", "2026-01-01_00-00-00_steps5_eta1_1",
                                      "2026-01-01_00-00-00_steps5_eta1_2"]
    assert all(p.is_dir() for p in made)
