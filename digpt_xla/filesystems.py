"""Whether fsspec can open a URL's filesystem here: ``gs://`` needs gcsfs, ``http(s)://`` aiohttp. Config loading
and the shard reader ask before they start, so a missing package is one line naming the URL, not an ImportError
in the middle of a run."""

from __future__ import annotations

import fsspec


def protocol_problem(url: str) -> str | None:
    """What stops fsspec from opening ``url`` here, or None."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        hint = " (pip install 'digpt_xla[gcs]')" if protocol in ("gs", "gcs") else ""
        return f"{protocol}:// needs a package that is not installed{hint}: {str(e).splitlines()[0]}"
    except ValueError:
        return f"unknown protocol {protocol}:// (fsspec knows no such filesystem)"
    return None
