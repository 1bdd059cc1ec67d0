"""`init()` and `GenerationConfig`, with flexflow.serve's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

# flexflow.serve.init's keywords. Only tensor_parallelism_degree reaches the server
# (as --tp, when above 1); the rest size FlexFlow's Legion runtime, which has no
# counterpart here, and are accepted so SpecInfer scripts run unchanged.
_POSITIVE_INT_KEYS = (
    "num_gpus",
    "memory_per_gpu",
    "zero_copy_memory_per_node",
    "num_cpus",
    "legion_utility_processors",
    "data_parallelism_degree",
    "tensor_parallelism_degree",
    "pipeline_parallelism_degree",
    "offload_reserve_space_size",
)
_BOOL_KEYS = (
    "offload",
    "use_4bit_quantization",
    "use_8bit_quantization",
    "profiling",
    "inference_debugging",
    "fusion",
)

_runtime: Dict[str, Any] = {}


def check_positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def _check_runtime_config(config: Dict[str, Any]) -> None:
    unknown = sorted(set(config) - set(_POSITIVE_INT_KEYS) - set(_BOOL_KEYS))
    if unknown:
        raise ValueError(f"init(): unknown setting(s) {', '.join(unknown)}")
    for key in _POSITIVE_INT_KEYS:
        check_positive_int(key, config.get(key))
    for key in _BOOL_KEYS:
        value = config.get(key)
        if value is not None and type(value) is not bool:
            raise TypeError(f"{key} must be a bool, got {value!r}")


def init(configs_dict: Optional[Dict[str, Any]] = None, **settings: Any) -> None:
    """Takes flexflow.serve.init's settings, as a dict or as keywords (not both).

    `tensor_parallelism_degree` > 1 asks servers started afterwards for `--tp N`; every
    other setting is validated and has no effect here.
    """
    if configs_dict is not None and settings:
        raise ValueError("init(): pass either configs_dict or keyword settings, not both")
    if configs_dict is not None and not isinstance(configs_dict, dict):
        raise TypeError(f"init(): configs_dict must be a dict, got {type(configs_dict).__name__}")
    config = dict(configs_dict if configs_dict is not None else settings)
    _check_runtime_config(config)
    _runtime.clear()
    _runtime.update({k: v for k, v in config.items() if v is not None})


def runtime_setting(name: str) -> Any:
    return _runtime.get(name)


@dataclass
class GenerationConfig:
    """SpecInfer's sampling settings: greedy unless do_sample is true."""

    do_sample: bool = False
    temperature: float = 0.9
    topp: float = 0.8
    topk: int = 1

    def __post_init__(self) -> None:
        if type(self.do_sample) is not bool:
            raise TypeError(f"GenerationConfig.do_sample must be a bool, got {self.do_sample!r}")
        for name in ("temperature", "topp"):
            value = getattr(self, name)
            if type(value) not in (int, float):
                raise TypeError(f"GenerationConfig.{name} must be a number, got {value!r}")
        if type(self.topk) is not int:
            raise TypeError(f"GenerationConfig.topk must be an int, got {self.topk!r}")

    def request_fields(self) -> Dict[str, Any]:
        """The OpenAI request fields (plus the `top_k` extension) this config stands for.
        Ranges are the server's to check, so its error names the field."""
        if not self.do_sample:
            return {"temperature": 0}
        return {"temperature": self.temperature, "top_p": self.topp, "top_k": self.topk}
