"""plumbline's inference engine: scheduler, paged KV cache, llama-family model, sampler."""
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.engine import AsyncEngine, EngineCore
from engine.interface import (EngineClient, EngineLimits, EngineStats, PreparedRequest,
                              validate_request)
from engine.request_stream import RequestStream
from engine.llm import LLM
from engine.types import (CompletionOutput, FinishReason, GenerateRequest, RequestError,
                          RequestOutput, SamplingParams, TokenDelta, TopLogprob)

__all__ = ["AsyncEngine", "EngineClient", "EngineLimits", "EngineStats", "PreparedRequest",
           "validate_request", "CompletionOutput", "DEFAULT_MODEL", "EngineConfig", "EngineCore",
           "FinishReason", "GenerateRequest", "LLM", "RequestError", "RequestOutput",
           "RequestStream", "SamplingParams", "TokenDelta", "TopLogprob"]
