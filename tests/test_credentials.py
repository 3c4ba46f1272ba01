"""S3 credentials that change under a running process: a key revoked at once, before it expires."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.errors import StageError

from . import services as sv
from .test_multinode_s3 import NodeKeys

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def test_a_key_revoked_before_it_expires_is_replaced_by_the_one_handed_out_now(tmp_path, monkeypatch):
    """The process's key comes from a profile's credential_process, valid for an hour, so
    botocore would keep it that long. The operator issues a new key, hands it out and revokes the
    old one at once (the answer to a leak): the next request is refused, the client reads the
    credential chain afresh and goes on with the new key. With every key revoked, one clear line."""
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
        url = f"s3://{sv.BUCKET}/creds/doc.json"
        storage.write_json(url, {"written": "with the first key"})
        assert storage.s3_client()._get_credentials().access_key == keys.keys[0][0]

        new = keys.make()
        s3.identities([keys.identity([new])])  # the old key is refused from now on
        keys.hand_out(new)
        sv.wait_for(lambda: _refused(keys.keys[0], s3.port), "the old key's revocation", 30)
        assert storage.read_json(url) == {"written": "with the first key"}  # refused once, then the new key
        assert storage.s3_client()._get_credentials().access_key == new[0]

        s3.identities([keys.identity([keys.make()])])  # the key handed out revoked too: a clear error
        sv.wait_for(lambda: _refused(new, s3.port), "the new key's revocation", 30)
        with pytest.raises(StageError, match=r"refused the credentials for .*doc.json.*key ending .*read afresh once"):
            storage.read_json(url)
    finally:
        s3.stop()


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
