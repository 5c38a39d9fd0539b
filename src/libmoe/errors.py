"""Exit codes and the errors the CLI turns into them (docs/reliability.md).

Every `libmoe` command exits with one of:
- 0 (`EXIT_OK`): everything asked for was done;
- 1 (`EXIT_FAILED`): some work failed (a bench run, a non-finite loss, an interruption by SIGTERM
  or SIGINT after its checkpoint was written); what finished is kept and the last line says what failed;
- 2 (`EXIT_USAGE`): bad input (arguments, config, a missing or damaged file), refused before any
  work, with one line naming the value and the fix.
Library code raises ValueError / FileNotFoundError (exit 2) or `WorkFailed` (exit 1); the CLI maps
them to the codes and prints one line, never a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class WorkFailed(RuntimeError):
    """Work was attempted and (some of it) failed; the message is the one line to print (exit 1)."""


class Interrupted(WorkFailed):
    """Training stopped by SIGTERM/SIGINT after writing a checkpoint; `--resume` continues it."""
