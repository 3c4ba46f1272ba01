"""S3 credentials that change under a running process: a key revoked at once, before it expires."""

from __future__ import annotations

import gc
import io
import os
import pickle

import pytest
from pyarrow import fs as pafs

from pipelines import arrowfs, checkpoint, storage
from pipelines.errors import StageError

from . import services as sv
from .test_multinode_s3 import NodeKeys

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SeaweedFS S3 and this process's environment set as a node's: its key comes from a
    profile's credential_process, valid for an hour, so botocore would keep it that long."""
    s3 = sv.SeaweedFS(tmp_path / "s3")
    s3.start()
    try:
        keys = NodeKeys(tmp_path / "keys", lifetime_s=3600)
        s3.identities([keys.identity(keys.keys)])
        for k, v in {**s3.env, **keys.env(), "AWS_ENDPOINT_URL": s3.env["AWS_ENDPOINT_URL"]}.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        yield s3, keys
    finally:
        s3.stop()


def _revoke_and_replace(s3, keys: NodeKeys) -> tuple[str, str]:
    """What an operator does on a leak: a new key issued and handed out, the old one revoked at
    once, long before it expires. Returns once the server refuses the old key."""
    old, new = keys.keys[-1], keys.make()
    s3.identities([keys.identity([old, new])])
    sv.wait_for(lambda: not _refused(new, s3.port), "the new key's issue", 30)
    keys.hand_out(new)
    s3.identities([keys.identity([new])])
    sv.wait_for(lambda: _refused(old, s3.port), "the old key's revocation", 30)
    return new


def _key_in_use() -> str:
    return storage.s3_client()._get_credentials().access_key


def test_a_key_revoked_before_it_expires_is_replaced_by_the_one_handed_out_now(store):
    """The operator revokes the process's key at once: the next request is refused, the client
    reads the credential chain afresh and goes on with the new key. With every key revoked,
    one clear line."""
    s3, keys = store
    url = f"s3://{sv.BUCKET}/creds/doc.json"
    storage.write_json(url, {"written": "with the first key"})
    assert _key_in_use() == keys.keys[0][0]

    new = _revoke_and_replace(s3, keys)
    assert storage.read_json(url) == {"written": "with the first key"}  # refused once, then the new key
    assert _key_in_use() == new[0]

    s3.identities([keys.identity([keys.make()])])  # the key handed out revoked too: a clear error
    sv.wait_for(lambda: _refused(new, s3.port), "the new key's revocation", 30)
    with pytest.raises(StageError, match=r"refused the credentials for .*doc.json.*key ending .*read afresh once"):
        storage.read_json(url)


def test_checkpoints_on_s3_go_on_through_a_key_revoked_before_it_expires(store, tmp_path):
    """A checkpoint is uploaded as the training workers upload it (``checkpoint.upload``) and
    read back as Ray Train reads it: ``pyarrow.fs.copy_files`` from the filesystem ``arrowfs``
    gives Ray, threads on. The key is revoked between two checkpoints: the second uploads with
    the new key, both read back byte for byte, and listing and deleting answer as Ray's
    checkpoint manager asks. With every key revoked, an upload and a file closed through the
    filesystem raise (never a checkpoint registered that is not there); a file dropped unclosed
    leaves no object; the filesystem pickles to a worker without a credential."""
    s3, keys = store
    run = f"s3://{sv.BUCKET}/ray/run"
    fs, root = arrowfs.filesystem(run + "/")
    state = os.urandom(storage.MULTIPART_THRESHOLD + (1 << 20))  # uploaded in parts

    checkpoint.upload(io.BytesIO(state), "sha256:0", f"{run}/checkpoint_1")
    assert _key_in_use() == keys.keys[0][0]
    new = _revoke_and_replace(s3, keys)
    checkpoint.upload(io.BytesIO(state), "sha256:0", f"{run}/checkpoint_2")
    assert _key_in_use() == new[0]

    for name in ("checkpoint_1", "checkpoint_2"):
        out = tmp_path / "restored" / name
        out.mkdir(parents=True)
        pafs.copy_files(f"{root}/{name}", str(out), source_filesystem=fs, use_threads=True)
        assert (out / checkpoint.STATE_FILE).read_bytes() == state
        assert (out / checkpoint.CHECKSUM_FILE).read_text() == "sha256:0"
    listed = fs.get_file_info(pafs.FileSelector(root))
    assert sorted((i.base_name, i.type) for i in listed) == [
        ("checkpoint_1", pafs.FileType.Directory),
        ("checkpoint_2", pafs.FileType.Directory),
    ]
    assert fs.get_file_info(f"{root}/checkpoint_2/state.pt").size == len(state)
    fs.delete_dir(f"{root}/checkpoint_1")
    assert fs.get_file_info(f"{root}/checkpoint_1").type == pafs.FileType.NotFound
    assert fs.get_file_info(pafs.FileSelector(f"{root}/gone", allow_not_found=True)) == []

    stream = fs.open_output_stream(f"{root}/half.bin")
    stream.write(b"half of a file")
    del stream  # a copy that failed midway never closes its file
    gc.collect()
    assert fs.get_file_info(f"{root}/half.bin").type == pafs.FileType.NotFound

    pickled = pickle.dumps(fs)
    assert pickle.loads(pickled) == fs
    assert not any(secret.encode() in pickled for _, secret in keys.keys)

    s3.identities([keys.identity([keys.make()])])  # every key the node has is revoked
    sv.wait_for(lambda: _refused(new, s3.port), "the new key's revocation", 30)
    with pytest.raises(StageError, match=r"refused the credentials for .*checkpoint_3/state.pt"):
        checkpoint.upload(io.BytesIO(state), "sha256:0", f"{run}/checkpoint_3")
    stream = fs.open_output_stream(f"{root}/snapshot.json")
    stream.write(b"{}")
    with pytest.raises(StageError, match=r"refused the credentials for .*snapshot.json"):
        stream.close()


def _refused(key: tuple[str, str], port: int) -> bool:
    """True once the server refuses ``key`` (it reloads its identities on SIGHUP, in its own time)."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.session.Session().client(  # a session of its own: the profile of the moment
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=key[0],
        aws_secret_access_key=key[1],
        region_name="us-east-1",
    )
    try:
        client.list_objects_v2(Bucket=sv.BUCKET, MaxKeys=1)
    except ClientError:
        return True
    return False
