"""``potstill synthesize``: validate a synthesis recipe, load the teacher, and run :func:`potstill.dd.synthesize.synthesize`.

Writes ``synthesis.resolved.yaml`` next to the algorithm's outputs (``rounds/``,
``generations/``, ``synthetic.jsonl``, ``synthesis_report.json``) in the output directory.
"""

from __future__ import annotations

from pathlib import Path

from ..dd.synth_seeds import load_seed_tasks
from ..dd.synth_teacher import TeacherGenerator
from ..dd.synthesize import synthesize
from ..errors import PotstillError
from ..io import atomic_write_text
from ..recipes.synthesize import SynthesisConfig

__all__ = ["load_synthesis_config", "run_synthesis", "synthesis_config_from_dict"]


def synthesis_config_from_dict(
    data: dict | None, overrides: list[str] | None = None, base_dir: Path | None = None
) -> SynthesisConfig:
    """Validate a synthesis recipe (``key=value`` overrides applied); one-line errors."""
    from ..recipes import recipe_from_dict

    return recipe_from_dict(data, overrides or [], base_dir=base_dir, verb="synthesize")  # type: ignore[return-value]


def load_synthesis_config(path: str | Path, overrides: list[str] | None = None) -> SynthesisConfig:
    """Read a YAML synthesis recipe and apply ``key=value`` overrides."""
    from ..recipes import load_recipe

    return load_recipe(path, overrides or [], verb="synthesize")  # type: ignore[return-value]


def as_synthesis_config(cfg: SynthesisConfig | dict) -> SynthesisConfig:
    """``cfg`` itself, or the dict validated by :func:`synthesis_config_from_dict`."""
    if isinstance(cfg, SynthesisConfig):
        return cfg
    if isinstance(cfg, dict):
        return synthesis_config_from_dict(cfg)
    raise PotstillError(f"the synthesis config must be a SynthesisConfig or a dict, not {type(cfg).__name__}")


def run_synthesis(
    cfg: SynthesisConfig | dict,
    output_dir: str | Path | None = None,
    *,
    model=None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """Load the teacher (unless given), synthesize into ``output_dir`` (default ``cfg.output_dir``), report.

    Writes ``synthesis.resolved.yaml``, ``rounds/``, ``generations/``, ``synthetic.jsonl`` and
    ``synthesis_report.json``; rerunning resumes a killed run.
    """
    import yaml

    cfg = as_synthesis_config(cfg)
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    seeds = load_seed_tasks(cfg.seeds_path)
    if (model is None) != (tokenizer is None):
        raise PotstillError("pass both model and tokenizer, or neither (the teacher is then loaded from cfg.teacher)")
    vllm = cfg.generation.backend == "vllm"
    if vllm:
        from ..vllm_engine import VLLMEngine, require_vllm

        require_vllm(cfg.generation.vllm.mode, cfg.device or "cuda")  # before loading the teacher
    if model is None:
        import torch

        from ..models import load_model

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # With vllm the HF copy only fingerprints the weights (and is saved for the engine): kept off the GPU.
        model, tokenizer = load_model(cfg.teacher, dtype=cfg.dtype, device="cpu" if vllm else device)
    engine = (
        VLLMEngine.from_options(
            model, tokenizer, cfg.generation.vllm, device=cfg.device or "cuda", seed=cfg.seed, workdir=out
        )
        if vllm
        else None
    )
    gen = TeacherGenerator(
        model,
        tokenizer,
        out / "generations",
        model_id=cfg.teacher,
        system_prompt=cfg.system_prompt,
        batch_size=cfg.batch_size,
        chunk_size=cfg.chunk_size,
        progress=progress,
        engine=engine,
    )
    atomic_write_text(out / "synthesis.resolved.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    try:
        return synthesize(cfg, gen, out, generator_id=gen.identity, seeds=seeds, teacher=cfg.teacher)
    finally:
        if engine is not None:
            engine.close()
