"""``push_to_hub``: each finished student uploaded to a Hugging Face hub repository (off unless the recipe names one).

The students are ordinary ``save_pretrained`` directories (safetensors, config, tokenizer, ``train_info.json``);
they are pushed with ``huggingface_hub`` (``create_repo`` + ``upload_folder``) after the run's report is written,
one repository per run: ``repo`` may hold ``{run}``, the run's name, and must when a recipe has several runs.
What a push needs is checked before anything is trained: the hub not switched off (``HF_HUB_OFFLINE``) and a
token (``HF_TOKEN`` or ``huggingface-cli login``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import PotstillError

# what a student directory holds besides its weights that a hub repository should not: the completion marker
_SKIP = ["POTSTILL_DONE", ".*"]


def repo_for(repo: str, run: str) -> str:
    return repo.replace("{run}", run)


def check_push(cfg, run_names: list[str]) -> None:
    """Refuse, in one line and before training, a push that cannot happen."""
    if cfg is None:
        return
    if len(run_names) > 1 and "{run}" not in cfg.repo:
        raise PotstillError(
            f"push_to_hub.repo '{cfg.repo}' would receive all {len(run_names)} runs; put {{run}} in "
            "it (e.g. you/student-{run})"
        )
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PotstillError(
            "push_to_hub: the hub is switched off here (HF_HUB_OFFLINE=1); unset it or remove push_to_hub"
        )
    if get_token() is None:
        raise PotstillError(
            "push_to_hub needs a hub token; set HF_TOKEN or run `huggingface-cli login`, or remove push_to_hub"
        )


def push_students(cfg, runs_dir: Path, run_names: list[str]) -> dict[str, str]:
    """Upload ``runs_dir/<run>`` of every run; returns ``{run: repository url}``."""
    from huggingface_hub import HfApi

    api = HfApi()
    urls = {}
    for name in run_names:
        repo_id = repo_for(cfg.repo, name)
        try:
            url = api.create_repo(repo_id, private=cfg.private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(runs_dir / name),
                ignore_patterns=_SKIP,
                commit_message=f"potstill: student '{name}'",
            )
        except Exception as err:  # noqa: BLE001 - network, auth and name errors all end here, in one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise PotstillError(
                f"push_to_hub: uploading run {name} to '{repo_id}' failed ({first}); the student "
                f"is saved in {runs_dir / name}"
            ) from None
        urls[name] = str(url)
    return urls
