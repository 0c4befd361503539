"""Whether W&B has credentials: a light module (wandb is imported only when asked), so that the
leaderboard can check a login before reading a project without importing Lightning."""

from __future__ import annotations

import os


def wandb_logged_in() -> bool:
    """Whether W&B has credentials for the server it is configured to use (SaaS or self-hosted).

    W&B's own resolution: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or the ``.netrc``
    entry for ``wandb.setup().settings.base_url`` (which ``WANDB_BASE_URL`` and ``wandb login
    --host`` set). Older W&B releases without ``wbauth`` fall back to the ``.netrc`` entry of
    the same host read with the standard library.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    host = os.environ.get("WANDB_BASE_URL")
    if not host:
        try:  # the server `wandb login --host` saved in W&B's settings file
            host = str(wandb.setup().settings.base_url)
        except Exception:  # a broken settings file: W&B itself would not know its server either
            host = "https://api.wandb.ai"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # optional: wandb >= 0.2x
    except ImportError:
        read_netrc_auth = None
    if read_netrc_auth is not None:
        try:
            return read_netrc_auth(host=host) is not None
        except Exception:  # a malformed key: W&B would refuse it too
            return False
    import netrc
    from urllib.parse import urlparse

    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(host).hostname or host)
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None
