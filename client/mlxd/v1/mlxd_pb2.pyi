from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]

class QuantMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANT_MODE_UNSPECIFIED: _ClassVar[QuantMode]
    QUANT_MODE_AFFINE: _ClassVar[QuantMode]
    QUANT_MODE_MXFP4: _ClassVar[QuantMode]
    QUANT_MODE_MXFP8: _ClassVar[QuantMode]
    QUANT_MODE_NVFP4: _ClassVar[QuantMode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
QUANT_MODE_UNSPECIFIED: QuantMode
QUANT_MODE_AFFINE: QuantMode
QUANT_MODE_MXFP4: QuantMode
QUANT_MODE_MXFP8: QuantMode
QUANT_MODE_NVFP4: QuantMode
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class InitializeRequest(_message.Message):
    __slots__ = ("protocol_version", "client_name", "client_version")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_name: str
    client_version: str
    def __init__(self, protocol_version: _Optional[int] = ..., client_name: _Optional[str] = ..., client_version: _Optional[str] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("architectures", "dtypes", "quant_modes", "quant_bits", "quant_group_sizes", "quant_recipes", "quant_mode_details")
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    QUANT_MODES_FIELD_NUMBER: _ClassVar[int]
    QUANT_BITS_FIELD_NUMBER: _ClassVar[int]
    QUANT_GROUP_SIZES_FIELD_NUMBER: _ClassVar[int]
    QUANT_RECIPES_FIELD_NUMBER: _ClassVar[int]
    QUANT_MODE_DETAILS_FIELD_NUMBER: _ClassVar[int]
    architectures: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[Dtype]
    quant_modes: _containers.RepeatedScalarFieldContainer[QuantMode]
    quant_bits: _containers.RepeatedScalarFieldContainer[int]
    quant_group_sizes: _containers.RepeatedScalarFieldContainer[int]
    quant_recipes: _containers.RepeatedScalarFieldContainer[str]
    quant_mode_details: _containers.RepeatedCompositeFieldContainer[QuantModeCapability]
    def __init__(self, architectures: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[Dtype, str]]] = ..., quant_modes: _Optional[_Iterable[_Union[QuantMode, str]]] = ..., quant_bits: _Optional[_Iterable[int]] = ..., quant_group_sizes: _Optional[_Iterable[int]] = ..., quant_recipes: _Optional[_Iterable[str]] = ..., quant_mode_details: _Optional[_Iterable[_Union[QuantModeCapability, _Mapping]]] = ...) -> None: ...

class QuantModeCapability(_message.Message):
    __slots__ = ("mode", "bits", "group_sizes", "default_bits", "default_group_size")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    mode: QuantMode
    bits: _containers.RepeatedScalarFieldContainer[int]
    group_sizes: _containers.RepeatedScalarFieldContainer[int]
    default_bits: int
    default_group_size: int
    def __init__(self, mode: _Optional[_Union[QuantMode, str]] = ..., bits: _Optional[_Iterable[int]] = ..., group_sizes: _Optional[_Iterable[int]] = ..., default_bits: _Optional[int] = ..., default_group_size: _Optional[int] = ...) -> None: ...

class InitializeResponse(_message.Message):
    __slots__ = ("protocol_version", "daemon_version", "capabilities", "pid", "address", "started_at_unix", "blas", "http_address")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    BLAS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    daemon_version: str
    capabilities: Capabilities
    pid: int
    address: str
    started_at_unix: float
    blas: str
    http_address: str
    def __init__(self, protocol_version: _Optional[int] = ..., daemon_version: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., pid: _Optional[int] = ..., address: _Optional[str] = ..., started_at_unix: _Optional[float] = ..., blas: _Optional[str] = ..., http_address: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("kind", "job_id", "stage", "items_done", "items_total", "bytes_done", "bytes_total", "message", "seq")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Progress.Kind]
        KIND_BEGIN: _ClassVar[Progress.Kind]
        KIND_REPORT: _ClassVar[Progress.Kind]
        KIND_END: _ClassVar[Progress.Kind]
    KIND_UNSPECIFIED: Progress.Kind
    KIND_BEGIN: Progress.Kind
    KIND_REPORT: Progress.Kind
    KIND_END: Progress.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_DONE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    kind: Progress.Kind
    job_id: str
    stage: str
    items_done: int
    items_total: int
    bytes_done: int
    bytes_total: int
    message: str
    seq: int
    def __init__(self, kind: _Optional[_Union[Progress.Kind, str]] = ..., job_id: _Optional[str] = ..., stage: _Optional[str] = ..., items_done: _Optional[int] = ..., items_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., message: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class QuantizationSpec(_message.Message):
    __slots__ = ("bits", "group_size", "mode", "overrides", "recipe", "method", "calibration_data", "calibration_seed")
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_DATA_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SEED_FIELD_NUMBER: _ClassVar[int]
    bits: int
    group_size: int
    mode: QuantMode
    overrides: _containers.RepeatedScalarFieldContainer[str]
    recipe: str
    method: str
    calibration_data: str
    calibration_seed: int
    def __init__(self, bits: _Optional[int] = ..., group_size: _Optional[int] = ..., mode: _Optional[_Union[QuantMode, str]] = ..., overrides: _Optional[_Iterable[str]] = ..., recipe: _Optional[str] = ..., method: _Optional[str] = ..., calibration_data: _Optional[str] = ..., calibration_seed: _Optional[int] = ...) -> None: ...

class LayerQuantReport(_message.Message):
    __slots__ = ("name", "bits", "group_size", "mode", "rel_error", "bytes_before", "bytes_after", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    bits: int
    group_size: int
    mode: QuantMode
    rel_error: float
    bytes_before: int
    bytes_after: int
    note: str
    def __init__(self, name: _Optional[str] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., mode: _Optional[_Union[QuantMode, str]] = ..., rel_error: _Optional[float] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("file", "bytes", "tensors")
    FILE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    file: str
    bytes: int
    tensors: int
    def __init__(self, file: _Optional[str] = ..., bytes: _Optional[int] = ..., tensors: _Optional[int] = ...) -> None: ...

class SkippedLayer(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ConvertRequest(_message.Message):
    __slots__ = ("src", "dst", "dtype", "max_shard_size", "overwrite", "dry_run", "quantize", "revision", "strict", "input_spec")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    dtype: Dtype
    max_shard_size: str
    overwrite: bool
    dry_run: bool
    quantize: QuantizationSpec
    revision: str
    strict: bool
    input_spec: str
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., max_shard_size: _Optional[str] = ..., overwrite: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., quantize: _Optional[_Union[QuantizationSpec, _Mapping]] = ..., revision: _Optional[str] = ..., strict: _Optional[bool] = ..., input_spec: _Optional[str] = ...) -> None: ...

class NonFiniteTensor(_message.Message):
    __slots__ = ("name", "nan_count", "inf_count", "first_index", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    nan_count: int
    inf_count: int
    first_index: _containers.RepeatedScalarFieldContainer[int]
    note: str
    def __init__(self, name: _Optional[str] = ..., nan_count: _Optional[int] = ..., inf_count: _Optional[int] = ..., first_index: _Optional[_Iterable[int]] = ..., note: _Optional[str] = ...) -> None: ...

class ConvertResult(_message.Message):
    __slots__ = ("job_id", "dst", "model_type", "dtype", "num_tensors", "num_parameters", "total_bytes", "shards", "copied_files", "dropped_tensors", "quantization", "quantized_layers", "skipped_layers", "seconds", "peak_rss_bytes", "dry_run", "layer_reports", "bits_per_weight", "bytes_before", "hub_source", "non_finite", "path", "config_fixes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    COPIED_FILES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    LAYER_REPORTS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    HUB_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIXES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    dst: str
    model_type: str
    dtype: Dtype
    num_tensors: int
    num_parameters: int
    total_bytes: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    copied_files: _containers.RepeatedScalarFieldContainer[str]
    dropped_tensors: _containers.RepeatedScalarFieldContainer[str]
    quantization: QuantizationSpec
    quantized_layers: _containers.RepeatedScalarFieldContainer[str]
    skipped_layers: _containers.RepeatedCompositeFieldContainer[SkippedLayer]
    seconds: float
    peak_rss_bytes: int
    dry_run: bool
    layer_reports: _containers.RepeatedCompositeFieldContainer[LayerQuantReport]
    bits_per_weight: float
    bytes_before: int
    hub_source: HubSource
    non_finite: _containers.RepeatedCompositeFieldContainer[NonFiniteTensor]
    path: str
    config_fixes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., dst: _Optional[str] = ..., model_type: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., num_tensors: _Optional[int] = ..., num_parameters: _Optional[int] = ..., total_bytes: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., copied_files: _Optional[_Iterable[str]] = ..., dropped_tensors: _Optional[_Iterable[str]] = ..., quantization: _Optional[_Union[QuantizationSpec, _Mapping]] = ..., quantized_layers: _Optional[_Iterable[str]] = ..., skipped_layers: _Optional[_Iterable[_Union[SkippedLayer, _Mapping]]] = ..., seconds: _Optional[float] = ..., peak_rss_bytes: _Optional[int] = ..., dry_run: _Optional[bool] = ..., layer_reports: _Optional[_Iterable[_Union[LayerQuantReport, _Mapping]]] = ..., bits_per_weight: _Optional[float] = ..., bytes_before: _Optional[int] = ..., hub_source: _Optional[_Union[HubSource, _Mapping]] = ..., non_finite: _Optional[_Iterable[_Union[NonFiniteTensor, _Mapping]]] = ..., path: _Optional[str] = ..., config_fixes: _Optional[_Iterable[str]] = ...) -> None: ...

class HubSource(_message.Message):
    __slots__ = ("repo_id", "revision", "commit_hash", "path")
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    COMMIT_HASH_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    repo_id: str
    revision: str
    commit_hash: str
    path: str
    def __init__(self, repo_id: _Optional[str] = ..., revision: _Optional[str] = ..., commit_hash: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ConvertResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ConvertResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ConvertResult, _Mapping]] = ...) -> None: ...

class QuantizeRequest(_message.Message):
    __slots__ = ("src", "dst", "spec", "overwrite", "dequantize", "dtype", "revision", "strict")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    DEQUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    spec: QuantizationSpec
    overwrite: bool
    dequantize: bool
    dtype: Dtype
    revision: str
    strict: bool
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., spec: _Optional[_Union[QuantizationSpec, _Mapping]] = ..., overwrite: _Optional[bool] = ..., dequantize: _Optional[bool] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., revision: _Optional[str] = ..., strict: _Optional[bool] = ...) -> None: ...

class QuantizeResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ConvertResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ConvertResult, _Mapping]] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("model_dir", "reference", "texts", "images", "inputs_npz", "reference_revision")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_NPZ_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    reference: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    inputs_npz: bytes
    reference_revision: str
    def __init__(self, model_dir: _Optional[str] = ..., reference: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[bytes]] = ..., inputs_npz: _Optional[bytes] = ..., reference_revision: _Optional[str] = ...) -> None: ...

class LayerReport(_message.Message):
    __slots__ = ("name", "rel_error", "max_abs", "cosine", "tolerance", "passed", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    rel_error: float
    max_abs: float
    cosine: float
    tolerance: float
    passed: bool
    note: str
    def __init__(self, name: _Optional[str] = ..., rel_error: _Optional[float] = ..., max_abs: _Optional[float] = ..., cosine: _Optional[float] = ..., tolerance: _Optional[float] = ..., passed: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class OutputReport(_message.Message):
    __slots__ = ("name", "max_abs", "max_rel", "cosine", "nmse", "atol", "rtol", "passed", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    NMSE_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    nmse: float
    atol: float
    rtol: float
    passed: bool
    note: str
    def __init__(self, name: _Optional[str] = ..., max_abs: _Optional[float] = ..., max_rel: _Optional[float] = ..., cosine: _Optional[float] = ..., nmse: _Optional[float] = ..., atol: _Optional[float] = ..., rtol: _Optional[float] = ..., passed: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class ValidationReport(_message.Message):
    __slots__ = ("job_id", "passed", "model_type", "dtype", "outputs", "matching_agreement", "num_texts", "num_images", "seconds", "report_path", "layers", "first_divergent_layer", "band", "reference_hub", "inputs_note", "agreement")
    class AgreementEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MATCHING_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    NUM_TEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DIVERGENT_LAYER_FIELD_NUMBER: _ClassVar[int]
    BAND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_HUB_FIELD_NUMBER: _ClassVar[int]
    INPUTS_NOTE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    passed: bool
    model_type: str
    dtype: str
    outputs: _containers.RepeatedCompositeFieldContainer[OutputReport]
    matching_agreement: float
    num_texts: int
    num_images: int
    seconds: float
    report_path: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerReport]
    first_divergent_layer: str
    band: str
    reference_hub: HubSource
    inputs_note: str
    agreement: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., passed: _Optional[bool] = ..., model_type: _Optional[str] = ..., dtype: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[OutputReport, _Mapping]]] = ..., matching_agreement: _Optional[float] = ..., num_texts: _Optional[int] = ..., num_images: _Optional[int] = ..., seconds: _Optional[float] = ..., report_path: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerReport, _Mapping]]] = ..., first_divergent_layer: _Optional[str] = ..., band: _Optional[str] = ..., reference_hub: _Optional[_Union[HubSource, _Mapping]] = ..., inputs_note: _Optional[str] = ..., agreement: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ValidateResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ValidationReport
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ValidationReport, _Mapping]] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "kind", "state", "src", "dst", "created_at_unix", "started_at_unix", "finished_at_unix", "error_code", "error_reason", "error_message", "last_progress", "events")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    state: JobState
    src: str
    dst: str
    created_at_unix: float
    started_at_unix: float
    finished_at_unix: float
    error_code: str
    error_reason: str
    error_message: str
    last_progress: Progress
    events: int
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., created_at_unix: _Optional[float] = ..., started_at_unix: _Optional[float] = ..., finished_at_unix: _Optional[float] = ..., error_code: _Optional[str] = ..., error_reason: _Optional[str] = ..., error_message: _Optional[str] = ..., last_progress: _Optional[_Union[Progress, _Mapping]] = ..., events: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job", "convert_result", "validation_report")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CONVERT_RESULT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_REPORT_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    convert_result: ConvertResult
    validation_report: ValidationReport
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., convert_result: _Optional[_Union[ConvertResult, _Mapping]] = ..., validation_report: _Optional[_Union[ValidationReport, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_seq: int
    def __init__(self, job_id: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("progress", "convert_result", "validation_report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CONVERT_RESULT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    convert_result: ConvertResult
    validation_report: ValidationReport
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., convert_result: _Optional[_Union[ConvertResult, _Mapping]] = ..., validation_report: _Optional[_Union[ValidationReport, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "texts", "images", "inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    inputs: _containers.MessageMap[str, Tensor]
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[bytes]] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("model", "text_embeds", "image_embeds", "logits_per_image", "seconds", "logits", "labels", "batch_requests", "outputs")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text_embeds: Tensor
    image_embeds: Tensor
    logits_per_image: Tensor
    seconds: float
    logits: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    batch_requests: int
    outputs: _containers.MessageMap[str, Tensor]
    def __init__(self, model: _Optional[str] = ..., text_embeds: _Optional[_Union[Tensor, _Mapping]] = ..., image_embeds: _Optional[_Union[Tensor, _Mapping]] = ..., logits_per_image: _Optional[_Union[Tensor, _Mapping]] = ..., seconds: _Optional[float] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., batch_requests: _Optional[int] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("token_id", "text")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("model", "text", "finish_reason", "prompt_tokens", "generation_tokens", "prompt_tokens_per_second", "generation_tokens_per_second", "seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tokens_per_second: float
    generation_tokens_per_second: float
    seconds: float
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., prompt_tokens_per_second: _Optional[float] = ..., generation_tokens_per_second: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "result")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    result: GenerateResult
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "model_type", "dtype", "compute_dtype", "resident_bytes", "loaded_at_unix", "last_used_unix", "infer_count", "total_parameters", "active_parameters", "tensor_parallel", "tensor_parallel_backend", "ranks", "warmup_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    INFER_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_BACKEND_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_type: str
    dtype: str
    compute_dtype: str
    resident_bytes: int
    loaded_at_unix: float
    last_used_unix: float
    infer_count: int
    total_parameters: int
    active_parameters: int
    tensor_parallel: int
    tensor_parallel_backend: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    warmup_seconds: float
    def __init__(self, id: _Optional[str] = ..., model_type: _Optional[str] = ..., dtype: _Optional[str] = ..., compute_dtype: _Optional[str] = ..., resident_bytes: _Optional[int] = ..., loaded_at_unix: _Optional[float] = ..., last_used_unix: _Optional[float] = ..., infer_count: _Optional[int] = ..., total_parameters: _Optional[int] = ..., active_parameters: _Optional[int] = ..., tensor_parallel: _Optional[int] = ..., tensor_parallel_backend: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ..., warmup_seconds: _Optional[float] = ...) -> None: ...

class RankInfo(_message.Message):
    __slots__ = ("rank", "host", "pid", "resident_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    host: str
    pid: int
    resident_bytes: int
    def __init__(self, rank: _Optional[int] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., resident_bytes: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("path", "keep_alive_seconds", "tensor_parallel", "hosts_file")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FILE_FIELD_NUMBER: _ClassVar[int]
    path: str
    keep_alive_seconds: float
    tensor_parallel: int
    hosts_file: str
    def __init__(self, path: _Optional[str] = ..., keep_alive_seconds: _Optional[float] = ..., tensor_parallel: _Optional[int] = ..., hosts_file: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model", "evicted")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., evicted: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Eviction(_message.Message):
    __slots__ = ("id", "reason", "at_unix")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    at_unix: float
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ..., at_unix: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "budget_bytes", "used_bytes", "recent_evictions", "worker_rss_bytes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKER_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    budget_bytes: int
    used_bytes: int
    recent_evictions: _containers.RepeatedCompositeFieldContainer[Eviction]
    worker_rss_bytes: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., recent_evictions: _Optional[_Iterable[_Union[Eviction, _Mapping]]] = ..., worker_rss_bytes: _Optional[int] = ...) -> None: ...

class ListCachedModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CachedModel(_message.Message):
    __slots__ = ("repo_id", "refs", "commit_hash", "snapshot_path", "model_type", "support", "size_on_disk", "complete")
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_HASH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    SIZE_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    repo_id: str
    refs: _containers.RepeatedScalarFieldContainer[str]
    commit_hash: str
    snapshot_path: str
    model_type: str
    support: str
    size_on_disk: int
    complete: bool
    def __init__(self, repo_id: _Optional[str] = ..., refs: _Optional[_Iterable[str]] = ..., commit_hash: _Optional[str] = ..., snapshot_path: _Optional[str] = ..., model_type: _Optional[str] = ..., support: _Optional[str] = ..., size_on_disk: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class ListCachedModelsResponse(_message.Message):
    __slots__ = ("cache_dir", "models", "offline")
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    cache_dir: str
    models: _containers.RepeatedCompositeFieldContainer[CachedModel]
    offline: bool
    def __init__(self, cache_dir: _Optional[str] = ..., models: _Optional[_Iterable[_Union[CachedModel, _Mapping]]] = ..., offline: _Optional[bool] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerateImageRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "num_images", "latents", "scheduler", "image", "strength")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    num_images: int
    latents: Tensor
    scheduler: str
    image: bytes
    strength: float
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_images: _Optional[int] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., scheduler: _Optional[str] = ..., image: _Optional[bytes] = ..., strength: _Optional[float] = ...) -> None: ...

class ImageStep(_message.Message):
    __slots__ = ("step", "total", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    seconds: float
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "png", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    png: bytes
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GenerateImageResult(_message.Message):
    __slots__ = ("model", "num_images", "width", "height", "steps", "scheduler", "seed", "seconds", "seconds_per_step", "truncated", "truncated_text", "negative_truncated")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TEXT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_images: int
    width: int
    height: int
    steps: int
    scheduler: str
    seed: int
    seconds: float
    seconds_per_step: float
    truncated: bool
    truncated_text: str
    negative_truncated: bool
    def __init__(self, model: _Optional[str] = ..., num_images: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., scheduler: _Optional[str] = ..., seed: _Optional[int] = ..., seconds: _Optional[float] = ..., seconds_per_step: _Optional[float] = ..., truncated: _Optional[bool] = ..., truncated_text: _Optional[str] = ..., negative_truncated: _Optional[bool] = ...) -> None: ...

class GenerateImageResponse(_message.Message):
    __slots__ = ("step", "image", "result")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    step: ImageStep
    image: GeneratedImage
    result: GenerateImageResult
    def __init__(self, step: _Optional[_Union[ImageStep, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ..., result: _Optional[_Union[GenerateImageResult, _Mapping]] = ...) -> None: ...
