"""``python -m benchmark``: the command dispatcher.

``fit`` / ``validate`` / ``test`` build a run with :mod:`benchmark.app.builder` (LightningCLI underneath)
and record its status and exit code; ``list``, ``perf``, ``analyze``, ``suite``, ``status`` and
``leaderboard`` run their own modules. The light commands (``--help``, ``list``, ``status``,
``leaderboard``, ``suite status|paper-table|list``) are dispatched by :mod:`benchmark.__main__`
before this module's heavy imports; importing this module pulls in torch and Lightning.

Errors are classified by type, not by where they were raised: a :class:`~benchmark.core.errors.UserError`
(found in the exception's cause chain, since jsonargparse wraps what a constructor raises) is
printed as one paragraph with exit code 2; anything else is a bug and keeps its traceback. The
exit codes are those of :mod:`benchmark.core.errors` (docs/cli.md, "Exit codes and run status").
"""

from __future__ import annotations

import contextlib
import sys

from benchmark.app import analysis
from benchmark.app.builder import build_cli, user_error
from benchmark.app.leaderboard import main as leaderboard_main
from benchmark.app.listing import main as list_main
from benchmark.app.status import main as status_main
from benchmark.app.suites.command import main as suite_main
from benchmark.core import registry
from benchmark.core.defaults import DEFAULT_DATA, DEFAULT_METHOD, USAGE
from benchmark.core.errors import EXIT_FAILED, EXIT_SIGINT, EXIT_USER, CLIError
from benchmark.engine.training import (
    RunStatus,
)
from benchmark.engine.wandb_logger import (
    finish_wandb_run,
    log_results_artifact,
)
from methods.base import NonFiniteLossError


def _dispatch(kind: str, argv: list[str]) -> int:
    """Run the ``perf`` / ``analyze`` command that a module registered (``benchmark.core.contracts``).

    ``--plugin MODULE`` before the name imports a module that registers more commands.

    The tools are discovered here, not at start-up: a ``fit`` never imports the perf and analysis
    modules (``registry.discover_tools`` imports ``benchmark/app/perf/``, ``companions/`` and the
    ``benchmark.perf`` / ``benchmark.analysis`` entry points).

    Args:
        kind: ``"perf"`` or ``"analyze"``: which registry table the name is looked up in.
        argv: the arguments after the command word: ``[--plugin MODULE ...] NAME [options]``;
            nothing, ``-h`` or ``--help`` lists the registered commands with their summaries and
            owning modules.

    Returns:
        The command's exit code (``None`` from a command counts as 0), or 0 after the listing.

    Raises:
        UnknownNameError: ``NAME`` is not registered (a user error: exit 2, with the known names).
    """
    plugins: list[str] = []
    # Only leading --plugin pairs: after NAME the arguments belong to the command itself.
    while len(argv) >= 2 and argv[0] == "--plugin":
        plugins.append(argv[1])
        argv = argv[2:]
    registry.discover_tools(plugins)
    registry.set_figure_runner(analysis.figure_main)  # `analyze NAME` of a registered figure draws it here
    table = registry.PERF_COMMANDS if kind == "perf" else registry.ANALYSES
    if not argv or argv[0] in ("-h", "--help"):
        width = max((len(name) for name in table), default=0)
        lines = [f"  {name:<{width}}  {cmd.summary}  [{cmd.owner}]" for name, cmd in sorted(table.items())]
        print(f"usage: python -m benchmark {kind} [--plugin MODULE] NAME [options]\n\n" + "\n".join(lines))
        return 0
    return int(registry.get_command(kind, argv[0]).run(argv[1:]) or 0)


def cmd_perf(argv: list[str]) -> int:
    """``perf NAME``: a registered performance benchmark (``perf --help`` lists them; :func:`_dispatch`)."""
    return _dispatch("perf", argv)


def cmd_analyze(argv: list[str]) -> int:
    """``analyze NAME``: a registered analysis or a figure (listed by ``analyze --help``)."""
    return _dispatch("analyze", argv)


def cmd_suite(argv: list[str]) -> int:
    """``suite ...``: :mod:`benchmark.app.suites`."""
    return suite_main(argv)


def cmd_leaderboard(argv: list[str]) -> int:
    """``leaderboard``: :mod:`benchmark.app.leaderboard` (normally reached through the light path first)."""
    return leaderboard_main(argv)


def _run_training_command(command: str, argv: list[str]) -> int:
    """fit / validate / test with the run's status recorded and exit codes as documented.

    0 completed, 2 user error, 1 failure, 130 interrupted by SIGINT, 143 by SIGTERM.

    The :class:`~benchmark.engine.training.RunStatus` is created before the run is built so that its
    signal handlers cover the whole command (start-up and data preparation included) and so that
    every way out, a return or an exception, writes ``status.json`` once the run has a folder.
    Before that (a parse error, ``--help``) there is nothing to write and ``status.write`` only
    keeps the exit code.

    Args:
        command: ``"fit"``, ``"validate"`` or ``"test"``.
        argv: the arguments after the command word, short flags not yet rewritten.

    Returns:
        The exit code. A user error found at start-up also removes the run folder this process
        created, if nothing of value was written to it.

    Raises:
        Exception: an internal error (not a :class:`~benchmark.core.errors.UserError`): the run is
            recorded as failed (exit 1) and the exception propagates with its traceback.
    """
    status = RunStatus(command)
    status.install_signal_handlers()
    try:
        build_cli(command, argv, status=status)
    except SystemExit as exit_:  # argparse errors (2), Lightning's exits after a signal
        # Lightning's SIGTERM path ends the fit with SIGTERMException, a SystemExit: the signal that
        # was recorded decides the code, whatever the exception carries.
        code = status.exit_code_for_signal()
        if code is None:
            # SystemExit(None) is a success and SystemExit("message") a failure, as Python exits with them;
            # --help and --print_config exit with 0 and are completed commands.
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USER)
            if code == 0:
                status.write("completed", 0)
                return 0
            status.write("failed", code, "exited during start-up" if code == EXIT_USER else f"exit {code}")
            return code
        reason = f"stopped by {'SIGINT' if code == EXIT_SIGINT else 'SIGTERM'}"
        if status.checkpoint is not None:
            reason += f"; resume with --ckpt_path {status.checkpoint}"
        status.write("interrupted", code, reason)
        print(f"[benchmark] {reason}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        # Ctrl-C where Lightning does not catch it (outside a trainer call: start-up, data preparation);
        # inside one, Lightning turns it into a SystemExit, handled above. No checkpoint is written.
        status.write("interrupted", EXIT_SIGINT, "stopped by SIGINT")
        return EXIT_SIGINT
    except NonFiniteLossError as err:
        # A diverged run is a result of its settings, not a bug: one line, no traceback, exit 1.
        status.write("failed", EXIT_FAILED, str(err))
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except BaseException as err:
        cause = user_error(err)
        if cause is None:
            status.write("failed", EXIT_FAILED, f"{type(err).__name__}: {err}")
            raise
        status.write("failed", EXIT_USER, str(cause))
        status.discard_unused_run_dir()  # a start-up error leaves no folder behind
        print(f"error: {cause}", file=sys.stderr)
        return EXIT_USER
    else:
        status.write("completed", 0)
        return 0
    finally:
        status.restore_signal_handlers()
        # Only after the final status is written: the results artifact snapshots status.json, and
        # a snapshot taken earlier would say "running" for ever.
        if status.run_dir is not None and status.is_rank_zero:
            with contextlib.suppress(Exception):  # a results snapshot must never turn a run into a failure
                log_results_artifact(status.run_dir)
        # Closed with the exit code, so that W&B marks a failed run as failed and a later command in
        # the same process (a notebook, a test) does not log into this run.
        finish_wandb_run(status.exit_code or 0)
        if status.run_dir is not None and status.state not in ("", "running") and status.is_rank_zero:
            print(f"[benchmark] run directory: {status.run_dir} ({status.state})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command of ``python -m benchmark`` and return its exit code.

    Args:
        argv: the command line without the program name (default ``sys.argv[1:]``): the command
            word (``fit``, ``validate``, ``test``, ``list``, ``status``, ``leaderboard``, ``suite``,
            ``perf``, ``analyze``) and its arguments; nothing, ``-h`` or ``--help`` prints the usage.

    Returns:
        The exit code: 0 completed, 1 failed, 2 a user error (printed as ``error: ...`` on stderr),
        130 / 143 stopped by SIGINT / SIGTERM (training commands and suites).

    Raises:
        Exception: an internal error of a command, with its traceback (never a user error).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(method=DEFAULT_METHOD, data=DEFAULT_DATA))
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"list": list_main, "perf": cmd_perf, "analyze": cmd_analyze, "leaderboard": cmd_leaderboard,
                "suite": cmd_suite, "status": status_main}
    try:
        if command in ("fit", "validate", "test"):
            if "-h" in rest or "--help" in rest:  # the short flags first, then LightningCLI's options
                # USAGE's "fit/validate/test options" section lists the short flags, which LightningCLI's
                # own help cannot show: they are rewritten before its parser sees the command line.
                short = USAGE.format(method=DEFAULT_METHOD, data=DEFAULT_DATA).split("fit/validate/test options", 1)[1]
                print("short flags (with LightningCLI's options below):\n" + short.split("\n", 1)[1])
            return _run_training_command(command, rest)
        if command in commands:
            return commands[command](rest)
        raise CLIError(
            f"Unknown command {command!r}. Choose one of: fit, validate, test, list, status, leaderboard, suite, perf, "
            "analyze."
        )
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # known user-facing errors: print the message, not a traceback
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
