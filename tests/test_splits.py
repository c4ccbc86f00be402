"""The split maker: seeded, per-individual, stable, and split files that round-trip."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from reid_ray.data.splits import SPLIT_NAMES, make_split, read_split, write_split
from reid_ray.errors import ConfigError, ReidRayError


def _metadata(n_identities: int = 20, per_identity: int = 5) -> pd.DataFrame:
    rows = []
    for i in range(n_identities):
        for j in range(per_identity + (i % 3)):  # 5, 6 or 7 images per individual
            rows.append({"image_id": f"img_{i:03d}_{j}", "identity": f"animal_{i:03d}"})
    rows.append({"image_id": "single", "identity": "loner"})  # a singleton identity
    rows.append({"image_id": "u1", "identity": None})
    rows.append({"image_id": "u2", "identity": ""})
    rows.append({"image_id": "u3", "identity": "unknown"})
    rows.append({"image_id": "u4", "identity": "Unknown"})
    rows.append({"image_id": "u5", "identity": float("nan")})
    return pd.DataFrame(rows)


UNLABELLED = {"u1", "u2", "u3", "u4", "u5"}


def _identity_sets(df: pd.DataFrame, split: pd.DataFrame) -> dict[str, set[str]]:
    merged = split.merge(df, on="image_id")
    return {name: set(merged.loc[merged["split"] == name, "identity"]) for name in SPLIT_NAMES}


def _as_dict(split: pd.DataFrame) -> dict[str, str]:
    return dict(zip(split["image_id"], split["split"], strict=True))


@pytest.mark.parametrize("kind", ["closed", "open", "disjoint"])
def test_same_seed_same_split_and_valid_names(kind):
    df = _metadata()
    a = make_split(df, kind=kind, seed=3)
    b = make_split(df.copy(), kind=kind, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["image_id", "split"]
    assert set(a["split"]) <= set(SPLIT_NAMES)


@pytest.mark.parametrize("kind", ["closed", "open", "disjoint"])
def test_different_seed_different_split(kind):
    df = _metadata()
    a = make_split(df, kind=kind, seed=0)
    b = make_split(df, kind=kind, seed=1)
    assert _as_dict(a) != _as_dict(b)


@pytest.mark.parametrize("kind", ["closed", "open", "disjoint"])
def test_shuffled_rows_same_assignment_rows_in_input_order(kind):
    df = _metadata()
    shuffled = df.sample(frac=1.0, random_state=7).reset_index(drop=True)
    a = make_split(df, kind=kind, seed=5)
    b = make_split(shuffled, kind=kind, seed=5)
    assert _as_dict(a) == _as_dict(b)
    # rows come back in the input's order (unlabelled rows left out)
    expected_order = [i for i in shuffled["image_id"] if i not in UNLABELLED]
    assert list(b["image_id"]) == expected_order


@pytest.mark.parametrize("kind", ["closed", "open", "disjoint"])
def test_unlabelled_rows_left_out(kind):
    df = _metadata()
    split = make_split(df, kind=kind, seed=0)
    assert not (set(split["image_id"]) & UNLABELLED)
    # every labelled row is assigned
    assert len(split) == len(df) - len(UNLABELLED)


def test_closed_every_query_identity_in_gallery_and_query_counts():
    df = _metadata()
    split = make_split(df, kind="closed", seed=2, queries_per_identity=2)
    sets = _identity_sets(df, split)
    assert sets["query"] <= sets["gallery"]
    assert sets["train"] == sets["val"] == sets["query_unknown"] == set()
    merged = split.merge(df, on="image_id")
    per_id = merged.groupby("identity")["split"].value_counts().unstack(fill_value=0)
    labelled_ids = {f"animal_{i:03d}" for i in range(20)}
    assert (per_id.loc[sorted(labelled_ids), "query"] == 2).all()
    assert (per_id["gallery"] >= 1).all()
    # the singleton goes to the gallery
    assert _as_dict(split)["single"] == "gallery"


def test_closed_query_leaves_one_gallery_image_for_pairs():
    df = pd.DataFrame({"image_id": ["a1", "a2", "b1", "b2", "b3"], "identity": list("aabbb")})
    split = _as_dict(make_split(df, kind="closed", seed=0, queries_per_identity=5))
    assert sorted(split[i] for i in ("a1", "a2")) == ["gallery", "query"]
    assert sorted(split[i] for i in ("b1", "b2", "b3")) == ["gallery", "query", "query"]


def test_open_unknown_identities_absent_from_gallery():
    df = _metadata()
    split = make_split(df, kind="open", seed=4, unknown_fraction=0.25)
    sets = _identity_sets(df, split)
    n_identities = 21
    assert len(sets["query_unknown"]) == round(0.25 * n_identities)  # 5.25 -> 5
    assert not (sets["query_unknown"] & sets["gallery"])
    assert not (sets["query_unknown"] & sets["query"])
    assert sets["query"] <= sets["gallery"]
    # held-out individuals are held out with all their images
    merged = split.merge(df, on="image_id")
    unknown_rows = merged[merged["identity"].isin(sets["query_unknown"])]
    assert (unknown_rows["split"] == "query_unknown").all()


def test_disjoint_identities_and_fractions():
    df = _metadata()
    split = make_split(df, kind="disjoint", seed=9, train_fraction=0.5, val_fraction=0.1)
    sets = _identity_sets(df, split)
    test_ids = sets["query"] | sets["gallery"] | sets["query_unknown"]
    assert not (sets["train"] & sets["val"])
    assert not (sets["train"] & test_ids)
    assert not (sets["val"] & test_ids)
    assert not (sets["query_unknown"] & sets["gallery"])
    assert sets["query"] <= sets["gallery"]
    # 21 identities: train round(10.5) = 11, val round(2.1) = 2, test 8 -> 2 unknown (0.2 * 8)
    assert len(sets["train"]) == 11
    assert len(sets["val"]) == 2
    assert len(test_ids) == 8
    assert len(sets["query_unknown"]) == 2


def test_split_is_pinned_across_machines():
    """The assignment depends only on SHA-256 of the values: pin it so a change is noticed."""
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "identity": list("aabbccdd")})
    split = _as_dict(make_split(df, kind="disjoint", seed=0, train_fraction=0.5, val_fraction=0))

    def key(identity: str) -> str:
        return hashlib.sha256(f"0:{identity}".encode()).hexdigest()

    order = sorted("abcd", key=key)
    train = set(order[:2])
    for image_id, identity in zip(df["image_id"], df["identity"], strict=True):
        if identity in train:
            assert split[image_id] == "train"
        else:
            assert split[image_id] != "train"


def test_make_split_rejects_bad_arguments():
    df = _metadata(3, 2)
    with pytest.raises(ConfigError, match="kind"):
        make_split(df, kind="random")
    with pytest.raises(ConfigError, match="train_fraction"):
        make_split(df, train_fraction=1.5)
    with pytest.raises(ConfigError, match="<= 1"):
        make_split(df, train_fraction=0.7, val_fraction=0.4)
    with pytest.raises(ConfigError, match="queries_per_identity"):
        make_split(df, queries_per_identity=0)
    with pytest.raises(ConfigError, match="identity"):
        make_split(df[["image_id"]])
    dup = pd.concat([df, df.iloc[:1]])
    with pytest.raises(ConfigError, match="unique"):
        make_split(dup)


def test_empty_and_all_unlabelled_input():
    empty = pd.DataFrame({"image_id": [], "identity": []})
    assert len(make_split(empty)) == 0
    unlabelled = pd.DataFrame({"image_id": ["a", "b"], "identity": [None, "unknown"]})
    out = make_split(unlabelled, kind="open")
    assert len(out) == 0 and list(out.columns) == ["image_id", "split"]


def test_write_read_round_trip(tmp_path):
    df = _metadata()
    split = make_split(df, kind="disjoint", seed=1)
    path = str(tmp_path / "sub" / "split.csv")
    write_split(split, path)
    back = read_split(path)
    assert _as_dict(back) == _as_dict(split)
    assert list(back.columns) == ["image_id", "split"]
    assert not any(p.name.startswith("split.csv.tmp") for p in (tmp_path / "sub").iterdir())


def test_read_split_keeps_ids_as_strings_and_skips_empty_split(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("image_id,split\n001,query\nNA,gallery\n3,\n")
    back = read_split(str(path))
    assert list(back["image_id"]) == ["001", "NA"]
    assert list(back["split"]) == ["query", "gallery"]


def test_read_split_rejects_bad_split_name(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("image_id,split\na,train\nb,tset\n")
    with pytest.raises(ConfigError, match=r"invalid split name.*'tset'") as info:
        read_split(str(path))
    assert isinstance(info.value, ReidRayError)
    assert "query_unknown" in str(info.value)  # the message lists what is allowed


def test_read_split_rejects_missing_file_column_and_duplicates(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_split(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,fold\na,train\n")
    with pytest.raises(ConfigError, match="split"):
        read_split(str(bad))
    dup = tmp_path / "dup.csv"
    dup.write_text("image_id,split\na,train\na,val\n")
    with pytest.raises(ConfigError, match="more than once"):
        read_split(str(dup))


def test_write_split_rejects_bad_split_name(tmp_path):
    with pytest.raises(ConfigError, match="invalid split name"):
        write_split(pd.DataFrame({"image_id": ["a"], "split": ["test"]}), str(tmp_path / "s.csv"))


def test_write_read_split_on_s3(s3_bucket):
    df = _metadata(6, 3)
    split = make_split(df, kind="open", seed=0)
    path = f"{s3_bucket}/splits/open.csv"
    write_split(split, path)
    assert _as_dict(read_split(path)) == _as_dict(split)
