"""``python -m s2t.cli`` (and ``accelerate launch -m s2t.cli``) runs the ``s2t`` command."""

from s2t.cli import app

app()
