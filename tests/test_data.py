"""Training data: the checked volume folder, label tables, and the seeded sharded sampler."""

from __future__ import annotations

import numpy as np
import pytest

from hagan_clinic.config import load_config
from hagan_clinic.data import DataError, ShardedSampler, VolumeFolder


def tiny(*overrides: str):
    return load_config("tiny", overrides)


def write_table(path, rows, header="path,label"):
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


# ---- the folder ---------------------------------------------------------------------------------------------


def test_folder_lists_volumes_sorted_and_loads_float32_in_range(volume_dir):
    (volume_dir / "notes.txt").write_text("not a volume")
    np.save(volume_dir / ".hidden.npy", np.zeros((32, 32, 32), np.float16))
    sub = volume_dir / "more"
    sub.mkdir()
    np.save(sub / "deep.npy", np.full((32, 32, 32), 3.0, np.float32))  # out of range: clipped on load

    data = VolumeFolder.from_config(tiny(), volume_dir)
    names = [f.name for f in data.files]
    assert names == ["deep.npy", "vol_00.npy", "vol_01.npy", "vol_02.npy", "vol_03.npy"]
    assert data.labels is None and len(data) == 5
    vol = data.load(names.index("vol_00.npy"))
    assert vol.dtype == np.float32 and vol.shape == (32, 32, 32)
    assert vol.min() >= -1.0 and vol.max() <= 1.0
    np.testing.assert_array_equal(vol, np.load(volume_dir / "vol_00.npy").astype(np.float32))
    assert np.all(data.load(0) == 1.0)
    assert data.summary() == f"5 volumes in {volume_dir}"


def test_data_dir_argument_overrides_the_config(volume_dir, tmp_path):
    cfg = tiny(f"data.dir={tmp_path / 'elsewhere'}")
    assert len(VolumeFolder.from_config(cfg, volume_dir)) == 4
    assert len(VolumeFolder.from_config(tiny(f"data.dir={volume_dir}"))) == 4


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "data folder not found"),
        ("empty", "no volumes"),
        ("wrong_shape", "bad.npy: shape (16, 32, 32)"),
        ("unreadable", "broken.npy: not a readable volume"),
    ],
)
def test_folder_problems_name_the_folder_or_file(tmp_path, volume_dir, setup, needle):
    folder = volume_dir
    if setup == "missing":
        folder = tmp_path / "nope"
    elif setup == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif setup == "wrong_shape":
        np.save(folder / "bad.npy", np.zeros((16, 32, 32), np.float16))
    else:
        (folder / "broken.npy").write_bytes(b"this is no numpy file")
    with pytest.raises(DataError, match="^.*$") as info:
        VolumeFolder.from_config(tiny(), folder)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_no_folder_at_all_is_a_data_error(volume_dir):
    # volumes lie below the current folder (tests run in tmp_path): they must not be picked up silently
    with pytest.raises(DataError, match="give --data DIR or data.dir"):
        VolumeFolder.from_config(tiny())
    with pytest.raises(DataError, match="give --data DIR or data.dir"):
        VolumeFolder.from_config(tiny("data.dir=''"))


# ---- tables and labels --------------------------------------------------------------------------------------


def test_conditional_table_leaves_out_unlabelled_rows(volume_dir, tmp_path):
    table = write_table(
        tmp_path / "labels.csv",
        ["vol_00.npy,0", "vol_01.npy,-1", "vol_02.npy,", "vol_03.npy,1", "vol_00.npy,1"],
    )
    cfg = tiny("model.num_classes=2", f"data.table={table}", "data.label_column=label")
    data = VolumeFolder.from_config(cfg, volume_dir)
    assert len(data) == 3
    assert [f.name for f in data.files] == ["vol_00.npy", "vol_03.npy", "vol_00.npy"]
    assert data.labels == (0, 1, 1)
    assert data.summary().endswith("labels 0: 1, 1: 2")


def test_unconditional_table_ignores_labels_and_keeps_table_order(volume_dir, tmp_path):
    table = write_table(tmp_path / "t.csv", ["vol_02.npy,7", "vol_00.npy,-1"])
    data = VolumeFolder.from_config(tiny(f"data.table={table}"), volume_dir)
    assert [f.name for f in data.files] == ["vol_02.npy", "vol_00.npy"]
    assert data.labels is None


def test_preprocessing_manifest_trains_only_on_ok_rows(volume_dir, tmp_path):
    table = write_table(
        tmp_path / "manifest.csv",
        ["vol_00.npy,0,ok", "missing.npy,1,failed", "vol_01.npy,1,ok"],
        header="path,label,status",
    )
    cfg = tiny("model.num_classes=2", f"data.table={table}", "data.label_column=label")
    data = VolumeFolder.from_config(cfg, volume_dir)
    assert [f.name for f in data.files] == ["vol_00.npy", "vol_01.npy"]
    assert data.labels == (0, 1)


@pytest.mark.parametrize(("label", "shown"), [("2", "label 2 in"), ("0.5", "label 0.5 in"), ("3.0", "label 3.0 in")])
def test_label_outside_the_classes_is_named(volume_dir, tmp_path, label, shown):
    table = write_table(tmp_path / "labels.csv", ["vol_00.npy,0", f"vol_01.npy,{label}"])
    cfg = tiny("model.num_classes=2", f"data.table={table}", "data.label_column=label")
    with pytest.raises(DataError) as info:
        VolumeFolder.from_config(cfg, volume_dir)
    message = str(info.value)
    assert shown in message and "'label'" in message and "[0, 1]" in message and "labels.csv" in message


def test_conditional_model_needs_a_table(volume_dir):
    with pytest.raises(DataError, match="conditional model needs data.table"):
        VolumeFolder.from_config(tiny("model.num_classes=2"), volume_dir)


def test_conditional_model_needs_a_label_column(volume_dir, tmp_path):
    table = write_table(tmp_path / "labels.csv", ["vol_00.npy,0"])
    with pytest.raises(DataError, match="label_column"):
        VolumeFolder.from_config(tiny("model.num_classes=2", f"data.table={table}"), volume_dir)


@pytest.mark.parametrize(
    ("rows", "header", "extra", "needle"),
    [
        (["vol_00.npy,0"], "file,label", [], "no column 'path'"),
        (["vol_00.npy,0"], "path,group", ["model.num_classes=2", "data.label_column=label"], "no column 'label'"),
        (["vol_00.npy,0", "gone.npy,1"], "path,label", [], "1 file(s) of t.csv not found"),
    ],
)
def test_table_problems_are_named(volume_dir, tmp_path, rows, header, extra, needle):
    table = write_table(tmp_path / "t.csv", rows, header=header)
    with pytest.raises(DataError) as info:
        VolumeFolder.from_config(tiny(f"data.table={table}", *extra), volume_dir)
    assert needle in str(info.value)


def test_missing_table_file(volume_dir, tmp_path):
    with pytest.raises(DataError, match="data table not found"):
        VolumeFolder.from_config(tiny(f"data.table={tmp_path / 'none.csv'}"), volume_dir)


# ---- the sampler --------------------------------------------------------------------------------------------


def take_epoch(sampler: ShardedSampler) -> list[int]:
    return sampler.next_indices(sampler.n // sampler.world)


@pytest.mark.parametrize("n", [10, 11])
def test_shards_are_disjoint_and_cover_each_epoch(n):
    world = 2
    samplers = [ShardedSampler(n, seed=3, rank=r, world=world) for r in range(world)]
    orders = []
    for _ in range(4):
        shards = [take_epoch(s) for s in samplers]
        assert set(shards[0]).isdisjoint(shards[1])
        union = set(shards[0]) | set(shards[1])
        assert len(union) == n // world * world
        assert union <= set(range(n))
        assert all(len(set(shard)) == len(shard) for shard in shards)
        orders.append(shards)
    # epochs are reshuffled
    assert orders[0] != orders[1]
    # the order is a pure function of (seed, rank, world)
    again = [ShardedSampler(n, seed=3, rank=r, world=world) for r in range(world)]
    assert [[take_epoch(s) for s in again] for _ in range(4)] == orders
    other_seed = ShardedSampler(n, seed=4, rank=0, world=world)
    assert [take_epoch(other_seed) for _ in range(4)] != [o[0] for o in orders]


def test_one_process_sees_every_item_each_epoch():
    sampler = ShardedSampler(7, seed=0)
    seen = sampler.next_indices(7 * 3)
    for e in range(3):
        assert sorted(seen[7 * e : 7 * (e + 1)]) == list(range(7))


def test_batches_straddle_epochs():
    sampler = ShardedSampler(5, seed=1)
    reference = ShardedSampler(5, seed=1)
    flat = reference.next_indices(15)
    batches = [sampler.next_indices(3) for _ in range(5)]
    assert [i for b in batches for i in b] == flat
    assert sampler.state_dict() == {"epoch": 2, "position": 5, "n": 5, "world": 1}


@pytest.mark.parametrize("rank", [0, 1])
def test_sampler_state_round_trip_continues_the_sequence(rank):
    a = ShardedSampler(9, seed=5, rank=rank, world=2)
    a.next_indices(7)  # into the second epoch (4 items per rank and epoch)
    state = a.state_dict()
    expected = a.next_indices(10)
    b = ShardedSampler(9, seed=5, rank=rank, world=2)
    b.load_state_dict(dict(state))
    assert b.next_indices(10) == expected
    assert b.state_dict() == a.state_dict()


def test_sampler_refuses_other_data_or_process_count():
    state = ShardedSampler(8, seed=0, rank=0, world=2).state_dict()
    with pytest.raises(DataError, match="same data and process count"):
        ShardedSampler(9, seed=0, rank=0, world=2).load_state_dict(state)
    with pytest.raises(DataError, match="same data and process count"):
        ShardedSampler(8, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="cannot be split over 2 processes"):
        ShardedSampler(1, seed=0, rank=0, world=2)


@pytest.mark.slow
def test_resuming_on_other_data_is_refused(volume_dir, tmp_path, capsys):
    """A checkpoint's training record must cover every volume the model saw: a resume on other data is refused."""
    from hagan_clinic.cli import main

    args = ["train", "--config", "tiny", "--data", str(volume_dir), "--out", str(tmp_path / "run"), "--no-tracking",
            "--set", "train.checkpoint_every=1", "--set", "train.batch_size=1"]  # fmt: skip
    assert main([*args, "--set", "train.iterations=1"]) == 0
    table = tmp_path / "three.csv"
    table.write_text("path\n" + "\n".join(p.name for p in sorted(volume_dir.glob("*.npy"))[:3]) + "\n")
    code = main([*args, "--set", "train.iterations=2", "--set", f"data.table={table}", "--resume"])
    assert code == 2 and "trained on other data" in capsys.readouterr().err
