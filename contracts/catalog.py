"""Which event travels on which subject: the single table consumers and producers share."""

from __future__ import annotations

from . import subjects
from .dataset import DatasetRejectedEvent, DatasetValidatedEvent
from .deadletter import DeadLetterEvent
from .envelope import Envelope
from .evaluation import EvaluationCompletedEvent, EvaluationFailedEvent
from .registry import AdapterRegisteredEvent
from .training import (
    TrainingCancelledEvent,
    TrainingCompletedEvent,
    TrainingFailedEvent,
    TrainingProgressEvent,
    TrainingRefusedEvent,
    TrainingRequestedEvent,
    TrainingStartedEvent,
)

EVENTS: dict[str, type[Envelope]] = {
    subjects.TRAINING_REQUESTED: TrainingRequestedEvent,
    subjects.TRAINING_REFUSED: TrainingRefusedEvent,
    subjects.DATASET_VALIDATED: DatasetValidatedEvent,
    subjects.DATASET_REJECTED: DatasetRejectedEvent,
    subjects.TRAINING_STARTED: TrainingStartedEvent,
    subjects.TRAINING_PROGRESS: TrainingProgressEvent,
    subjects.TRAINING_COMPLETED: TrainingCompletedEvent,
    subjects.TRAINING_FAILED: TrainingFailedEvent,
    subjects.TRAINING_CANCELLED: TrainingCancelledEvent,
    subjects.EVALUATION_COMPLETED: EvaluationCompletedEvent,
    subjects.EVALUATION_FAILED: EvaluationFailedEvent,
    subjects.ADAPTER_REGISTERED: AdapterRegisteredEvent,
}

SUBJECT_OF: dict[type[Envelope], str] = {event: subject for subject, event in EVENTS.items()}


def event_for_subject(subject: str) -> type[Envelope]:
    if subject.startswith(subjects.DEAD_LETTER + "."):
        return DeadLetterEvent
    return EVENTS[subject]


def subject_of(event: Envelope) -> str:
    """The subject an event is published on (dead letters carry their service in the subject)."""
    if isinstance(event, DeadLetterEvent):
        return subjects.dead_letter(event.data.service)
    return SUBJECT_OF[type(event)]
