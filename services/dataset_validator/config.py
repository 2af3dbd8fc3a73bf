"""The validator's own knobs, read from the environment (`TUNEBUS_VALIDATOR__MAX_ROWS=…`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .validation import Limits, Policy, Refinement


class ValidatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEBUS_VALIDATOR__", extra="ignore")

    # Limits: going over one is a clear rejection, never an outage.
    max_bytes: int = Field(default=1 << 30, ge=1, description="Decompressed, all files together.")
    max_rows: int = Field(default=10_000_000, ge=1)
    max_line_bytes: int = Field(default=1 << 20, ge=16,
                                description="One JSONL line or array element.")
    max_depth: int = Field(default=32, ge=2, description="JSON nesting of one row.")
    # Refinement of the training data.
    dedupe: bool = True
    min_chars: int = Field(default=0, ge=0, description="Drop rows with less text than this.")
    max_chars: int | None = Field(default=None, ge=1, description="Drop rows with more.")
    # Count row lengths with the base model's tokenizer (fetches its tokenizer.json only).
    use_tokenizer: bool = True
    # Errors and warnings kept in a report (all are counted).
    max_errors: int = Field(default=50, ge=1)
    # A dataset with fewer rows left than this is rejected (after on_invalid: drop, too).
    min_rows: int = Field(default=1, ge=1, description="Fewest rows a dataset may keep.")

    def policy(self) -> Policy:
        """These settings as the validation policy (`Policy()` holds their defaults)."""
        return Policy(self.limits(), self.refinement(), self.min_rows, self.max_errors)

    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_bytes, max_rows=self.max_rows,
                      max_line_bytes=self.max_line_bytes, max_depth=self.max_depth)

    def refinement(self) -> Refinement:
        return Refinement(dedupe=self.dedupe, min_chars=self.min_chars, max_chars=self.max_chars)
