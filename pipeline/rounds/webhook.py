"""The shared secret of a campaign's Label Studio webhook: the header it travels in, and where it is read.

`campaign init --webhook` registers it with the project, `campaign serve` checks it on every request; both
read it here, so neither depends on the other.
"""

from __future__ import annotations

import os
from pathlib import Path

SECRET_HEADER = "X-Bayescurate-Secret"  # the header Label Studio sends the shared secret in
SECRET_ENV = "BAYESCURATE_WEBHOOK_SECRET"
MIN_SECRET = 16  # characters


def read_secret(secret_file: str | Path | None = None) -> str:
    """The webhook's shared secret: the contents of `secret_file`, else `$BAYESCURATE_WEBHOOK_SECRET`.

    Never a flag value (it would show in `ps` and shell histories); errors name where it came from, never it.
    """
    if secret_file:
        path = Path(secret_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"webhook secret file {str(path)!r} does not exist")
        secret, where = path.read_text().strip(), f"the webhook secret file {str(path)!r}"
    else:
        secret, where = os.environ.get(SECRET_ENV, "").strip(), f"${SECRET_ENV}"
        if not secret:
            raise ValueError(
                f"no webhook secret: set ${SECRET_ENV} or pass --secret-file (a file holding it)"
            )
    if len(secret) < MIN_SECRET:
        raise ValueError(
            f"{where} holds a secret of {len(secret)} characters, fewer than {MIN_SECRET}; make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return secret
