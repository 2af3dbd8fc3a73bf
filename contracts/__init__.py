"""tunebus contracts: every message on the bus, as versioned pydantic models.

Import the models from here; `catalog` says which subject each event travels on.
"""

from . import subjects
from .catalog import EVENTS, event_for_subject, subject_of
from .dataset import (
    DatasetRejected,
    DatasetRejectedEvent,
    DatasetReport,
    DatasetValidated,
    DatasetValidatedEvent,
    RowError,
    ValidateDataset,
)
from .deadletter import DeadLetter, DeadLetterEvent, ReplayDeadLetter, ReplayReply
from .envelope import Envelope, Model, Payload, new_event_id
from .evaluation import (
    EvaluationCompleted,
    EvaluationCompletedEvent,
    EvaluationFailed,
    EvaluationFailedEvent,
    LossMetrics,
)
from .inference import (
    AdapterLoadReply,
    ChatMessage,
    Generate,
    Generation,
    GenerationChunk,
    ListLoadedAdapters,
    LoadAdapter,
    LoadedAdapter,
    LoadedAdapters,
    UnloadAdapter,
)
from .registry import (
    AdapterEntry,
    AdapterList,
    AdapterRegistered,
    AdapterRegisteredEvent,
    AdapterReply,
    AliasReply,
    DeleteAdapter,
    DownloadUrls,
    GetAdapter,
    GetDownloadUrls,
    ListAdapters,
    PromoteAdapter,
    ResolveAdapter,
    RollbackAdapter,
)
from .training import (
    AdapterSettings,
    Artifact,
    CancelReply,
    CancelTraining,
    DatasetSpec,
    DatasetSummary,
    EvaluationSettings,
    Hyperparameters,
    Probe,
    TrainerCapabilities,
    TrainingCancelled,
    TrainingCancelledEvent,
    TrainingCompleted,
    TrainingCompletedEvent,
    TrainingFailed,
    TrainingFailedEvent,
    TrainingMetrics,
    TrainingProgress,
    TrainingRefused,
    TrainingRefusedEvent,
    TrainingProgressEvent,
    TrainingRequested,
    TrainingRequestedEvent,
    TrainingStarted,
    TrainingStartedEvent,
)

__all__ = [name for name in dir() if not name.startswith("_")]
