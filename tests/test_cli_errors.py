"""Failures a user can cause are one line on stderr with what to do, and exit status 2.

Real processes (the ``reid-ray`` CLI in a subprocess) against moto's S3 server on
127.0.0.1; the translation itself is checked on real botocore and Ray exception objects.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict | None = None, timeout: float = 300):
    env = dict(os.environ if env is None else env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run(
        [sys.executable, "-m", "reid_ray.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def one_line_exit_2(result) -> str:
    """The one stderr line of a failed run (and no traceback, no Ray log path)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and lines[0].startswith("error: ")
    assert "Ray logs" not in result.stdout  # Ray never started
    return lines[0]


@pytest.fixture()
def manifest_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,path\na,a.jpg\n")
    return str(path)


def test_no_s3_credentials_names_the_settings(s3_server, s3_bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3_server,
        AWS_EC2_METADATA_DISABLED="true",  # no wait for an instance role
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
    )
    line = one_line_exit_2(
        run_cli(
            "embed",
            "--manifest",
            f"{s3_bucket}/m.csv",
            "--model",
            "timm-random:resnet18",
            "--out",
            str(tmp_path / "out"),
            env=env,
        )  # fmt: skip
    )
    for name in ("credentials", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert name in line


def test_out_in_a_bucket_that_does_not_exist(s3_server, manifest_file):
    line = one_line_exit_2(
        run_cli(
            "embed",
            "--manifest",
            manifest_file,
            "--model",
            "timm-random:resnet18",
            "--out",
            "s3://no-such-bucket-here/out",
        )  # fmt: skip
    )
    assert "--out s3://no-such-bucket-here/out" in line and "not found" in line


def test_identify_with_a_gallery_that_is_not_there(s3_server, s3_bucket, manifest_file, tmp_path):
    line = one_line_exit_2(
        run_cli(
            "identify",
            "--gallery",
            f"{s3_bucket}/gallery",
            "--manifest",
            manifest_file,
            "--out",
            str(tmp_path / "night"),
        )  # fmt: skip
    )
    assert f"{s3_bucket}/gallery is not a gallery" in line and "reid-ray gallery build" in line


def test_manifest_pointing_at_an_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    line = one_line_exit_2(
        run_cli(
            "evaluate",
            "--manifest",
            str(tmp_path / "images"),
            "--model",
            "timm-random:resnet18",
            "--out",
            str(tmp_path / "out"),
        )  # fmt: skip
    )
    assert "is a folder" in line and "reid-ray manifest --images" in line


def test_gallery_history_of_a_folder_that_does_not_exist(tmp_path):
    line = one_line_exit_2(run_cli("gallery", "history", "--gallery", str(tmp_path / "absent")))
    assert "is not a gallery" in line


# --- the translation, on real exception objects ---


def test_user_message_reads_botocore_and_s3fs_failures():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from reid_ray.errors import user_message

    assert "AWS_ACCESS_KEY_ID" in user_message(NoCredentialsError())
    assert "AWS_ENDPOINT_URL" in user_message(EndpointConnectionError(endpoint_url="http://x:1"))
    refused = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no"}}, "GetObject")
    wrapped = PermissionError("no")
    wrapped.__cause__ = refused  # what s3fs raises
    assert "refused the credentials (InvalidAccessKeyId)" in user_message(wrapped)
    missing = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "PutObject")
    assert "bucket not found" in user_message(missing)
    assert user_message(ValueError("a bug")) is None  # a bug keeps its traceback


def test_user_message_unwraps_a_ray_task_error():
    from ray.exceptions import RayTaskError

    from reid_ray.errors import ManifestError, user_message

    cause = ManifestError("manifest not found: s3://b/m.csv")
    error = RayTaskError("read", "Traceback...\nlong", cause, proctitle="w", pid=1, ip="127.0.0.1")
    assert user_message(error.as_instanceof_cause()) == "manifest not found: s3://b/m.csv"
    gone = RayTaskError("read", "tb", FileNotFoundError(2, "No such file", "/x/y.jpg"),
                        proctitle="w", pid=1, ip="127.0.0.1")  # fmt: skip
    assert user_message(gone) == "not found: /x/y.jpg"


def test_check_writable_refuses_a_file_and_creates_a_folder(tmp_path):
    from reid_ray import io as rio
    from reid_ray.errors import StorageError

    rio.check_writable(str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        rio.check_writable(str(tmp_path / "f"))


def test_check_writable_on_s3_leaves_nothing_behind(s3_bucket):
    from reid_ray import io as rio

    rio.check_writable(f"{s3_bucket}/runs/out")
    fs, bare = rio.filesystem(s3_bucket)
    fs.invalidate_cache()
    assert fs.find(bare) == []


def test_ray_logs_are_named_once_ray_runs(ray_cluster, tmp_path, capsys):
    from reid_ray import console

    saved = dict(console._state)
    try:
        path = console.route_ray_logs(str(tmp_path / "logs" / "ray.log"))
        console.route_ray_logs(None)  # init_ray calls it again after ray.init
        assert capsys.readouterr().out.count(f"Ray logs: {path}") == 1
    finally:
        console._state.update(saved)


def test_a_venv_without_faiss_gets_one_line_naming_the_extras():
    from reid_ray.errors import user_message

    missing = ModuleNotFoundError("No module named 'faiss'", name="faiss")
    message = user_message(RuntimeError("search failed").with_traceback(None))
    assert message is None  # a bug keeps its traceback
    try:
        raise RuntimeError("search failed") from missing
    except RuntimeError as exc:
        message = user_message(exc)
    assert message.startswith("FAISS is not installed") and "'.[cpu]'" in message
    assert user_message(ModuleNotFoundError("No module named 'kornia'", name="kornia")) is None
