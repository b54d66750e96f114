import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SourceFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_FORMAT_UNSPECIFIED: _ClassVar[SourceFormat]
    SOURCE_FORMAT_PYTHON: _ClassVar[SourceFormat]
    SOURCE_FORMAT_ZIP: _ClassVar[SourceFormat]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_FUNCTION_ERROR: _ClassVar[Outcome]
    OUTCOME_TIMEOUT: _ClassVar[Outcome]
    OUTCOME_CPU_LIMIT: _ClassVar[Outcome]
    OUTCOME_MEMORY_LIMIT: _ClassVar[Outcome]
    OUTCOME_OUTPUT_LIMIT: _ClassVar[Outcome]
    OUTCOME_CRASHED: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]

class InvocationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVOCATION_STATE_UNSPECIFIED: _ClassVar[InvocationState]
    INVOCATION_STATE_QUEUED: _ClassVar[InvocationState]
    INVOCATION_STATE_RUNNING: _ClassVar[InvocationState]
    INVOCATION_STATE_SUCCEEDED: _ClassVar[InvocationState]
    INVOCATION_STATE_FAILED: _ClassVar[InvocationState]
    INVOCATION_STATE_DEAD_LETTERED: _ClassVar[InvocationState]
    INVOCATION_STATE_CANCELLED: _ClassVar[InvocationState]
SOURCE_FORMAT_UNSPECIFIED: SourceFormat
SOURCE_FORMAT_PYTHON: SourceFormat
SOURCE_FORMAT_ZIP: SourceFormat
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_OK: Outcome
OUTCOME_FUNCTION_ERROR: Outcome
OUTCOME_TIMEOUT: Outcome
OUTCOME_CPU_LIMIT: Outcome
OUTCOME_MEMORY_LIMIT: Outcome
OUTCOME_OUTPUT_LIMIT: Outcome
OUTCOME_CRASHED: Outcome
OUTCOME_CANCELLED: Outcome
INVOCATION_STATE_UNSPECIFIED: InvocationState
INVOCATION_STATE_QUEUED: InvocationState
INVOCATION_STATE_RUNNING: InvocationState
INVOCATION_STATE_SUCCEEDED: InvocationState
INVOCATION_STATE_FAILED: InvocationState
INVOCATION_STATE_DEAD_LETTERED: InvocationState
INVOCATION_STATE_CANCELLED: InvocationState

class Limits(_message.Message):
    __slots__ = ("wall_timeout_s", "cpu_time_s", "memory_bytes", "max_processes", "max_open_files", "max_file_size_bytes", "max_result_bytes", "max_log_bytes", "network")
    WALL_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MAX_OPEN_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    wall_timeout_s: float
    cpu_time_s: float
    memory_bytes: int
    max_processes: int
    max_open_files: int
    max_file_size_bytes: int
    max_result_bytes: int
    max_log_bytes: int
    network: bool
    def __init__(self, wall_timeout_s: _Optional[float] = ..., cpu_time_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., max_processes: _Optional[int] = ..., max_open_files: _Optional[int] = ..., max_file_size_bytes: _Optional[int] = ..., max_result_bytes: _Optional[int] = ..., max_log_bytes: _Optional[int] = ..., network: _Optional[bool] = ...) -> None: ...

class Function(_message.Message):
    __slots__ = ("name", "version", "digest", "handler", "preload", "limits", "create_time", "source_format", "source_size_bytes", "profile", "reuse", "async_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    PRELOAD_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    REUSE_FIELD_NUMBER: _ClassVar[int]
    ASYNC_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    digest: str
    handler: str
    preload: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    create_time: _timestamp_pb2.Timestamp
    source_format: SourceFormat
    source_size_bytes: int
    profile: str
    reuse: int
    async_policy: AsyncPolicy
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., digest: _Optional[str] = ..., handler: _Optional[str] = ..., preload: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_format: _Optional[_Union[SourceFormat, str]] = ..., source_size_bytes: _Optional[int] = ..., profile: _Optional[str] = ..., reuse: _Optional[int] = ..., async_policy: _Optional[_Union[AsyncPolicy, _Mapping]] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("name", "source", "source_format", "handler", "limits", "preload", "reuse", "async_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PRELOAD_FIELD_NUMBER: _ClassVar[int]
    REUSE_FIELD_NUMBER: _ClassVar[int]
    ASYNC_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: bytes
    source_format: SourceFormat
    handler: str
    limits: Limits
    preload: _containers.RepeatedScalarFieldContainer[str]
    reuse: int
    async_policy: AsyncPolicy
    def __init__(self, name: _Optional[str] = ..., source: _Optional[bytes] = ..., source_format: _Optional[_Union[SourceFormat, str]] = ..., handler: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., preload: _Optional[_Iterable[str]] = ..., reuse: _Optional[int] = ..., async_policy: _Optional[_Union[AsyncPolicy, _Mapping]] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("function",)
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    function: Function
    def __init__(self, function: _Optional[_Union[Function, _Mapping]] = ...) -> None: ...

class GetFunctionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetFunctionResponse(_message.Message):
    __slots__ = ("function", "versions")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    function: Function
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, function: _Optional[_Union[Function, _Mapping]] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ListFunctionsRequest(_message.Message):
    __slots__ = ("all_versions",)
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    all_versions: bool
    def __init__(self, all_versions: _Optional[bool] = ...) -> None: ...

class ListFunctionsResponse(_message.Message):
    __slots__ = ("functions",)
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[Function]
    def __init__(self, functions: _Optional[_Iterable[_Union[Function, _Mapping]]] = ...) -> None: ...

class DeleteFunctionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteFunctionResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("type", "message", "traceback")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("queue_s", "startup_s", "run_s", "cpu_s", "peak_memory_bytes", "cold_start", "forked_on_demand", "worker_pid", "worker_invocations", "function_s", "node")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    STARTUP_S_FIELD_NUMBER: _ClassVar[int]
    RUN_S_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    FORKED_ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_S_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    startup_s: float
    run_s: float
    cpu_s: float
    peak_memory_bytes: int
    cold_start: bool
    forked_on_demand: bool
    worker_pid: int
    worker_invocations: int
    function_s: float
    node: str
    def __init__(self, queue_s: _Optional[float] = ..., startup_s: _Optional[float] = ..., run_s: _Optional[float] = ..., cpu_s: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., cold_start: _Optional[bool] = ..., forked_on_demand: _Optional[bool] = ..., worker_pid: _Optional[int] = ..., worker_invocations: _Optional[int] = ..., function_s: _Optional[float] = ..., node: _Optional[str] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("function", "version", "payload", "content_type", "limits", "id")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    function: str
    version: int
    payload: bytes
    content_type: str
    limits: Limits
    id: str
    def __init__(self, function: _Optional[str] = ..., version: _Optional[int] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., id: _Optional[str] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("id", "outcome", "payload", "content_type", "error", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "chunks", "stats")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    id: str
    outcome: Outcome
    payload: bytes
    content_type: str
    error: ErrorInfo
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    chunks: int
    stats: Stats
    def __init__(self, id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., stdout_truncated: _Optional[bool] = ..., stderr_truncated: _Optional[bool] = ..., chunks: _Optional[int] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class InvokeStreamRequest(_message.Message):
    __slots__ = ("function", "version", "payload", "content_type", "limits", "id")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    function: str
    version: int
    payload: bytes
    content_type: str
    limits: Limits
    id: str
    def __init__(self, function: _Optional[str] = ..., version: _Optional[int] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., id: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "payload")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    index: int
    payload: bytes
    def __init__(self, index: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class InvokeStreamResponse(_message.Message):
    __slots__ = ("chunk", "result")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    result: InvokeResponse
    def __init__(self, chunk: _Optional[_Union[Chunk, _Mapping]] = ..., result: _Optional[_Union[InvokeResponse, _Mapping]] = ...) -> None: ...

class InvokeManyRequest(_message.Message):
    __slots__ = ("invoke", "cancel_id")
    INVOKE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ID_FIELD_NUMBER: _ClassVar[int]
    invoke: InvokeRequest
    cancel_id: str
    def __init__(self, invoke: _Optional[_Union[InvokeRequest, _Mapping]] = ..., cancel_id: _Optional[str] = ...) -> None: ...

class InvokeError(_message.Message):
    __slots__ = ("id", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: int
    message: str
    def __init__(self, id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InvokeManyResponse(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: InvokeResponse
    error: InvokeError
    def __init__(self, result: _Optional[_Union[InvokeResponse, _Mapping]] = ..., error: _Optional[_Union[InvokeError, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Profile(_message.Message):
    __slots__ = ("name", "modules")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., modules: _Optional[_Iterable[str]] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("profile", "idle", "busy", "starting", "queued", "target", "min_idle", "max_idle", "idle_ttl_s", "arrival_rate", "birth_ms", "waiting")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    STARTING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MIN_IDLE_FIELD_NUMBER: _ClassVar[int]
    MAX_IDLE_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    BIRTH_MS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    profile: str
    idle: int
    busy: int
    starting: int
    queued: int
    target: int
    min_idle: int
    max_idle: int
    idle_ttl_s: float
    arrival_rate: float
    birth_ms: float
    waiting: int
    def __init__(self, profile: _Optional[str] = ..., idle: _Optional[int] = ..., busy: _Optional[int] = ..., starting: _Optional[int] = ..., queued: _Optional[int] = ..., target: _Optional[int] = ..., min_idle: _Optional[int] = ..., max_idle: _Optional[int] = ..., idle_ttl_s: _Optional[float] = ..., arrival_rate: _Optional[float] = ..., birth_ms: _Optional[float] = ..., waiting: _Optional[int] = ...) -> None: ...

class IsolationLayer(_message.Message):
    __slots__ = ("name", "available", "enabled", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    enabled: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., enabled: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "profiles", "pools", "isolation", "default_limits", "max_limits", "invoke_many_window", "max_message_bytes", "running", "max_concurrency", "queued", "max_queue", "isolation_mode", "view", "node")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_LIMITS_FIELD_NUMBER: _ClassVar[int]
    INVOKE_MANY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_MODE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    version: str
    profiles: _containers.RepeatedCompositeFieldContainer[Profile]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    isolation: _containers.RepeatedCompositeFieldContainer[IsolationLayer]
    default_limits: Limits
    max_limits: Limits
    invoke_many_window: int
    max_message_bytes: int
    running: int
    max_concurrency: int
    queued: int
    max_queue: int
    isolation_mode: str
    view: FilesystemView
    node: str
    def __init__(self, version: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[Profile, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ..., isolation: _Optional[_Iterable[_Union[IsolationLayer, _Mapping]]] = ..., default_limits: _Optional[_Union[Limits, _Mapping]] = ..., max_limits: _Optional[_Union[Limits, _Mapping]] = ..., invoke_many_window: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., running: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., queued: _Optional[int] = ..., max_queue: _Optional[int] = ..., isolation_mode: _Optional[str] = ..., view: _Optional[_Union[FilesystemView, _Mapping]] = ..., node: _Optional[str] = ...) -> None: ...

class FilesystemView(_message.Message):
    __slots__ = ("minimal", "read_only", "paths", "devices", "hidden", "private")
    MINIMAL_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    minimal: bool
    read_only: bool
    paths: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedScalarFieldContainer[str]
    hidden: _containers.RepeatedScalarFieldContainer[str]
    private: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, minimal: _Optional[bool] = ..., read_only: _Optional[bool] = ..., paths: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[str]] = ..., hidden: _Optional[_Iterable[str]] = ..., private: _Optional[_Iterable[str]] = ...) -> None: ...

class AsyncPolicy(_message.Message):
    __slots__ = ("max_retries", "max_event_age_s", "retry_on", "backoff_initial_s", "backoff_multiplier", "backoff_max_s", "jitter", "retention_s")
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_INITIAL_S_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MAX_S_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    RETENTION_S_FIELD_NUMBER: _ClassVar[int]
    max_retries: int
    max_event_age_s: float
    retry_on: OutcomeSet
    backoff_initial_s: float
    backoff_multiplier: float
    backoff_max_s: float
    jitter: float
    retention_s: float
    def __init__(self, max_retries: _Optional[int] = ..., max_event_age_s: _Optional[float] = ..., retry_on: _Optional[_Union[OutcomeSet, _Mapping]] = ..., backoff_initial_s: _Optional[float] = ..., backoff_multiplier: _Optional[float] = ..., backoff_max_s: _Optional[float] = ..., jitter: _Optional[float] = ..., retention_s: _Optional[float] = ...) -> None: ...

class OutcomeSet(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedScalarFieldContainer[Outcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[Outcome, str]]] = ...) -> None: ...

class InvokeAsyncRequest(_message.Message):
    __slots__ = ("invoke", "idempotency_key", "policy")
    INVOKE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    invoke: InvokeRequest
    idempotency_key: str
    policy: AsyncPolicy
    def __init__(self, invoke: _Optional[_Union[InvokeRequest, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., policy: _Optional[_Union[AsyncPolicy, _Mapping]] = ...) -> None: ...

class InvokeAsyncResponse(_message.Message):
    __slots__ = ("id", "state", "duplicate")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: InvocationState
    duplicate: bool
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[InvocationState, str]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "start_time", "end_time", "outcome", "error", "stats", "node", "charged")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    number: int
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    outcome: Outcome
    error: ErrorInfo
    stats: Stats
    node: str
    charged: bool
    def __init__(self, number: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., node: _Optional[str] = ..., charged: _Optional[bool] = ...) -> None: ...

class AsyncInvocation(_message.Message):
    __slots__ = ("id", "function", "version", "state", "create_time", "update_time", "end_time", "next_attempt_time", "attempts", "result", "reason", "idempotency_key", "policy", "redrives", "content_type")
    ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REDRIVES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    id: str
    function: str
    version: int
    state: InvocationState
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    result: InvokeResponse
    reason: str
    idempotency_key: str
    policy: AsyncPolicy
    redrives: int
    content_type: str
    def __init__(self, id: _Optional[str] = ..., function: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[InvocationState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., result: _Optional[_Union[InvokeResponse, _Mapping]] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., policy: _Optional[_Union[AsyncPolicy, _Mapping]] = ..., redrives: _Optional[int] = ..., content_type: _Optional[str] = ...) -> None: ...

class GetInvocationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListInvocationsRequest(_message.Message):
    __slots__ = ("function", "state", "page_size", "page_token")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    function: str
    state: InvocationState
    page_size: int
    page_token: str
    def __init__(self, function: _Optional[str] = ..., state: _Optional[_Union[InvocationState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListInvocationsResponse(_message.Message):
    __slots__ = ("invocations", "next_page_token")
    INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    invocations: _containers.RepeatedCompositeFieldContainer[AsyncInvocation]
    next_page_token: str
    def __init__(self, invocations: _Optional[_Iterable[_Union[AsyncInvocation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelInvocationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RedriveInvocationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
