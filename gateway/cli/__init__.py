"""Every command (``serve``, ``demo``, ``token``, ``seed``, ``purge``, ``emulator``) and the
process runner for ``serve --workers N``.

May import anything in the package; the emulator only inside the commands that run it
(its defaults come from :mod:`gateway.emulator.defaults`, which imports nothing).
Nothing imports the CLI.
"""
