"""POST /v1/generate: one sampled continuation, by `serve.generate.continue_context`.

The generation loop runs on a thread of its own and sends each onnxruntime call to the model
thread, where it takes its turn with the batches': a long generation delays scoring by a step at
a time, never by its whole length.

The options are serve/generate.py's (tokens, temperature, top-k, top-p, seed); the same seed
gives the same text as `python serve/generate.py --seed`. Limits and errors are answered like
/v1/score's: admission at arrival (503 while `queue_size` requests wait), one deadline from
arrival (504; the generation stops between onnxruntime calls once it passes, the client leaves
(499) or the server shuts down), `tokens` and the prompt's tokens bounded by
`max_tokens_per_text` (413: the prompt is tokenized as a scored text is, before the model
thread sees it, and its context then runs in bounded chunks), a bad option 422, and a model
still loading 503.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from keraslm.errors import UserError
from serve.generate import GenerationStopped, continue_context, generation_context
from serve.web.schemas import ServiceError, timeout_error
from serve.web.service import RequestContext, Service, check_token_bound


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr = Field("", description="text to continue, through the bundle's pipeline")
    tokens: int = Field(50, ge=1, description="tokens to generate (at most max_tokens_per_text)")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False,
                               description="0: greedy; above 1 flatter, below 1 sharper")
    top_k: int = Field(0, ge=0, description="draw only from the k most likely tokens (0: off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1: off)")
    seed: int | None = Field(None, ge=0, description="the same seed gives the same text")


class GenerateResponse(BaseModel):
    bundle: str
    text: str = Field(description="prompt and continuation as readable text")
    tokens: list[str] = Field(description="the generated tokens (the prompt's not included)")


async def generate_text(service: Service, body: GenerateRequest, ctx: RequestContext) -> dict:
    """The answer to one POST /v1/generate admitted as `ctx` (ServiceError for anything but
    200)."""
    scorer = service.check_ready()
    limit = service.settings.max_tokens_per_text
    if body.tokens > limit:
        raise _over_limit(f"{body.tokens} tokens asked for", limit)
    check_token_bound(scorer, body.prompt, limit, "the prompt", open_end=True)
    ctx.admit()
    try:
        prompt, = await service.tokenize(scorer, [body.prompt], ctx, per_token=True,
                                         open_end=True)
    except ServiceError as err:
        raise ServiceError(err.status, err.code, err.message.replace("texts[0]", "the prompt"),
                           limit=err.limit, max=err.max) from None
    context = generation_context(scorer.pipeline, prompt.tokens)

    loop = asyncio.get_running_loop()

    def gave_up() -> bool:  # asked from the generation and model threads: flags and a clock
        return (ctx.disconnected.is_set() or service.closed
                or loop.time() >= ctx.deadline)

    def run():
        if gave_up():  # gone while waiting for a generation thread: nothing spent
            raise GenerationStopped
        return continue_context(scorer.bundle, context, tokens=body.tokens,
                                temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, seed=body.seed, stop=gave_up,
                                call=on_model_thread)[0]

    def on_model_thread(fn):  # one step at a time: the batch's calls take turns with it
        def step():
            if gave_up():  # gone while the step waited its turn
                raise GenerationStopped
            return fn()

        return service.model_thread.submit(step).result()

    work = loop.run_in_executor(service.generation_threads, run)
    try:
        sample = await service.until(work, ctx)
    except UserError as err:
        raise ServiceError(422, "generation_failed", str(err)) from None
    except GenerationStopped:
        raise timeout_error(service.settings.timeout) from None
    finally:
        work.cancel()  # still queued behind other work: it never starts
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
    return {"bundle": service.bundle_name, "text": sample.text, "tokens": sample.tokens}


def _over_limit(what: str, limit: int) -> ServiceError:
    return ServiceError(413, "too_many_tokens", f"{what}; the limit is {limit} "
                        f"(max_tokens_per_text)", limit="max_tokens_per_text", max=limit)
