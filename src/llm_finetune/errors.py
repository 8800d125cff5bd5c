"""Every error whose message is the whole story for the user, under one base the CLI catches.

Each class names a stage, so a caller (the CLI, a test, a future web UI) can tell where a run
stopped; the message itself names the file, line or key and the fix. The CLI prints
`llm-finetune VERB: error: MESSAGE` and exits 2, without a traceback, for any `UserError`.
Each also derives from the builtin a caller would expect (`ValueError`, `FileNotFoundError`).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes by changing their input; the message says where and how."""


class ConfigError(UserError, ValueError):
    """A configuration key or a combination of keys is wrong."""


class DataError(UserError, ValueError):
    """A data file, row or split cannot be used (names file:line)."""


class TemplateError(UserError, ValueError):
    """A chat template cannot render or mask the data as training needs."""


class MethodError(UserError, ValueError):
    """A method cannot be built or run as configured; says why and what to use instead."""


class ModelSourceError(UserError, RuntimeError):
    """The base model cannot be found or loaded from where the config points."""


class ArtifactError(UserError, FileNotFoundError):
    """A folder or file is not the artifact a command expects (an adapter folder, a run's JSON)."""


class EvalSetupError(UserError, ValueError):
    """The eval verb was asked for something it cannot compare (missing adapter, no eval file)."""


class ExportError(UserError, ValueError):
    """A merged model or GGUF cannot be produced from this input."""


class TrainingInterrupted(UserError):
    """Ctrl-C / SIGTERM stopped training after a checkpoint was written; the message says how to resume."""


class TrainingDiverged(UserError):
    """A non-finite loss or gradient stopped training before the optimizer step; names the step and examples."""


class DiskFull(UserError):
    """A checkpoint could not be written for lack of space; the previous one is intact."""


class HubError(UserError, ValueError):
    """Pushing to the Hub cannot proceed."""


class SaveCheckFailed(UserError):
    """The saved weights are not the trained ones (a partial sharded save); the previous adapter is kept."""
