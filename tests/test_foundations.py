"""The shared foundations every stage builds on: the config loader, pool planning, the
Parquet parts store with run records (local and S3), and routing Ray's logs off the
terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from reid_ray import io as rio
from reid_ray import parts
from reid_ray.config import load_config, replace
from reid_ray.errors import ConfigError
from reid_ray.runtime import ClusterView, data_reserve, plan_pool

# --- config.load_config ----------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    margin: float = 0.5
    kind: str = "arcface"

    def validate(self) -> None:
        if not 0 <= self.margin < 1.6:
            raise ConfigError(f"loss.margin must be in [0, 1.6), got {self.margin}")


@dataclass(frozen=True)
class Job:
    epochs: int = 1
    lr: float | None = None
    size: tuple[int, int] = (224, 224)
    names: tuple[str, ...] = ()
    hflip: bool = False
    loss: Loss = field(default_factory=Loss)


def test_defaults_dict_and_nested_sections():
    assert load_config(Job) == Job()
    cfg = load_config(Job, {"epochs": 3, "loss": {"margin": 0.3}})
    assert cfg.epochs == 3 and cfg.loss == Loss(margin=0.3, kind="arcface")
    # a nested section can be given as a dataclass too
    assert load_config(Job, {"loss": Loss(margin=0.1)}).loss.margin == 0.1


def test_yaml_file_with_a_section(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  epochs: 7\n  size: [128, 96]\n  loss:\n    kind: cosface\n")
    cfg = load_config(Job, str(path), section="train")
    assert (cfg.epochs, cfg.size, cfg.loss.kind) == (7, (128, 96), "cosface")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(Job, str(tmp_path / "empty.yaml")) == Job()
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, str(tmp_path / "absent.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Job, str(tmp_path / "list.yaml"))


def test_dotted_overrides_and_key_value_strings(tmp_path):
    cfg = load_config(Job, {"epochs": 2}, {"loss.margin": 0.25, "lr": None})
    assert cfg.epochs == 2 and cfg.loss.margin == 0.25 and cfg.lr is None  # None: unset
    cfg = load_config(Job, None, ["epochs=5", "loss.kind=subcenter", "hflip=true", "lr=1e-3"])
    assert (cfg.epochs, cfg.loss.kind, cfg.hflip, cfg.lr) == (5, "subcenter", True, 1e-3)
    path = tmp_path / "job.json"
    path.write_text('{"epochs": 4, "loss": {"margin": 0.2}}')
    cfg = load_config(Job, str(path), ["loss.margin=0.4"])
    assert cfg.epochs == 4 and cfg.loss.margin == 0.4  # the override wins, the rest stays
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Job, None, ["epochs"])


def test_unknown_keys_are_listed_with_the_valid_ones_at_each_level(tmp_path):
    with pytest.raises(ConfigError) as top:
        load_config(Job, {"epoch": 3})
    assert "epoch" in str(top.value)
    assert "valid: epochs, hflip, loss, lr, names, size" in str(top.value)
    with pytest.raises(ConfigError) as nested:
        load_config(Job, None, {"loss.margn": 0.3})
    assert "loss.margn" in str(nested.value) and "valid in loss: kind, margin" in str(nested.value)
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  kind: arcface\n  scale: 30\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*loss\.scale"):
        load_config(Job, str(path))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epochs": "three"}, "epochs must be an integer"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"epochs": True}, "epochs must be an integer"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"hflip": "maybe"}, "hflip must be true or false"),
        ({"size": [1, 2, 3]}, r"size must be a list of 2 values"),
        ({"size": ["a", 2]}, r"size\[0\] must be an integer"),
        ({"names": "abc"}, "names must be a list"),
        ({"loss": 3}, "loss must be a mapping"),
        ({"loss": {"kind": 7}}, "loss.kind must be a string"),
        ({"loss": {"margin": 2.0}}, "loss.margin must be in"),  # the section's validate()
    ],
)
def test_type_errors_name_the_setting(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, data)


def test_tuples_optional_and_lossless_conversions():
    cfg = load_config(Job, {"size": [64, 32], "names": ["a", "b"], "epochs": 3.0, "lr": 1})
    assert cfg.size == (64, 32) and cfg.names == ("a", "b")
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert load_config(Job, {"lr": None}).lr is None
    with pytest.raises(ConfigError, match="epochs must be an integer, got None"):
        load_config(Job, {"epochs": None})  # only Optional fields take null
    # a frozen config is changed only through replace(), which checks again
    cfg = replace(Job(), epochs=9, **{"loss.margin": 0.1})
    assert cfg.epochs == 9 and cfg.loss.margin == 0.1
    with pytest.raises(ConfigError, match="loss.margin"):
        replace(Job(), **{"loss.margin": 5.0})
    with pytest.raises(ConfigError, match="a Job comes from a dict or a file path"):
        load_config(Job, 42)


# --- runtime.plan_pool (pure) -----------------------------------------------------------------


def test_two_core_cpu_plan_leaves_cpu_for_ray_data():
    plan = plan_pool(ClusterView(cpus=2, gpus=0))
    assert (plan.device, plan.actors, plan.cpus_per_actor, plan.threads) == ("cpu", 1, 1.5, 2)
    assert plan.free_cpus == 0.5 == data_reserve(2)
    assert plan.gpus_per_actor == 0 and not plan.waits_for_gpus
    # two 1-CPU actors would take both CPUs and hang the read tasks: never planned
    two = plan_pool(ClusterView(cpus=2, gpus=0), actors=2)
    assert two.actors * two.cpus_per_actor <= 2 - data_reserve(2)


def test_sixteen_core_cpu_plan_leaves_a_quarter():
    plan = plan_pool(ClusterView(cpus=16, gpus=0), cpus_per_cpu_actor=4)
    assert data_reserve(16) == 4
    assert plan.actors == 3 and plan.cpus_per_actor == 4 and plan.free_cpus == 4
    one = plan_pool(ClusterView(cpus=16, gpus=0))
    assert (one.actors, one.cpus_per_actor, one.threads) == (1, 12, 12)
    capped = plan_pool(ClusterView(cpus=16, gpus=0), cpus_per_cpu_actor=1, max_cpu_actors=5)
    assert capped.actors == 5 and capped.actors * capped.cpus_per_actor <= 12


def test_explicit_gpu_request_on_a_cluster_without_gpus_waits_for_them():
    """An autoscaling cluster starts with no GPU node: the pool must ask for GPUs."""
    for kwargs in ({"device": "cuda"}, {"gpus_per_actor": 0.5}):
        plan = plan_pool(ClusterView(cpus=4, gpus=0), **kwargs)
        assert plan.device == "cuda" and plan.gpus_per_actor > 0
        assert plan.waits_for_gpus and plan.actors >= 1
    assert plan_pool(ClusterView(cpus=4, gpus=0), device="cuda", actors=3).actors == 3


def test_auto_device_uses_the_gpus_the_cluster_has():
    plan = plan_pool(ClusterView(cpus=32, gpus=4))
    assert (plan.device, plan.actors, plan.gpus_per_actor, plan.cpus_per_actor) == (
        "cuda",
        4,
        1.0,
        1.0,
    )
    assert not plan.waits_for_gpus and plan.free_cpus == 28
    half = plan_pool(ClusterView(cpus=32, gpus=4), gpus_per_actor=0.5)
    assert half.actors == 8 and not half.waits_for_gpus
    assert plan_pool(ClusterView(cpus=32, gpus=4), device="cpu").device == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cpu", "gpus_per_actor": 1}, "contradicts"),
        ({"device": "tpu"}, "device must be one of"),
        ({"actors": -1}, "actors must be >= 0"),
        ({"cpus_per_actor": float("nan")}, "cpus_per_actor must be >= 0"),
        ({"actors": 3, "cpus_per_actor": 1.0}, "exceed the cluster's 2 CPUs"),
    ],
)
def test_contradictions_fail_fast(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_pool(ClusterView(cpus=2, gpus=0), **kwargs)


def test_pool_plan_gives_the_map_batches_arguments():
    import ray.data

    kwargs = plan_pool(ClusterView(cpus=2, gpus=0)).map_batches_kwargs()
    assert isinstance(kwargs["compute"], ray.data.ActorPoolStrategy)
    assert (kwargs["num_cpus"], kwargs["num_gpus"]) == (1.5, 0.0)


# --- parts: Parquet part folders and run records ------------------------------------------------

SCHEMA = pa.schema([("image_id", pa.string()), ("score", pa.float32())])


def _rows(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "image_id": [f"i{k:03d}" for k in range(start, start + n)],
            "score": pa.array([k / 10 for k in range(start, start + n)], pa.float32()),
        },
        schema=SCHEMA,
    )


def _roundtrip(base: str) -> None:
    folder = rio.join(base, "table")
    assert parts.read_parts(folder, SCHEMA).num_rows == 0  # absent folder: empty, typed
    with parts.PartsWriter(folder, SCHEMA, rows_per_part=10) as writer:
        for start in range(0, 25, 5):
            writer.add(_rows(start, 5))
        writer.add(_rows(100, 0))  # empty tables add nothing
    assert writer.n_rows == 25 and len(writer.parts) == 3  # 10 + 10 + the rest on close
    listed = parts.list_parts(folder)
    assert listed == sorted(writer.parts)
    table = parts.read_parts(folder, SCHEMA).sort_by("image_id")
    assert table.equals(_rows(0, 25))
    # projection and filters are pushed into the scan
    import pyarrow.dataset as pads

    some = parts.read_parts(folder, SCHEMA, columns=["image_id"], filter=pads.field("score") > 2.0)
    assert some.column_names == ["image_id"]
    assert sorted(some.column("image_id").to_pylist()) == [f"i{k:03d}" for k in range(21, 25)]
    streamed = sum(b.num_rows for b in parts.iter_batches(folder, SCHEMA, batch_size=4))
    assert streamed == 25
    # a second writer (a rerun) never overwrites the first one's parts
    parts.write_part(folder, _rows(25, 2))
    assert len(parts.list_parts(folder)) == 4 and parts.read_parts(folder).num_rows == 27


def test_parts_roundtrip_local(tmp_path):
    _roundtrip(str(tmp_path))


def test_parts_roundtrip_on_s3(s3_bucket):
    _roundtrip(f"{s3_bucket}/out")
    fs, _ = rio.filesystem(s3_bucket)
    # a half-written temporary object is never listed nor read
    fs.pipe(f"{s3_bucket[5:]}/out/table/part-x.parquet.tmp-dead", b"PAR1 half")
    assert parts.read_parts(f"{s3_bucket}/out/table").num_rows == 27


def test_temporary_files_are_ignored_and_removed(tmp_path):
    folder = tmp_path / "table"
    parts.write_part(str(folder), _rows(0, 3), run="r1")
    (folder / "part-r2-00000.parquet.tmp-1234").write_bytes(b"PAR1 half a part")
    (folder / ".tmp-abc").write_bytes(b"")
    assert len(parts.list_parts(str(folder))) == 1
    assert parts.read_parts(str(folder), SCHEMA).num_rows == 3
    assert parts.remove_temporary(str(folder)) == 2
    assert sorted(os.listdir(folder)) == ["part-r1-00000.parquet"]
    assert parts.remove_temporary(str(tmp_path / "absent")) == 0


def test_a_failed_writer_keeps_its_complete_parts(tmp_path):
    folder = str(tmp_path / "t")
    with pytest.raises(RuntimeError), parts.PartsWriter(folder, SCHEMA, rows_per_part=4) as w:
        w.add(_rows(0, 4))  # a full part: written
        w.add(_rows(4, 2))  # buffered: flushed on the way out
        raise RuntimeError("worker lost")
    assert parts.read_parts(folder, SCHEMA).num_rows == 6


def test_run_record_is_written_last_and_read_back(tmp_path):
    @dataclass(frozen=True)
    class Cfg:
        k: int = 5

    out = str(tmp_path / "out")
    assert parts.read_run_record(out) is None  # absent output: not complete
    parts.write_part(rio.join(out, "table"), _rows(0, 2))
    assert parts.read_run_record(out) is None  # parts alone do not make it complete
    record = parts.write_run_record(
        out, "reid-ray test", config=Cfg(), counts={"rows": 2}, timings={"s": 0.1}, model="m"
    )
    assert record["command"] == "reid-ray test" and record["config"] == {"k": 5}
    assert parts.read_run_record(out) == rio.read_json(rio.join(out, parts.MANIFEST_FILE))
    assert parts.read_run_record(out)["counts"] == {"rows": 2}
    assert parts.read_run_record(out)["model"] == "m" and "created" in record
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


# --- console.route_ray_logs -------------------------------------------------------------------

_LOG_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from reid_ray import console
    from reid_ray.runtime import init_ray

    console.setup_logging(verbose=sys.argv[2] == "1")
    used = console.route_ray_logs(sys.argv[1])
    init_ray()  # joins the test cluster (RAY_ADDRESS); ray.init resets Ray's handlers
    init_ray(log_file=sys.argv[1].replace("ray.log", "stage.log"))  # a stage asks for its own
    import ray.data

    assert ray.data.range(20, override_num_blocks=2).map_batches(lambda b: b).count() == 20
    logging.getLogger("ray.data").info("marker-info-from-ray-data")
    logging.getLogger("ray").warning("marker-warning-from-ray")
    detector = logging.getLogger("ray.data._internal.issue_detection.issue_detector_manager")
    detector.warning("Operator 'MapBatches(marker)' uses 385.4MiB of memory per worker")
    detector.warning("marker-hanging: Operator 'MapBatches(x)' has been running for 300 s")
    logging.getLogger("reid_ray.test").info("marker-info-from-reid-ray")
    print("used", used)
    """
)


def _run_logging(ray_cluster, tmp_path, verbose: bool) -> tuple[str, str]:
    log = tmp_path / "out" / "logs" / "ray.log"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    result = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT, str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr, log.read_text() if log.exists() else ""


@pytest.mark.slow
def test_ray_info_goes_to_the_log_file_not_the_terminal(ray_cluster, tmp_path):
    terminal, logged = _run_logging(ray_cluster, tmp_path, verbose=False)
    # Ray Data's own INFO (the executed dataset) and ours to Ray's loggers: in the file
    assert "marker-info-from-ray-data" in logged and "execution finished" in logged
    assert "marker-info-from-ray-data" not in terminal and "execution finished" not in terminal
    # Ray's warnings and reid-ray's own INFO stay on the terminal; the path is printed once
    assert "marker-warning-from-ray" in terminal and "marker-info-from-reid-ray" in terminal
    # Ray Data's per-worker memory notice (every 30 s in training) is routine: file only;
    # the same detector's other warnings (a hanging operator) stay on the terminal
    assert "MapBatches(marker)" in logged and "MapBatches(marker)" not in terminal
    assert "marker-hanging" in terminal
    assert terminal.count("Ray logs:") == 1 and "ray.log" in terminal
    # a stage run by a command (train inside benchmark, al, ...) keeps the command's log
    assert not (tmp_path / "out" / "logs" / "stage.log").exists()


@pytest.mark.slow
def test_verbose_keeps_ray_logs_on_the_terminal(ray_cluster, tmp_path):
    terminal, logged = _run_logging(ray_cluster, tmp_path, verbose=True)
    assert logged == "" and "used None" in terminal
    assert "marker-info-from-ray-data" in terminal
