"""``push_to_hub``: off by default; a push that cannot happen is refused before training; each student goes to its
own repository. The hub itself is out of reach here (no network, ``HF_HUB_OFFLINE=1``): the upload wiring is
checked with ``huggingface_hub``'s two calls recorded instead of sent."""

import pytest
from helpers import recipe, write

from potstill.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "push,words",
    [
        ({"repo": "me/student-{run}"}, "HF_HUB_OFFLINE=1"),
        ({"repo": "me/student"}, "would receive all 2 runs; put {run}"),
    ],
)
def test_a_push_that_cannot_happen_is_refused_before_training(assets, tmp_path, capsys, push, words):
    r = recipe(assets, tmp_path / "out", push_to_hub=push)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_each_finished_student_goes_to_its_own_repository(assets, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    calls = []
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://huggingface.co/{repo_id}",
    )

    def upload(self, *, repo_id, folder_path, ignore_patterns, commit_message):
        from pathlib import Path

        calls.append(("upload", repo_id, Path(folder_path), ignore_patterns))

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    out = tmp_path / "out"
    assert (
        main(
            ["distill", str(write(tmp_path / "r.yaml", recipe(assets, out, push_to_hub={"repo": "me/student-{run}"})))]
        )
        == 0
    )
    assert [c[:2] for c in calls] == [
        ("create", "me/student-sft"),
        ("upload", "me/student-sft"),
        ("create", "me/student-kd"),
        ("upload", "me/student-kd"),
    ]
    assert all(c[2] == {"private": True, "exist_ok": True} for c in calls if c[0] == "create")
    for _, repo, folder, skip in (c for c in calls if c[0] == "upload"):
        assert folder == out / "runs" / repo.split("-")[-1] and (folder / "model.safetensors").is_file()
        assert "POTSTILL_DONE" in skip
