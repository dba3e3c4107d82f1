"""Keep secrets out of the run directory: redaction of config trees and command lines.

A value is replaced by `<redacted>` when its field name looks like a secret (`wandb_api_key`,
`hf_token`, `password`: whole words of the name), and any string is scrubbed of values that look
like secrets whatever field holds them:

* the password of a URL (`https://user:pass@host` -> `https://user:<redacted>@host`);
* access tokens by their documented prefixes: Hugging Face `hf_...`, OpenAI-style `sk-...`,
  GitHub `ghp_...` / `github_pat_...`;
* a whole value of 40 hex digits, the shape of a W&B API key (a git commit id given as a whole
  value is redacted too; one inside a path, such as a hub cache's `snapshots/<sha>/`, is kept).

`<run_dir>/config.yaml`, the config that W&B stores, and the argv that W&B records in its run
metadata (`wandb_run.open_run`) all pass through here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

REDACTED = "<redacted>"
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credentials"}

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)")
_TOKENS = re.compile(
    r"(?<![A-Za-z0-9_-])(?:hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})"
    r"(?![A-Za-z0-9_-])"
)
_HEX_KEY = re.compile(r"\s*[0-9a-fA-F]{40}\s*")


def is_secret_name(name) -> bool:
    """Whole words only: wandb_api_key and hf_token are secrets, tokenizer and keep_last are not."""
    return bool(SECRET_WORDS & set(re.split(r"[_\-.]", str(name).lower().lstrip("+~-"))))


def scrub(text: str) -> str:
    """`text` with URL passwords and token-shaped values replaced by <redacted>."""
    if _HEX_KEY.fullmatch(text):
        return REDACTED
    return _TOKENS.sub(REDACTED, _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text))


def redact(node):
    """A copy of a config tree (dicts, lists, scalars): secret-named fields redacted, strings scrubbed."""
    if isinstance(node, dict):
        return {k: (REDACTED if v and is_secret_name(k) else redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return scrub(node) if isinstance(node, str) else node


def redact_args(argv: Sequence[str]) -> list[str]:
    """Command-line arguments (`key=value` overrides, `--flag=value`) redacted like config fields."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        secret = eq and value and is_secret_name(key.rsplit(".", 1)[-1])
        out.append(f"{key}={REDACTED}" if secret else f"{key}={scrub(value)}" if eq else scrub(arg))
    return out
