from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DiffusionGenerateRequest(_message.Message):
    __slots__ = ("prompt", "gen_len", "block", "steps_per_block", "cache", "guided", "accept", "k", "tau")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    GEN_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    GUIDED_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    gen_len: int
    block: int
    steps_per_block: int
    cache: str
    guided: bool
    accept: str
    k: int
    tau: float
    def __init__(self, prompt: _Optional[str] = ..., gen_len: _Optional[int] = ..., block: _Optional[int] = ..., steps_per_block: _Optional[int] = ..., cache: _Optional[str] = ..., guided: _Optional[bool] = ..., accept: _Optional[str] = ..., k: _Optional[int] = ..., tau: _Optional[float] = ...) -> None: ...

class DiffusionGenerateResponse(_message.Message):
    __slots__ = ("text", "committed_tokens", "steps", "forward_passes", "dlm_tokens", "done")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    DLM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    text: str
    committed_tokens: int
    steps: int
    forward_passes: int
    dlm_tokens: int
    done: bool
    def __init__(self, text: _Optional[str] = ..., committed_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., forward_passes: _Optional[int] = ..., dlm_tokens: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...
