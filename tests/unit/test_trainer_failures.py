"""Which training errors end a job (TrainingFailed, with their kind) and which hand it back."""

from __future__ import annotations

from tunebus.services.trainer.runner import _error_type, _store_unavailable
from tunebus.shared.objectstore import StoreUnavailable


def raised_from_a_hook(error: Exception) -> Exception:
    """What a backend raises when a hook (a checkpoint upload) failed inside its loop."""
    try:
        try:
            raise error
        except Exception as e:
            raise RuntimeError("callback on_save failed") from e
    except RuntimeError as wrapped:
        return wrapped


def test_s3_down_past_its_bound_behind_a_backend_error_hands_the_job_back():
    unavailable = StoreUnavailable("S3 at http://s3 unreachable for 60s (upload of …)")
    assert _store_unavailable(raised_from_a_hook(unavailable)) is unavailable
    assert _store_unavailable(raised_from_a_hook(ValueError("bad row"))) is None


def test_a_deterministic_failure_says_which_kind():
    assert _error_type(MemoryError()) == "out_of_memory"
    assert _error_type(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "out_of_memory"
    assert _error_type(ValueError("shapes do not match")) == "training_error"
