"""The Milvus server versions the search service accepts."""
from __future__ import annotations

import pytest

from search_service.errors import UnsupportedMilvus
from search_service.store import check_server_version


@pytest.mark.parametrize("version", ["v2.3.5-lite", "v2.3.0", "2.4.23", "v2.6.15", "v3.0.0-beta",
                                     "master-20261101", ""])
def test_supported_or_unknown_versions_pass(version):
    check_server_version(version)


@pytest.mark.parametrize("version", ["v2.2.16", "2.1.4", "v1.1.1"])
def test_older_servers_are_refused_with_what_to_do(version):
    with pytest.raises(UnsupportedMilvus, match=f"Milvus {version} is older than 2.3.*upgrade"):
        check_server_version(version)
