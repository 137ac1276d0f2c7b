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
from s2t.method_names import METHODS
from s2t.models import DEFAULT_LLM, DEFAULT_SLM, check_model_options

# Every named method, the baseline ``llm`` included: it is greedy decoding with the LLM as the
# decoding model (as in ``s2t generate``), and its cost is reported in the LLM columns.
SERVED_METHODS = METHODS


@app.command()
def serve(
    method: Annotated[
        str,
        typer.Option(
            help=f"The method served: {', '.join(SERVED_METHODS)} (a trigger setting may follow a '/')."
        ),
    ] = "greedy",
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
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on (1–65535).")] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Sequences decoded together; others wait.")] = 8,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="New tokens for requests that give no max_tokens.")
    ] = 512,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            min=0,
            help="Read long prompts this many tokens per step, between decoding steps (0: off, read at once).",
        ),
    ] = 512,
    context_length: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Prompt + max_tokens limit (at most the decoding model's position limit; default: that "
            "limit, or 4096 KV cells per sequence on llama.cpp).",
        ),
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
    from s2t.cli.generate import method_specs, resolve_with_status
    from s2t.methods import split_label
    from s2t.serving import create_app
    from s2t.serving.server import serve as run_server

    try:
        base, label = split_label(method.split("/", 1)[0])
        if base not in SERVED_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(SERVED_METHODS)}")
        if label is not None:
            raise ValueError(
                f"method {method!r}: a label tells apart the selectors of one `s2t eval` run directory, "
                f"and a server runs one (--selector); serve {method.replace(':' + label, '', 1)!r}"
            )
        options = dict(
            trigger=trigger,
            threshold=threshold,
            quantile=quantile,
            k=k,
            ratio=ratio,
            min_step=min_step,
            selector=selector,
            slm=slm,
        )
        (spec,) = method_specs(method, options, calibration_problems, max_tokens, data_dir)
        check_model_options(slm, llm, llm_dtype, llm_device_map)  # also where no method loads the LLM
        chosen = resolve_backend(backend, [slm, llm], [spec])
        # on llama.cpp the context length is also the KV cells each sequence gets (default 4,096)
        cells = {"n_ctx": context_length} if chosen == "llama.cpp" and context_length else {}
        gen = make_generator(
            chosen, slm, llm, dtype=dtype, llm_dtype=llm_dtype, llm_device_map=llm_device_map, **cells
        )
        resolved = resolve_with_status(gen, spec)
        scheduler = gen.scheduler(
            resolved, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk or None
        )
        model = resolved.decoder.model
        # what the model's positions allow (torch: its config; llama.cpp: the GGUF's training context)
        most = getattr(model, "n_ctx_train", None) or getattr(
            getattr(model, "config", None), "max_position_embeddings", None
        )
        if context_length is not None and most is not None and context_length > most:
            raise ValueError(
                f"--context-length {context_length} exceeds what {slm if not resolved.llm_alone else llm} "
                f"can read: {most} positions; give at most {most}, or leave it out"
            )
        limit = context_length or getattr(model, "n_ctx", None) or most or 4096
        name = model_name or (gen.llm.name if resolved.llm_alone else gen.slm.name)
        server_app = create_app(
            scheduler,
            gen.tokenizer,
            model_name=name,
            context_length=limit,
            default_max_tokens=max_tokens,
            llm_alone=resolved.llm_alone,
        )
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        fail(str(e))
    llm_note = "LLM loaded" if gen.llm_loaded else "no LLM loaded"
    console.print(
        f"serving [bold]{name}[/] with {method} ({llm_note}) on http://{host}:{port}/v1", soft_wrap=True
    )
    run_server(server_app, host=host, port=port)
