"""The ``gradflow`` command group. Each command lives in its own module and imports heavy libraries
(torch, pandas, matplotlib) only when it runs: ``--help``, ``COMMAND --help`` and ``list`` never
import them (tests/cli/test_lazy.py)."""

from __future__ import annotations

import sys

import click

from .._version import __version__

USAGE_EXIT = 2  # the command line itself is wrong: unknown command/option, missing argument, bad value
ERROR_EXIT = 1  # the command line was fine but the command failed (bad spec, missing file, ...)
# bare ``gradflow``: click >= 8.2 raises this usage error to show the help; older click exits 0 itself
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineGroup(click.Group):
    """The error convention of every command: a usage error exits 2, any other error exits 1, and both
    print one line on stderr, ``Error: <what>``; a usage error's line ends with where to look next
    (``(see 'gradflow run --help')``). Help, version and success exit 0 as click's do."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # bare ``gradflow``: the help, as click shows it
            exc.show()
            sys.exit(USAGE_EXIT)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} {max(exc.ctx.help_option_names, key=len)}')"
            msg = " ".join(exc.format_message().split()).rstrip()
            click.echo(f"Error: {msg}{hint}", err=True)
            sys.exit(USAGE_EXIT)
        except click.ClickException as exc:
            click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code if exc.exit_code not in (0, USAGE_EXIT) else ERROR_EXIT)
        except click.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(ERROR_EXIT)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gradflow")
def cli():
    """gradflow: where and why gradients vanish or explode in recurrent networks.

    \b
    Examples:
      gradflow demo                                # tanh RNN vs LSTM vs GRU (+ clipping), HTML + PDF
      gradflow list                                # tasks, cells and the shipped analyses
      gradflow run checksum                        # one shipped study into runs/checksum/
      gradflow report runs/checksum --html r.html --pdf r.pdf
      gradflow inspect mypkg.models:make_model --shape 50,16,8
    """


def _register():
    from . import cmd_demo, cmd_inspect, cmd_list, cmd_report, cmd_run, cmd_sweep

    for mod in (cmd_demo, cmd_run, cmd_sweep, cmd_report, cmd_inspect, cmd_list):
        cli.add_command(mod.command)


_register()
