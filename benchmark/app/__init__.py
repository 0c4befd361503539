"""Layer 4, the application: the commands of ``python -m benchmark``.

``cli`` (the dispatcher), ``builder`` (the LightningCLI run builder: recipes, short flags, run
records), ``suites`` (grids of fits, launchers, sweep export), ``leaderboard`` /
``leaderboard_figures`` / ``paper_tables`` / ``wandb_report`` / ``status`` (reading results),
``analysis`` and ``perf`` (figure and benchmark commands). Nothing below imports it.
"""
