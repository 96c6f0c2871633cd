"""LLM: the public Python API, in the style of vLLM.

    llm = LLM()                                     # the default model (SmolLM2-135M-Instruct), weights="fast"
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    outs = llm.chat([{"role": "user", "content": "Please tell me about Paris."}])
    for chunk in llm.stream("Once upon a time"): print(chunk.delta_text, end="")

`LLM()` runs the fastest path that keeps quality on this CPU, as the CLI does (weights="fast": int4 weights on
kvengine's kernel tier, engine/config.py); `LLM(weights="fp32")` is the exact reference. `use_cache=False` runs the
seeds' baseline (every step recomputes the whole text; in the same format, so its tokens are the cached run's);
`verify=True` recomputes each request without any cache afterwards and reports the largest logit difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kvengine.cache.disk_store import DiskStore, check_disk_budget, check_disk_dir
from kvengine.cache.fingerprint import files_id, tensors_id
from kvengine.cache.spec import KVCacheSpec
from kvengine.config import ModelConfig
from kvengine.engine.assembly import build_engine
from kvengine.engine.config import FAST_WEIGHTS, EngineConfig
from kvengine.engine.output import RequestOutput
from kvengine.errors import ConfigError, RequestError
from kvengine.sampling import SamplingParams
from kvengine.tools.plan import history_tool_calls, plan_tools
from kvengine.weights.loader import load_model
from kvengine.weights.preset import PRESET_SEED
from kvengine.weights.source import ModelSource, open_model_source
from kvengine.weights.tokenizer import Tokenizer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | Path | None = None, *, quiet: bool = False, weights: str = FAST_WEIGHTS,
                 **engine_args: Any) -> None:
        """Load `model` (a name, GGUF file or HF folder; None = the default model) and build its engine;
        `engine_args` are EngineConfig's fields. `weights` defaults to "fast", the CLI's default."""
        self.config = EngineConfig(weights=weights, **engine_args)
        _apply_threads(self.config)
        _check_device(self.config.device)
        disk = open_disk_store(self.config)  # a bad directory or budget is refused before the model loads
        self.source: ModelSource = open_model_source(model, quiet=quiet)
        dtype = TORCH_DTYPES[self.config.resolved_dtype()]
        # int8/int4 weights are quantized from float32, so a Q4_0 source keeps its own grid whatever the activations
        # (build_engine casts the rest of the model to `dtype`)
        net = load_model(self.source, torch.float32 if self.config.quantized_weights else dtype, self.config.device)
        model_id = source_id(self.source, disk.root) if disk is not None else None
        note = f"{self.source.weights_note}; " if self.source.weights_note else ""
        if self.config.fast_chosen:  # weights="fast" (the CLI's default) chose int4 on this CPU's kernel tier
            note += "the fastest default for this CPU (--weights fp32: the exact reference): "
        self.engine = build_engine(net, self.source.tokenizer(), self.config, disk, model_id, note, dtype)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Tokenizer | None = None, **engine_args: Any) -> LLM:
        """Wrap an already-built model (tests use tiny random models this way); its weights stay in the dtype they
        were built in unless `weights` says otherwise (EngineConfig's default, "auto")."""
        self = cls.__new__(cls)
        self.config = EngineConfig(**engine_args)
        self.source = None
        disk = open_disk_store(self.config)
        self.engine = build_engine(model, tokenizer, self.config, disk, tensors_id(model) if disk else None)
        return self

    # -- properties -------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return self.engine.pool.spec

    @property
    def model_name(self) -> str:
        return self.source.name if self.source is not None else self.model_config.name

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None, use_cache: bool = True,
                 verify: bool = False, cache_salt: str | None = None) -> list[RequestOutput]:
        """Run every prompt together (continuous batching); outputs come back in input order."""
        ids = self._submit(prompts, sampling_params, prompt_token_ids, use_cache, verify, cache_salt)
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [finished[rid] for rid in ids]

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, *,
               prompt_token_ids: Sequence[int] | None = None, use_cache: bool = True, verify: bool = False,
               cache_salt: str | None = None) -> Iterator[RequestOutput]:
        """One request; yields an output (with delta_text) after every token. Closing the iterator aborts."""
        token_ids = [prompt_token_ids] if prompt_token_ids is not None else None
        prompts = [prompt] if prompt is not None else None
        (rid,) = self._submit(prompts, sampling_params, token_ids, use_cache, verify, cache_salt)
        try:
            done = False
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            self.engine.abort(rid)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tools: list[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] | None = None,
             parallel_tool_calls: bool = True, **kwargs: Any) -> list[RequestOutput]:
        """Chat template applied to one conversation or a list of them, then generate(). With `tools` (OpenAI's
        shape) and `tool_choice` (as the server takes them), each output's `tool_calls` holds the calls its text
        makes, and its finish_reason is "tool_calls" when it made any."""
        tokenizer = self._chat_tokenizer()
        plan = plan_tools(tools, tool_choice, parallel_tool_calls, tokenizer.chat_template, tokenizer.supports_tools)
        ids = self.encode_chats(messages, plan.template_tools() if plan else None)
        if plan is not None:
            plist = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(ids)
            sampling_params = [plan.constrain(p or SamplingParams()) for p in plist]
        outs = self.generate(None, sampling_params, prompt_token_ids=ids, **kwargs)
        if plan is not None and plan.calls_possible:
            for out in outs:
                out.tool_calls = plan.reply(out.text).calls or None
                out.finish_reason = "tool_calls" if out.tool_calls else out.finish_reason
        return outs

    def encode_chats(self, messages: Messages | Sequence[Messages],
                     tools: list[dict[str, Any]] | None = None) -> list[list[int]]:
        tokenizer = self._chat_tokenizer()
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        for conv in conversations:
            if not conv:
                raise RequestError("messages must not be empty", param="messages")
        return [tokenizer.encode_chat([_template_message(m) for m in conv], tools=tools) for conv in conversations]

    def _chat_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RequestError("chat needs a tokenizer")
        return self.tokenizer

    def _submit(self, prompts: str | Sequence[str] | None, params: Any, token_ids: Sequence[Sequence[int]] | None,
                use_cache: bool, verify: bool, cache_salt: str | None) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        items: list[tuple[str | None, list[int] | None]]
        if token_ids is not None:
            items = [(None, list(t)) for t in token_ids]
        elif prompts is not None:
            items = [(p, None) for p in prompts]
        else:
            raise RequestError("give prompts or prompt_token_ids")
        if params is None:
            params = SamplingParams()
        plist = [params] * len(items) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(items):
            raise RequestError(f"{len(plist)} sampling params for {len(items)} prompts")
        ids: list[str] = []
        try:
            for (text, toks), p in zip(items, plist, strict=True):
                ids.append(self.engine.add_request(text, p, prompt_token_ids=toks, use_cache=use_cache,
                                                   cache_salt=cache_salt, verify=verify))
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return ids


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as the chat template takes it: earlier tool calls with their arguments as objects."""
    calls = message.get("tool_calls")
    return {**message, "tool_calls": history_tool_calls(calls)} if calls else message


def open_disk_store(config: EngineConfig) -> DiskStore | None:
    """The KV disk tier's directory and budget, checked (ConfigError), or None without kv_disk_dir."""
    if config.kv_disk_dir is None:
        if config.kv_disk_budget is not None:
            raise ConfigError("kv_disk_budget needs kv_disk_dir (--kv-disk-budget needs --kv-disk-dir)")
        return None
    root = check_disk_dir(config.kv_disk_dir)
    return DiskStore(root, check_disk_budget(config.kv_disk_budget, root))


def source_id(source: ModelSource, cache_dir: Path) -> str:
    """What identifies a model's weights for the KV fingerprint: its files' hash, or a preset's name and seed."""
    if source.preset is not None:
        return f"{source.name}:seed{PRESET_SEED}"
    if source.kind == "gguf":
        return files_id([source.path], cache_dir)
    return files_id(sorted(source.path.glob("*.safetensors")) + [source.path / "config.json"], cache_dir)


def _apply_threads(config: EngineConfig) -> None:
    if config.num_threads is not None:
        if config.num_threads < 1:
            raise ConfigError(f"num_threads must be at least 1, got {config.num_threads}")
        torch.set_num_threads(config.num_threads)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for, but CUDA is not available in this PyTorch "
                          f"({torch.__version__})")


