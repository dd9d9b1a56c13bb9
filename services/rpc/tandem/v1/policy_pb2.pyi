from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ActRequest(_message.Message):
    __slots__ = ("observation", "seed")
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    observation: _containers.RepeatedScalarFieldContainer[float]
    seed: int
    def __init__(self, observation: _Optional[_Iterable[float]] = ..., seed: _Optional[int] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("actions", "horizon", "act_dim", "n_action_steps", "batch_size", "block_evals")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    N_ACTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_EVALS_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedScalarFieldContainer[float]
    horizon: int
    act_dim: int
    n_action_steps: int
    batch_size: int
    block_evals: int
    def __init__(self, actions: _Optional[_Iterable[float]] = ..., horizon: _Optional[int] = ..., act_dim: _Optional[int] = ..., n_action_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., block_evals: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("obs_dim", "n_obs_steps", "horizon", "act_dim", "n_action_steps", "sampler", "cache", "budget", "checkpoint_sha256")
    OBS_DIM_FIELD_NUMBER: _ClassVar[int]
    N_OBS_STEPS_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    N_ACTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    obs_dim: int
    n_obs_steps: int
    horizon: int
    act_dim: int
    n_action_steps: int
    sampler: str
    cache: str
    budget: int
    checkpoint_sha256: str
    def __init__(self, obs_dim: _Optional[int] = ..., n_obs_steps: _Optional[int] = ..., horizon: _Optional[int] = ..., act_dim: _Optional[int] = ..., n_action_steps: _Optional[int] = ..., sampler: _Optional[str] = ..., cache: _Optional[str] = ..., budget: _Optional[int] = ..., checkpoint_sha256: _Optional[str] = ...) -> None: ...
