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
    __slots__ = ("client_name", "runtime_version", "capabilities", "device", "region")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    runtime_version: str
    capabilities: Capabilities
    device: DeviceProfile
    region: int
    def __init__(self, client_name: _Optional[str] = ..., runtime_version: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., device: _Optional[_Union[DeviceProfile, _Mapping]] = ..., region: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("round", "version", "codec", "config_json", "deadline_s", "remaining_s", "payload_bytes", "uplink_codec", "control_bytes", "secagg", "secagg_stage_s", "model_width")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    CONTROL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    SECAGG_STAGE_S_FIELD_NUMBER: _ClassVar[int]
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
    secagg: bool
    secagg_stage_s: float
    model_width: float
    def __init__(self, round: _Optional[int] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., config_json: _Optional[str] = ..., deadline_s: _Optional[float] = ..., remaining_s: _Optional[float] = ..., payload_bytes: _Optional[int] = ..., uplink_codec: _Optional[str] = ..., control_bytes: _Optional[int] = ..., secagg: _Optional[bool] = ..., secagg_stage_s: _Optional[float] = ..., model_width: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("client_id", "session", "round", "base_version", "codec", "num_examples", "metrics", "payload_bytes", "downlink_bytes", "region")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    round: int
    base_version: int
    codec: str
    num_examples: int
    metrics: ClientMetrics
    payload_bytes: int
    downlink_bytes: int
    region: RegionSum
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., codec: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Union[ClientMetrics, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., downlink_bytes: _Optional[int] = ..., region: _Optional[_Union[RegionSum, _Mapping]] = ...) -> None: ...

class RegionSum(_message.Message):
    __slots__ = ("region", "weight", "clients", "selected", "client_uplink_bytes", "client_downlink_bytes", "dropped")
    REGION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_UPLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DOWNLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    region: int
    weight: float
    clients: int
    selected: int
    client_uplink_bytes: int
    client_downlink_bytes: int
    dropped: int
    def __init__(self, region: _Optional[int] = ..., weight: _Optional[float] = ..., clients: _Optional[int] = ..., selected: _Optional[int] = ..., client_uplink_bytes: _Optional[int] = ..., client_downlink_bytes: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...

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

class SecAggAdvertiseKeys(_message.Message):
    __slots__ = ("cipher_public_key", "mask_public_key", "signing_public_key")
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    cipher_public_key: bytes
    mask_public_key: bytes
    signing_public_key: bytes
    def __init__(self, cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signing_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggPeerKeys(_message.Message):
    __slots__ = ("client_id", "cipher_public_key", "mask_public_key", "signing_public_key", "point")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    cipher_public_key: bytes
    mask_public_key: bytes
    signing_public_key: bytes
    point: int
    def __init__(self, client_id: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signing_public_key: _Optional[bytes] = ..., point: _Optional[int] = ...) -> None: ...

class SecAggRecipe(_message.Message):
    __slots__ = ("weight", "clip_norm", "scale", "indicator_norm", "clip_range", "max_clients", "rounding")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    INDICATOR_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUNDING_FIELD_NUMBER: _ClassVar[int]
    weight: float
    clip_norm: float
    scale: float
    indicator_norm: float
    clip_range: float
    max_clients: int
    rounding: str
    def __init__(self, weight: _Optional[float] = ..., clip_norm: _Optional[float] = ..., scale: _Optional[float] = ..., indicator_norm: _Optional[float] = ..., clip_range: _Optional[float] = ..., max_clients: _Optional[int] = ..., rounding: _Optional[str] = ...) -> None: ...

class SecAggKeyDirectory(_message.Message):
    __slots__ = ("session", "threshold", "modulus_bits", "dim", "peers", "recipe", "degree", "size")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODULUS_BITS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    threshold: int
    modulus_bits: int
    dim: int
    peers: _containers.RepeatedCompositeFieldContainer[SecAggPeerKeys]
    recipe: SecAggRecipe
    degree: int
    size: int
    def __init__(self, session: _Optional[bytes] = ..., threshold: _Optional[int] = ..., modulus_bits: _Optional[int] = ..., dim: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[SecAggPeerKeys, _Mapping]]] = ..., recipe: _Optional[_Union[SecAggRecipe, _Mapping]] = ..., degree: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SecAggBlob(_message.Message):
    __slots__ = ("client_id", "data")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    data: bytes
    def __init__(self, client_id: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeys(_message.Message):
    __slots__ = ("encrypted_shares", "self_mask_commitment")
    ENCRYPTED_SHARES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    encrypted_shares: _containers.RepeatedCompositeFieldContainer[SecAggBlob]
    self_mask_commitment: bytes
    def __init__(self, encrypted_shares: _Optional[_Iterable[_Union[SecAggBlob, _Mapping]]] = ..., self_mask_commitment: _Optional[bytes] = ...) -> None: ...

class SecAggForwardedShares(_message.Message):
    __slots__ = ("encrypted_shares", "participants")
    ENCRYPTED_SHARES_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    encrypted_shares: _containers.RepeatedCompositeFieldContainer[SecAggBlob]
    participants: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, encrypted_shares: _Optional[_Iterable[_Union[SecAggBlob, _Mapping]]] = ..., participants: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggMaskedInput(_message.Message):
    __slots__ = ("masked",)
    MASKED_FIELD_NUMBER: _ClassVar[int]
    masked: bytes
    def __init__(self, masked: _Optional[bytes] = ...) -> None: ...

class SecAggSurvivors(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggSignature(_message.Message):
    __slots__ = ("signature", "neighbor_signatures")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOR_SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    neighbor_signatures: _containers.RepeatedCompositeFieldContainer[SecAggBlob]
    def __init__(self, signature: _Optional[bytes] = ..., neighbor_signatures: _Optional[_Iterable[_Union[SecAggBlob, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("survivors", "signatures")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    survivors: SecAggSurvivors
    signatures: _containers.RepeatedCompositeFieldContainer[SecAggBlob]
    def __init__(self, survivors: _Optional[_Union[SecAggSurvivors, _Mapping]] = ..., signatures: _Optional[_Iterable[_Union[SecAggBlob, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskShares(_message.Message):
    __slots__ = ("self_mask_shares", "mask_key_shares")
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[SecAggBlob]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[SecAggBlob]
    def __init__(self, self_mask_shares: _Optional[_Iterable[_Union[SecAggBlob, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[SecAggBlob, _Mapping]]] = ...) -> None: ...

class SecAggDone(_message.Message):
    __slots__ = ("survivors",)
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    survivors: int
    def __init__(self, survivors: _Optional[int] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("client_id", "session", "round", "advertise", "share_keys", "masked_input", "consistency", "unmask")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    round: int
    advertise: SecAggAdvertiseKeys
    share_keys: SecAggShareKeys
    masked_input: SecAggMaskedInput
    consistency: SecAggSignature
    unmask: SecAggUnmaskShares
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., round: _Optional[int] = ..., advertise: _Optional[_Union[SecAggAdvertiseKeys, _Mapping]] = ..., share_keys: _Optional[_Union[SecAggShareKeys, _Mapping]] = ..., masked_input: _Optional[_Union[SecAggMaskedInput, _Mapping]] = ..., consistency: _Optional[_Union[SecAggSignature, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmaskShares, _Mapping]] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("directory", "forwarded", "consistency_request", "unmask_request", "done")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_REQUEST_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    directory: SecAggKeyDirectory
    forwarded: SecAggForwardedShares
    consistency_request: SecAggSurvivors
    unmask_request: SecAggUnmaskRequest
    done: SecAggDone
    def __init__(self, directory: _Optional[_Union[SecAggKeyDirectory, _Mapping]] = ..., forwarded: _Optional[_Union[SecAggForwardedShares, _Mapping]] = ..., consistency_request: _Optional[_Union[SecAggSurvivors, _Mapping]] = ..., unmask_request: _Optional[_Union[SecAggUnmaskRequest, _Mapping]] = ..., done: _Optional[_Union[SecAggDone, _Mapping]] = ...) -> None: ...
