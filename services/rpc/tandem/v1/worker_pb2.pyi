from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerSampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class PhaseTimings(_message.Message):
    __slots__ = ("queue_s", "prefill_s", "kv_transfer_s", "kv_stream_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    KV_STREAM_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    prefill_s: float
    kv_transfer_s: float
    kv_stream_s: float
    def __init__(self, queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., kv_transfer_s: _Optional[float] = ..., kv_stream_s: _Optional[float] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling", "decode_address", "kv_timeout_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: WorkerSampling
    decode_address: str
    kv_timeout_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[WorkerSampling, _Mapping]] = ..., decode_address: _Optional[str] = ..., kv_timeout_s: _Optional[float] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token", "handle", "prompt_tokens", "finish_reason", "timings", "kv_bytes", "kv_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: int
    handle: str
    prompt_tokens: int
    finish_reason: str
    timings: PhaseTimings
    kv_bytes: int
    kv_path: str
    def __init__(self, request_id: _Optional[str] = ..., first_token: _Optional[int] = ..., handle: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., timings: _Optional[_Union[PhaseTimings, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., kv_path: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "handle", "first_token", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle: str
    first_token: int
    sampling: WorkerSampling
    def __init__(self, request_id: _Optional[str] = ..., handle: _Optional[str] = ..., first_token: _Optional[int] = ..., sampling: _Optional[_Union[WorkerSampling, _Mapping]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("token_id", "finish_reason", "first_decode_s")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    FIRST_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    finish_reason: str
    first_decode_s: float
    def __init__(self, token_id: _Optional[int] = ..., finish_reason: _Optional[str] = ..., first_decode_s: _Optional[float] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("request_id", "model_fingerprint", "n_layers", "dtype", "n_tokens", "n_kv_heads", "head_dim", "lease_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_fingerprint: str
    n_layers: int
    dtype: str
    n_tokens: int
    n_kv_heads: int
    head_dim: int
    lease_s: float
    def __init__(self, request_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., n_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., n_tokens: _Optional[int] = ..., n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., lease_s: _Optional[float] = ...) -> None: ...

class KVPiece(_message.Message):
    __slots__ = ("layer", "tensor", "shape", "offset", "data", "crc32")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tensor: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    crc32: int
    def __init__(self, layer: _Optional[int] = ..., tensor: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "piece")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    piece: KVPiece
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., piece: _Optional[_Union[KVPiece, _Mapping]] = ...) -> None: ...

class KVReceipt(_message.Message):
    __slots__ = ("request_id", "handle", "bytes", "receive_s", "lease_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle: str
    bytes: int
    receive_s: float
    lease_s: float
    def __init__(self, request_id: _Optional[str] = ..., handle: _Optional[str] = ..., bytes: _Optional[int] = ..., receive_s: _Optional[float] = ..., lease_s: _Optional[float] = ...) -> None: ...

class KVReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class KVReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class CudaStorageHandle(_message.Message):
    __slots__ = ("handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, handle: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class KVSharedHeader(_message.Message):
    __slots__ = ("kv", "host_id", "pid", "device_uuid", "k", "v", "generation")
    KV_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    kv: KVHeader
    host_id: str
    pid: int
    device_uuid: str
    k: CudaStorageHandle
    v: CudaStorageHandle
    generation: int
    def __init__(self, kv: _Optional[_Union[KVHeader, _Mapping]] = ..., host_id: _Optional[str] = ..., pid: _Optional[int] = ..., device_uuid: _Optional[str] = ..., k: _Optional[_Union[CudaStorageHandle, _Mapping]] = ..., v: _Optional[_Union[CudaStorageHandle, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class KVSharedLayer(_message.Message):
    __slots__ = ("layer", "generation", "k_offset", "v_offset", "event_handle")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    K_OFFSET_FIELD_NUMBER: _ClassVar[int]
    V_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    generation: int
    k_offset: int
    v_offset: int
    event_handle: bytes
    def __init__(self, layer: _Optional[int] = ..., generation: _Optional[int] = ..., k_offset: _Optional[int] = ..., v_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ...) -> None: ...

class KVSharedChunk(_message.Message):
    __slots__ = ("header", "layer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    header: KVSharedHeader
    layer: KVSharedLayer
    def __init__(self, header: _Optional[_Union[KVSharedHeader, _Mapping]] = ..., layer: _Optional[_Union[KVSharedLayer, _Mapping]] = ...) -> None: ...

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("role", "model", "fingerprint", "address", "pending_prompt_tokens", "live_requests", "waiting_requests", "kv_free_bytes", "kv_total_bytes", "max_seq_len", "vocab_size", "kv_dtype")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PENDING_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    role: str
    model: str
    fingerprint: str
    address: str
    pending_prompt_tokens: int
    live_requests: int
    waiting_requests: int
    kv_free_bytes: int
    kv_total_bytes: int
    max_seq_len: int
    vocab_size: int
    kv_dtype: str
    def __init__(self, role: _Optional[str] = ..., model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., address: _Optional[str] = ..., pending_prompt_tokens: _Optional[int] = ..., live_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_free_bytes: _Optional[int] = ..., kv_total_bytes: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_dtype: _Optional[str] = ...) -> None: ...

class MixedRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: WorkerSampling
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[WorkerSampling, _Mapping]] = ...) -> None: ...

class MixedEvent(_message.Message):
    __slots__ = ("prefill", "token")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefill: PrefillResponse
    token: DecodeEvent
    def __init__(self, prefill: _Optional[_Union[PrefillResponse, _Mapping]] = ..., token: _Optional[_Union[DecodeEvent, _Mapping]] = ...) -> None: ...
