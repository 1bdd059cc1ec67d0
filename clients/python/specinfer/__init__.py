"""A client for `specinfer serve` shaped like SpecInfer's Python API (flexflow.serve):

    import specinfer as ff

    ff.init(num_gpus=1, memory_per_gpu=14000, zero_copy_memory_per_node=30000)
    llm = ff.LLM()                                  # the embedded default pair
    llm.compile(ff.GenerationConfig(do_sample=False), max_requests_per_batch=8)
    with llm:                                       # starts and stops `specinfer serve`
        print(llm.generate("ROMEO:", max_new_tokens=32)[0].output_text)

Standard library only; talks to the server's OpenAI-compatible HTTP API.
"""

from .config import GenerationConfig, init
from .errors import APIError, ServerError, SpecInferError
from .serve import LLM, SSM, GenerationResult, TextStream

__all__ = [
    "init",
    "LLM",
    "SSM",
    "GenerationConfig",
    "GenerationResult",
    "TextStream",
    "SpecInferError",
    "APIError",
    "ServerError",
]
