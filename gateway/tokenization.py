"""vLLM's `POST /tokenize` and `POST /detokenize`, which RL trainers and token counters call.

A prompt is tokenized as /v1/completions tokenizes it and messages are rendered by the chat
route's own `render_chat`, so a count here is the count a generation request would see.
"""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.protocol import (BadRequest, DetokenizeRequest, TokenizeChatRequest,
                              TokenizeCompletionRequest, parse)
from gateway.requests import note_fields, parse_request, read_json, runtime
from gateway.routes import check_model, render_chat, tokenize_prompt


async def tokenize(request: Request) -> Response:
    rt = runtime(request)
    rt.ready()
    # vLLM tells the two forms apart by their fields: `messages` means the chat form
    body = await read_json(request, rt.config.max_body_bytes)
    req: TokenizeChatRequest | TokenizeCompletionRequest
    if isinstance(body, dict) and "messages" in body:
        req = parse(TokenizeChatRequest, body)
    else:
        req = parse(TokenizeCompletionRequest, body)
    note_fields(request, rt, req)
    if req.model is not None:
        check_model(rt, req.model)
    if isinstance(req, TokenizeChatRequest):
        if req.continue_final_message and req.add_generation_prompt:   # as the chat route
            raise BadRequest("continue_final_message and add_generation_prompt cannot both be "
                             "true (set add_generation_prompt to false)", "continue_final_message")
        token_ids = render_chat(rt, req.messages, None, req.add_generation_prompt,
                                req.add_special_tokens,
                                continue_final_message=req.continue_final_message,
                                template_kwargs=req.chat_template_kwargs)
    else:
        token_ids = tokenize_prompt(rt, req.prompt, req.add_special_tokens)
    body_out: dict[str, Any] = {
        "count": len(token_ids), "max_model_len": rt.max_model_len, "tokens": token_ids,
        "token_strs": (list(rt.tokenizer.convert_ids_to_tokens(token_ids))
                       if req.return_token_strs else None)}
    return JSONResponse(body_out)


async def detokenize(request: Request) -> Response:
    rt = runtime(request)
    rt.ready()
    req = await parse_request(request, rt, DetokenizeRequest)
    if req.model is not None:
        check_model(rt, req.model)
    vocab_size = len(rt.tokenizer)
    for i, token_id in enumerate(req.tokens):
        if token_id >= vocab_size:
            raise BadRequest(f"tokens[{i}] = {token_id} is not a token id (the vocabulary has "
                             f"{vocab_size})", "tokens")
    return JSONResponse({"prompt": rt.tokenizer.decode(req.tokens)})
