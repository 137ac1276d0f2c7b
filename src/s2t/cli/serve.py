"""``s2t serve``: an OpenAI-compatible endpoint for one method (a thin layer over :mod:`s2t.serving`)."""

from __future__ import annotations

from typing import Annotated

import typer

from s2t.cli.app import (
    BackendOpt,
    CalibrationProblemsOpt,
    DataDirOpt,
    DecodeDtypeOpt,
    KOpt,
    LLMDeviceMapOpt,
    LLMDtypeOpt,
    LLMOpt,
    MinStepOpt,
    QuantileOpt,
    RatioOpt,
    SelectorOpt,
    SLMOpt,
    ThresholdOpt,
    TriggerOpt,
    app,
    console,
    fail,
)
from s2t.models import DEFAULT_LLM, DEFAULT_SLM

SERVED_METHODS = ("greedy", "s2t", "takeover", "random-select", "s2t-local")


@app.command()
def serve(
    method: Annotated[str, typer.Option(help=f"The method served: {', '.join(SERVED_METHODS)}.")] = "greedy",
    selector: SelectorOpt = None,
    slm: SLMOpt = DEFAULT_SLM,
    llm: LLMOpt = DEFAULT_LLM,
    trigger: TriggerOpt = "entropy",
    threshold: ThresholdOpt = None,
    quantile: QuantileOpt = None,
    k: KOpt = 8,
    ratio: RatioOpt = None,
    min_step: MinStepOpt = 3,
    calibration_problems: CalibrationProblemsOpt = 8,
    data_dir: DataDirOpt = None,
    dtype: DecodeDtypeOpt = None,
    llm_dtype: LLMDtypeOpt = None,
    llm_device_map: LLMDeviceMapOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="Sequences decoded together; others wait.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="New tokens for requests that give no max_tokens.")] = 512,
    context_length: Annotated[
        int | None, typer.Option(help="Prompt + max_tokens limit (default: the SLM's position limit).")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The name clients pass as `model` (default: the SLM's name).")
    ] = None,
    backend: BackendOpt = "auto",
) -> None:
    """Serve one method over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health.

    The method, trigger, K and selector are fixed here; each request sets its own max_tokens,
    temperature, top_p, stop and seed. The LLM is loaded only if the method needs it.
    """
    from s2t.backends import make_generator, resolve_backend
    from s2t.cli.generate import cli_method
    from s2t.local.selector import selector_directory
    from s2t.serving import create_app
    from s2t.serving.server import serve as run_server

    try:
        if method not in SERVED_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(SERVED_METHODS)}")
        if method == "s2t-local":
            selector_directory(selector)  # a missing --selector fails before the SLM is loaded
        chosen = resolve_backend(backend, [slm, llm], [method], trigger)
        gen = make_generator(
            chosen, slm, llm, dtype=dtype, llm_dtype=llm_dtype, llm_device_map=llm_device_map
        )
        decoder, local_selector = gen.local_selector(selector) if method == "s2t-local" else (gen, None)
        method_obj = cli_method(
            gen, method, local_selector, trigger=trigger, threshold=threshold, quantile=quantile, k=k,
            ratio=ratio, min_step=min_step, calibration_problems=calibration_problems, data_dir=data_dir,
        )  # fmt: skip
        scheduler = decoder.scheduler(method_obj, max_batch_size=max_batch_size)
        positions = getattr(getattr(decoder.slm.model, "config", None), "max_position_embeddings", None)
        limit = context_length or getattr(decoder.slm.model, "n_ctx", None) or positions or 4096
        name = model_name or gen.slm.name
        server_app = create_app(
            scheduler, gen.tokenizer, model_name=name, context_length=limit, default_max_tokens=max_tokens
        )
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        fail(str(e))
    llm_note = "LLM loaded" if gen.llm_loaded else "no LLM loaded"
    console.print(f"serving [bold]{name}[/] with {method} ({llm_note}) on http://{host}:{port}/v1")
    run_server(server_app, host=host, port=port)
