from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capabilities(_message.Message):
    __slots__ = ("codecs", "model_widths", "memory_mb", "model_digest", "features")
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MODEL_WIDTHS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    model_widths: _containers.RepeatedScalarFieldContainer[float]
    memory_mb: int
    model_digest: str
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, codecs: _Optional[_Iterable[str]] = ..., model_widths: _Optional[_Iterable[float]] = ..., memory_mb: _Optional[int] = ..., model_digest: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("compute_sps", "uplink_mbps", "downlink_mbps")
    COMPUTE_SPS_FIELD_NUMBER: _ClassVar[int]
    UPLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    compute_sps: float
    uplink_mbps: float
    downlink_mbps: float
    def __init__(self, compute_sps: _Optional[float] = ..., uplink_mbps: _Optional[float] = ..., downlink_mbps: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("client_name", "runtime_version", "capabilities", "device")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    runtime_version: str
    capabilities: Capabilities
    device: DeviceProfile
    def __init__(self, client_name: _Optional[str] = ..., runtime_version: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., device: _Optional[_Union[DeviceProfile, _Mapping]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "session", "accepted", "reason", "heartbeat_interval_s", "downlink_codec", "uplink_codec", "model_digest", "run_finished", "chunk_bytes", "model_width")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    UPLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    accepted: bool
    reason: str
    heartbeat_interval_s: float
    downlink_codec: str
    uplink_codec: str
    model_digest: str
    run_finished: bool
    chunk_bytes: int
    model_width: float
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., downlink_codec: _Optional[str] = ..., uplink_codec: _Optional[str] = ..., model_digest: _Optional[str] = ..., run_finished: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., model_width: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "session")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("run_finished", "current_round", "has_task", "heartbeat_interval_s")
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    HAS_TASK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    run_finished: bool
    current_round: int
    has_task: bool
    heartbeat_interval_s: float
    def __init__(self, run_finished: _Optional[bool] = ..., current_round: _Optional[int] = ..., has_task: _Optional[bool] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("client_id", "session", "wait_s", "after_round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    wait_s: float
    after_round: int
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., wait_s: _Optional[float] = ..., after_round: _Optional[int] = ...) -> None: ...

class TaskMeta(_message.Message):
    __slots__ = ("round", "version", "codec", "config_json", "deadline_s", "remaining_s", "payload_bytes", "uplink_codec", "control_bytes", "model_width")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    CONTROL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    version: int
    codec: str
    config_json: str
    deadline_s: float
    remaining_s: float
    payload_bytes: int
    uplink_codec: str
    control_bytes: int
    model_width: float
    def __init__(self, round: _Optional[int] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., config_json: _Optional[str] = ..., deadline_s: _Optional[float] = ..., remaining_s: _Optional[float] = ..., payload_bytes: _Optional[int] = ..., uplink_codec: _Optional[str] = ..., control_bytes: _Optional[int] = ..., model_width: _Optional[float] = ...) -> None: ...

class PayloadChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RunFinished(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("meta", "data", "finished")
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    meta: TaskMeta
    data: PayloadChunk
    finished: RunFinished
    def __init__(self, meta: _Optional[_Union[TaskMeta, _Mapping]] = ..., data: _Optional[_Union[PayloadChunk, _Mapping]] = ..., finished: _Optional[_Union[RunFinished, _Mapping]] = ...) -> None: ...

class ClientMetrics(_message.Message):
    __slots__ = ("loss_before", "loss_after", "accuracy", "compute_seconds", "steps", "samples", "label_counts", "oversampled", "personal_accuracy", "global_accuracy")
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    OVERSAMPLED_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    loss_before: float
    loss_after: float
    accuracy: float
    compute_seconds: float
    steps: int
    samples: int
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    oversampled: int
    personal_accuracy: float
    global_accuracy: float
    def __init__(self, loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., accuracy: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ..., label_counts: _Optional[_Iterable[int]] = ..., oversampled: _Optional[int] = ..., personal_accuracy: _Optional[float] = ..., global_accuracy: _Optional[float] = ...) -> None: ...

class UpdateMeta(_message.Message):
    __slots__ = ("client_id", "session", "round", "base_version", "codec", "num_examples", "metrics", "payload_bytes", "downlink_bytes")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    round: int
    base_version: int
    codec: str
    num_examples: int
    metrics: ClientMetrics
    payload_bytes: int
    downlink_bytes: int
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., codec: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Union[ClientMetrics, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., downlink_bytes: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("meta", "data")
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    meta: UpdateMeta
    data: PayloadChunk
    def __init__(self, meta: _Optional[_Union[UpdateMeta, _Mapping]] = ..., data: _Optional[_Union[PayloadChunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
