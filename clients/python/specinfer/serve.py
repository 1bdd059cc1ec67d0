"""LLM and SSM shaped like flexflow.serve's, backed by `specinfer serve` over HTTP."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

from .config import GenerationConfig, check_positive_int, runtime_setting
from .errors import ServerError
from .http import Endpoint, status_of
from .process import ServerProcess, locate_server_command


@dataclass
class GenerationResult:
    """One prompt's output, with flexflow.serve's field names plus this request's
    speculation statistics."""

    output_text: str
    output_tokens: List[int]
    finish_reason: Optional[str] = None
    from_draft: List[bool] = field(default_factory=list)
    prompt_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    mean_accepted_length: float = 0.0


class SSM:
    """A small speculative model (a draft) for an LLM's compile(ssms=[...])."""

    def __init__(self, model_name: str):
        if not isinstance(model_name, (str, os.PathLike)):
            raise TypeError(f"SSM model path must be a string, got {type(model_name).__name__}")
        self.model_name = os.fspath(model_name)
        self.generation_config: Optional[GenerationConfig] = None

    def compile(self, generation_config: Optional[GenerationConfig] = None, **_sizes: Any) -> None:
        """Accepted for SpecInfer scripts. Drafts are verified against the LLM's own
        sampling, so the SSM's settings have no effect here."""
        self.generation_config = generation_config


Message = Dict[str, Any]
Prompts = Union[str, Sequence[str], Sequence[Message], Sequence[Sequence[Message]]]

# Most requests a list of prompts keeps in flight at once (the server refuses, with 429,
# more than its --max-queue).
BATCH_CONCURRENCY = 8


class LLM:
    """The large model, served by a `specinfer serve` child process (started by
    start_server() or `with llm:`) or, with url=..., a server already running."""

    def __init__(
        self,
        model_name: Optional[str] = None,
        *,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = 120.0,
        startup_timeout: float = 120.0,
        server_command: Optional[Union[str, Sequence[str]]] = None,
        log: Optional[TextIO] = None,
    ):
        """model_name: a local Hugging Face directory or .gguf file (None: the embedded
        default pair). url: attach to a running server instead, e.g.
        "http://127.0.0.1:8000/v1". timeout: the longest silence tolerated from the server
        between two pieces of a response, in seconds. server_command: what `serve ...` is appended to
        (default: found, see process.locate_server_command). log: where the child's output
        goes (default sys.stderr)."""
        if model_name is not None and url is not None:
            raise ValueError("pass either a model path (to start a server) or url= (to attach to one), not both")
        if model_name is not None and not isinstance(model_name, (str, os.PathLike)):
            raise TypeError(f"LLM model path must be a string, got {type(model_name).__name__}")
        self.model_name = None if model_name is None else os.fspath(model_name)
        self.url = None if url is None else url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.server_command = server_command
        self.log = log
        self.generation_config = GenerationConfig()
        self.ssms: Optional[List[SSM]] = None
        self._server_flags: List[str] = []
        self._process: Optional[ServerProcess] = None
        self._endpoint: Optional[Endpoint] = None
        self._served_model: Optional[str] = None

    # --- setup -------------------------------------------------------------------------

    def compile(
        self,
        generation_config: Optional[GenerationConfig] = None,
        max_requests_per_batch: Optional[int] = None,
        max_seq_length: Optional[int] = None,
        max_tokens_per_batch: Optional[int] = None,
        model_specific_data_parallelism_degree: Optional[int] = None,
        model_specific_tensor_parallelism_degree: Optional[int] = None,
        model_specific_pipeline_parallelism_degree: Optional[int] = None,
        ssms: Optional[Sequence[SSM]] = None,
    ) -> None:
        """Settings for the server start_server() launches, with SpecInfer's names:
        max_requests_per_batch -> --max-seqs, max_seq_length -> --ctx-size,
        max_tokens_per_batch -> --batch-size, ssms -> --ssm, a tensor parallelism degree
        above 1 -> --tp. None leaves the server's default. ssms=[] (an explicit empty
        list) decodes without speculation, as in SpecInfer. The data and pipeline
        degrees are accepted and have no effect.
        generation_config is the default sampling of every generate() call."""
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
        sizes = {
            "max_requests_per_batch": max_requests_per_batch,
            "max_seq_length": max_seq_length,
            "max_tokens_per_batch": max_tokens_per_batch,
            "model_specific_data_parallelism_degree": model_specific_data_parallelism_degree,
            "model_specific_tensor_parallelism_degree": model_specific_tensor_parallelism_degree,
            "model_specific_pipeline_parallelism_degree": model_specific_pipeline_parallelism_degree,
        }
        for name, value in sizes.items():
            check_positive_int(name, value)
        if ssms is not None and not all(isinstance(s, SSM) for s in ssms):
            raise TypeError("ssms must be a list of SSM objects")
        if self.url is not None and (ssms or max_requests_per_batch or max_seq_length or max_tokens_per_batch or model_specific_tensor_parallelism_degree):
            warnings.warn("attached to a running server (url=...): its own flags decide the SSMs and sizes", stacklevel=2)
        self.generation_config = generation_config or GenerationConfig()
        self.ssms = None if ssms is None else list(ssms)
        tp = model_specific_tensor_parallelism_degree or runtime_setting("tensor_parallelism_degree")
        self._server_flags = [
            *_flag("--max-seqs", max_requests_per_batch),
            *_flag("--ctx-size", max_seq_length),
            *_flag("--batch-size", max_tokens_per_batch),
            *(_flag("--tp", tp) if tp and tp > 1 else []),
            *[arg for ssm in self.ssms or [] for arg in ("--ssm", ssm.model_name)],
        ]

    def start_server(self) -> "LLM":
        """Starts `specinfer serve` on a free port on 127.0.0.1 and waits until it is ready
        (with url=..., checks that the server answers). Returns self."""
        if self._endpoint is not None:
            return self
        if self.url is not None:
            self._attach(self.url)
            return self
        for path in [self.model_name, *[s.model_name for s in self.ssms or []]]:
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"model path {path!r} does not exist (specinfer serves local Hugging Face directories and .gguf files)")
        model_flags = [] if self.model_name is None else ["--model", self.model_name]
        env = None
        if self.api_key:  # through the environment, not argv, which other users can read
            env = {**os.environ, "SPECINFER_API_KEY": self.api_key}
        process = ServerProcess(locate_server_command(self.server_command), [*model_flags, *self._server_flags], env=env, log=self.log)
        process.start(self.startup_timeout)
        self._process = process
        try:
            self._attach(process.url + "/v1")
        except BaseException:
            self.stop_server()
            raise
        return self

    def _attach(self, url: str) -> None:
        endpoint = Endpoint(url, self.api_key, self.timeout)
        root = url[: -len("/v1")] if url.endswith("/v1") else url
        if status_of(root + "/health", timeout=min(self.timeout, 10)) != 200:
            raise ServerError(f"no ready specinfer server at {root} (GET /health did not answer 200)")
        models = endpoint.get_json("/models").get("data") or []
        if not models:
            raise ServerError(f"{url}/models lists no model")
        self._endpoint = endpoint
        self._served_model = models[0]["id"]

    def stop_server(self) -> None:
        """Stops the child server (SIGTERM, then SIGKILL) and waits for it to exit; detaches
        from a server given by url=... without stopping it."""
        process, self._process, self._endpoint = self._process, None, None
        if process is not None:
            process.stop()

    def __enter__(self) -> "LLM":
        return self.start_server()

    def __exit__(self, *_exc: object) -> None:
        self.stop_server()

    @property
    def server_pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    @property
    def base_url(self) -> Optional[str]:
        """The OpenAI-compatible base URL (…/v1) of the server in use, once started."""
        return self._endpoint.base_url if self._endpoint else None

    # --- generation ----------------------------------------------------------------------

    def generate(
        self,
        requests_or_prompts: Prompts,
        max_new_tokens: int = 128,
        *,
        stream: bool = False,
        stop: Optional[Union[str, Sequence[str]]] = None,
        seed: Optional[int] = None,
        speculation: Any = None,
        generation_config: Optional[GenerationConfig] = None,
    ) -> Union[List[GenerationResult], "TextStream"]:
        """Generates for a prompt, a list of prompts, a conversation (a list of
        {"role", "content"} dicts, through the model's chat template) or a list of
        conversations. Returns a list of GenerationResult in the order given, as
        flexflow.serve does; the server decodes them together (continuous batching).

        stream=True (one prompt or conversation) returns a TextStream that yields text
        pieces as the server sends them. stop: strings that end the output (never part
        of it). speculation: False, "auto" or {"tree": "1,1,3", "ngram": True} for these
        requests only. generation_config: instead of the one given to compile()."""
        endpoint = self._require_endpoint()
        requests = _as_requests(requests_or_prompts)
        body = self._settings(max_new_tokens, stop, seed, speculation, generation_config)
        if stream:
            if len(requests) != 1:
                raise ValueError(f"stream=True takes one prompt or conversation, got {len(requests)}")
            return self._stream(endpoint, *requests[0], body)
        if not requests:
            return []
        # One request per prompt, sent together: the server batches them, and each
        # answer carries that prompt's own speculation stats.
        with ThreadPoolExecutor(max_workers=min(len(requests), BATCH_CONCURRENCY)) as pool:
            futures = [pool.submit(lambda r: self._stream(endpoint, *r, body).finish(), r) for r in requests]
            return [f.result() for f in futures]

    def _stream(self, endpoint: Endpoint, route: str, fields: Dict[str, Any], settings: Dict[str, Any]) -> "TextStream":
        """Every request streams, so `timeout` bounds the silence between tokens rather
        than a whole generation, and a server that dies is noticed at once."""
        body = {**settings, **fields, "stream": True, "stream_options": {"include_usage": True}}
        try:
            events = endpoint.post_sse(route, body)  # sent now: a refusal raises here
        except ServerError as e:
            raise self._explained(e) from e
        return TextStream(self._explaining_failures(events))

    def _require_endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise ServerError("no server: call llm.start_server() first (or use `with llm:`)")
        exited = self._exit_error(wait=0)
        if exited:
            raise exited
        return self._endpoint

    def _exit_error(self, wait: float) -> Optional[ServerError]:
        """A ServerError naming our child's exit, if it has exited (within `wait` s)."""
        process = self._process
        if process is None or process.running_after(wait):
            return None
        return ServerError(f"specinfer serve (pid {process.pid}) exited with code {process.returncode}:\n{process.output_tail()}")

    def _explained(self, e: ServerError) -> ServerError:
        """A lost connection explained by our child's death when that is what happened."""
        return self._exit_error(wait=1.0) or e

    def _explaining_failures(self, events: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        try:
            yield from events
        except ServerError as e:
            raise self._explained(e) from e

    def _settings(self, max_new_tokens, stop, seed, speculation, generation_config) -> Dict[str, Any]:
        """The request fields every prompt of one generate() call shares."""
        config = generation_config or self.generation_config
        body: Dict[str, Any] = {"model": self._served_model, "max_tokens": max_new_tokens, **config.request_fields()}
        if stop is not None:
            body["stop"] = stop
        if seed is not None:
            body["seed"] = seed
        if speculation is None and self.ssms == []:
            speculation = False  # compile(ssms=[]): incremental decoding, as in SpecInfer
        if speculation is not None:
            body["speculation"] = speculation
        return body


def _as_requests(requests_or_prompts: Prompts) -> List[Tuple[str, Dict[str, Any]]]:
    """(route, input fields) per request: a text prompt goes to /completions, a
    conversation to /chat/completions."""
    x = requests_or_prompts
    if isinstance(x, str):
        return [("/completions", {"prompt": x})]
    if isinstance(x, (list, tuple)):
        if all(isinstance(p, str) for p in x):
            return [("/completions", {"prompt": p}) for p in x]
        if all(isinstance(m, dict) for m in x):
            return [("/chat/completions", {"messages": list(x)})]
        if all(isinstance(c, (list, tuple)) and all(isinstance(m, dict) for m in c) for c in x):
            return [("/chat/completions", {"messages": list(c)}) for c in x]
    raise TypeError("requests_or_prompts must be a string, a list of strings, a conversation (list of dicts) or a list of conversations")


def _flag(name: str, value: Optional[int]) -> List[str]:
    return [] if value is None else [name, str(value)]


# --- responses -------------------------------------------------------------------------
# Each streamed chunk's choice carries `text` (chat: `delta.content`) and the extensions `from_draft` (per token)
# and `token_ids`; the last one `finish_reason` and, beside it, `speculation`
# ({draft_tokens, accepted_tokens, mean_accepted_length}); a final chunk carries `usage`.


def _add_usage_and_speculation(result: GenerationResult, payload: Dict[str, Any]) -> None:
    usage = payload.get("usage")
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens", 0)
    speculation = payload.get("speculation")
    if speculation:
        result.draft_tokens = speculation.get("draft_tokens", 0)
        result.accepted_tokens = speculation.get("accepted_tokens", 0)
        result.mean_accepted_length = speculation.get("mean_accepted_length", 0.0)


class TextStream:
    """The text pieces of a streamed generation, as the server sends them. Once iteration
    ends, .result is the whole GenerationResult. close() (or leaving a `with` block) ends
    the request early; the server then cancels it."""

    def __init__(self, events: Iterator[Dict[str, Any]]):
        self.result: Optional[GenerationResult] = None
        self._events = events
        self._pieces = self._read()

    def _read(self) -> Iterator[str]:
        result = GenerationResult(output_text="", output_tokens=[])
        for chunk in self._events:
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                result.output_text += text
                result.output_tokens += choice.get("token_ids") or []
                result.from_draft += choice.get("from_draft") or []
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
                if text:
                    yield text
            _add_usage_and_speculation(result, chunk)
        self.result = result

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def finish(self) -> GenerationResult:
        """Reads the rest of the stream and returns the whole result."""
        for _ in self._pieces:
            pass
        return self.result

    def close(self) -> None:
        self._pieces.close()
        close_events = getattr(self._events, "close", None)
        if close_events:
            close_events()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
