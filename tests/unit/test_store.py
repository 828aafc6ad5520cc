"""The store: which Milvus server versions it accepts, and Milvus Lite's one writer."""
from __future__ import annotations

import pytest

from search_service.errors import UnsupportedMilvus
from search_service.store.milvus import check_server_version


@pytest.mark.parametrize("version", ["v2.3.5-lite", "v2.3.0", "2.4.23", "v2.6.15", "v3.0.0-beta",
                                     "master-20261101", ""])
def test_supported_or_unknown_versions_pass(version):
    check_server_version(version)


@pytest.mark.parametrize("version", ["v2.2.16", "2.1.4", "v1.1.1"])
def test_older_servers_are_refused_with_what_to_do(version):
    with pytest.raises(UnsupportedMilvus, match=f"Milvus {version} is older than 2.3.*upgrade"):
        check_server_version(version)


def test_every_milvus_lite_call_but_the_reads_takes_the_one_writer():
    """Inserts, upserts, deletes, flushes and collection, index, alias and
    load changes wait for each other on Milvus Lite (its WAL takes no lock);
    the reads listed in READS do not, and each of those is a call that
    milvus-lite still has (a renamed one would silently become a write)."""
    from milvus_lite.adapter.grpc.servicer import MilvusServicer

    from search_service.store.lite import READS, one_writer

    class Servicer(MilvusServicer):
        def __init__(self):  # no database: only which methods are wrapped is looked at
            pass

    servicer = Servicer()
    one_writer(servicer)
    wrapped = {name for name in vars(servicer)}
    assert READS <= set(dir(MilvusServicer))
    assert not READS & wrapped
    assert {"Insert", "Upsert", "Delete", "Flush", "CreateCollection", "DropCollection",
            "CreateIndex", "LoadCollection", "ReleaseCollection", "CreateAlias", "AlterAlias",
            "DropAlias", "RenameCollection", "TruncateCollection", "ManualCompaction"} <= wrapped
