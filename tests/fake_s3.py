"""A real S3-protocol server on loopback for the storage tests: moto's server (in a thread
of the test process), with IAM authentication switched on once the bucket and the users
exist, so that a wrong key or a read-only key is refused as AWS would refuse it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import boto3
from moto import settings as moto_settings
from moto.server import ThreadedMotoServer

BUCKET = "runs"
# Each user's policy statements: (actions, resources).
EVERYTHING = ["*"]
USERS = {
    "admin": [(["s3:*"], EVERYTHING)],
    "writer": [(["s3:*"], EVERYTHING)],
    "reader": [(["s3:GetObject", "s3:ListBucket"], EVERYTHING)],
    # may read, pass the probe and write checkpoints, nothing else: the outputs' upload at the end fails
    "checkpoints-only": [(["s3:ListBucket", "s3:GetObject"], EVERYTHING),
                         (["s3:PutObject", "s3:DeleteObject"],
                          [f"arn:aws:s3:::{BUCKET}/*/.finetune-probe-*", f"arn:aws:s3:::{BUCKET}/*/output/checkpoint-*"])],
}


@dataclass
class S3Server:
    url: str
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # user -> (access key id, secret)
    server: ThreadedMotoServer | None = None

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    def client(self, user: str = "admin"):
        key, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret)

    def credentials(self, user: str = "writer") -> dict[str, str]:
        key, secret = self.keys[user]
        return {"s3_access_key_id": key, "s3_secret_access_key": secret}

    def keys_under(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.client().delete_object(Bucket=BUCKET, Key=key)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")


def start_s3() -> S3Server:
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # the setup below runs unauthenticated
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    setup = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **setup)
    keys = {}
    for user, statements in USERS.items():
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources} for actions, resources in statements]}
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        made = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (made["AccessKeyId"], made["SecretAccessKey"])
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is signed and checked
    return S3Server(url, keys, server)
