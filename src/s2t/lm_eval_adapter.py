"""An lm-evaluation-harness model backend: ``--model s2t`` decodes with any S2T method.

Importing this module registers the model ``s2t`` with lm-eval (``pip install
"select-to-think[lm-eval]"``); ``import s2t`` never needs lm-eval. lm-eval only knows models
that are imported before it runs, so run it through this module, which registers the model and
then hands its arguments to lm-eval's own command line::

    python -m s2t.lm_eval_adapter run --model s2t --tasks gsm8k --apply_chat_template \\
        --model_args slm=qwen2.5-coder-0.5b-instruct,llm=qwen2.5-coder-1.5b-instruct,method=s2t,threshold=1.0

or from Python: ``import s2t.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="s2t", ...)``,
or pass an :class:`S2TLM` instance as ``model=``.

Model arguments: ``slm``, ``llm`` (names, directories, .gguf files or Hub ids, as everywhere
in s2t), ``method`` (``greedy``, ``s2t``, ``takeover``, ``random-select``, ``llm`` or
``s2t-local`` with ``selector=DIR``), ``trigger``, ``threshold``, ``quantile`` (without a
threshold the trigger is calibrated as this quantile on ``calibration_problems`` GSM8K *train*
problems, with ``max_new_tokens`` new tokens each, as ``s2t generate`` and ``s2t eval`` do), ``k``, ``ratio``, ``min_step``, ``dtype``, ``llm_dtype``, ``llm_device_map``,
``batch_size``, ``max_new_tokens`` (the default when a request gives no ``max_gen_toks``) and
``max_length`` (prompts longer than ``max_length - max_gen_toks`` keep their last tokens).

Only ``generate_until`` is supported: S2T is a decoding method, and log-likelihoods of given
text are just the SLM's (use lm-eval's ``hf`` model for those). Contexts are decoded as raw
prompts; with ``--apply_chat_template`` lm-eval first renders them with the SLM's chat template
(:meth:`S2TLM.apply_chat_template`), and ``--system_instruction`` sets the system message.
Generation stops at EOS or ``max_gen_toks``; the text is then cut at the first ``until`` string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from s2t.api import S2TGenerator
from s2t.engine import decode
from s2t.methods import CalibrationSource, MethodSpec
from s2t.models import DEFAULT_LLM, DEFAULT_SLM

logger = logging.getLogger(__name__)

LM_EVAL_INSTALL_HINT = 'pip install "select-to-think[lm-eval]"'

try:  # optional dependency: without it the class exists but cannot be built, and nothing is registered
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models lazily, so they stay available)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
except ImportError:  # pragma: no cover - exercised only where lm-eval is missing
    LM = object
    model_registry = register_model = None


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def _generation_settings(gen_kwargs: dict, default_max: int) -> tuple[tuple[str, ...], int, float, float]:
    """(stop strings, max new tokens, temperature, top_p) from an lm-eval request's generation kwargs."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = next(
        (kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kwargs.get(k) is not None),
        default_max,
    )
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    top_p = float(kwargs.get("top_p") or 1.0)
    return tuple(until), int(max_gen), temperature, top_p


class S2TLM(LM):
    """lm-eval's ``LM`` interface over :class:`~s2t.api.S2TGenerator` (``generate_until`` only)."""

    def __init__(
        self,
        slm: str = DEFAULT_SLM,
        llm: str | None = DEFAULT_LLM,
        method: str = "s2t",
        trigger: str = "entropy",
        threshold: float | None = None,
        quantile: float | None = 0.95,
        k: int = 8,
        ratio: float | None = None,
        min_step: int = 3,
        selector: str | None = None,
        dtype: str | None = None,
        llm_dtype: str | None = None,
        llm_device_map: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 8,
        max_new_tokens: int = 512,
        max_length: int | None = None,
        calibration_problems: int = 8,
        seed: int = 0,
        generator: S2TGenerator | None = None,
        **unused: Any,
    ):
        if register_model is None:
            raise ImportError(f"the lm-eval adapter needs lm-eval: {LM_EVAL_INSTALL_HINT}")
        super().__init__()
        # the whole method is checked before any model loads
        self.spec = MethodSpec.parse(
            method,
            trigger=trigger,
            threshold=threshold,
            quantile=quantile,
            k=k,
            ratio=ratio,
            min_step=min_step,
            selector=selector,
            calibration=CalibrationSource(problems=calibration_problems, max_new_tokens=max_new_tokens),
        )
        if unused:
            logger.info("s2t lm-eval adapter: ignoring arguments %s", sorted(unused))
        if device and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():  # lm-eval's --device defaults to cuda
                logger.warning("device=%s asked for but CUDA is not available; using the CPU", device)
                device = "cpu"
        self.generator = generator or S2TGenerator(
            slm, llm=llm, dtype=dtype, device=device, llm_dtype=llm_dtype, llm_device_map=llm_device_map
        )
        # lm-eval passes --batch_size through; "auto" (or nothing) means our default
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = max_length
        self.seed = seed
        self.method_name = method
        # the same resolver as `s2t generate`: a LoRA selector decodes with its adapter merged in
        self.resolved = self.generator.resolve(self.spec)
        self.method = self.resolved.method
        if self.spec.needs_calibration:
            logger.info("calibrated the %s trigger: threshold %.4g", trigger, self.method.trigger.threshold)

    # -- chat templating (used by lm-eval when --apply_chat_template is given) --

    @property
    def tokenizer_name(self) -> str:
        return self.generator.slm.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.generator.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.generator.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- requests --

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Answer each ``Instance`` (``args = (context, gen_kwargs)``), in batches of equal settings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args[0], (request.args[1] if len(request.args) > 1 else {})
            settings.append((context, _generation_settings(gen_kwargs, self.max_new_tokens)))
            groups.setdefault(settings[-1][1], []).append(i)
        bar = tqdm(total=len(requests), desc="s2t generate_until", disable=disable_tqdm)
        for (until, max_gen, temperature, top_p), indices in groups.items():
            # longest prompts first, so that a batch holds prompts of similar length
            indices = sorted(indices, key=lambda i: -len(settings[i][0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self._generate(
                    [settings[i][0] for i in batch],
                    max_gen,
                    temperature,
                    top_p,
                    seeds=[self.seed * 1_000_003 + i for i in batch],
                )
                for i, text in zip(batch, texts):
                    results[i] = truncate_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(
        self, contexts: list[str], max_gen: int, temperature: float, top_p: float, seeds: list[int]
    ) -> list[str]:
        gen = self.generator
        prompts = [gen.tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
        if self.max_length:
            keep = max(1, self.max_length - max_gen)
            prompts = [p[-keep:] for p in prompts]
        r = self.resolved
        outs = decode(
            r.decoder.model,
            prompts,
            r.method,
            llm=r.llm,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            **gen.decode_kwargs(max_gen, r.decoder),
        )
        return [gen.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "the s2t model only generates (generate_until tasks such as gsm8k); S2T changes decoding, "
            "not the likelihood of given text: use lm-eval's `hf` model on the SLM for loglikelihood tasks"
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "the s2t model only generates (generate_until tasks); use lm-eval's `hf` model on the SLM "
            "for perplexity (loglikelihood_rolling) tasks"
        )


if register_model is not None:
    if __name__ == "__main__":
        # Run as a script: register the importable class (lazily), not this __main__ copy of it.
        model_registry.register("s2t", target="s2t.lm_eval_adapter:S2TLM")
    else:
        register_model("s2t")(S2TLM)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``s2t`` model registered (``python -m s2t.lm_eval_adapter ...``)."""
    import sys

    if register_model is None:
        raise SystemExit(f"lm-eval is not installed: {LM_EVAL_INSTALL_HINT}")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
