"""The ``gradflow`` command group. Each command lives in its own module and imports heavy libraries
(torch, pandas, matplotlib) only when it runs: ``--help``, ``COMMAND --help`` and ``list`` never
import them (tests/cli/test_lazy.py)."""

from __future__ import annotations

import click

from .._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
