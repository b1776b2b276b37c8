"""Checkpoints: atomic writes, pointers and pruning, torn writes ignored; early stopping and best-checkpoint
restore; a non-finite loss keeps the last good checkpoint."""
import errno
import json
from pathlib import Path

import pytest
import torch

from tailorlm.config import MethodSpec, SelectSpec, TrainSpec
from tailorlm.errors import TailorError
from tailorlm.models.methods import make_strategy
from tailorlm.train.checkpoint import MARKER, CheckpointStore, load_trainer, load_weights
from tailorlm.train.loop import Hooks, restore_best, train
from tailorlm.train.selection import Selector
from conftest import tiny_llama
from test_train_loop import memorize_samples


def save(store, step, value=1.0, best=None):
    params = {"w": torch.full((2, 2), value)}
    return store.save(step, params, {"optimizer": {}, "rng": {"torch": torch.get_rng_state()}}, {"step": step}, best)


def test_checkpoints_are_complete_pointed_to_and_pruned(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3, 4):
        save(store, step, value=step, best=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # the last two, plus the best; pointers written by rename; no temp folders left
    assert names == ["best", "latest", "step-00000002", "step-00000003", "step-00000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000004\n"
    assert store.best().name == "step-00000002"
    for name in ("weights.safetensors", "trainer.safetensors", "state.json", MARKER):
        assert (store.latest() / name).is_file()
    assert not list(store.root.rglob("*.pt"))  # no pickle anywhere
    params = {"w": torch.nn.Parameter(torch.zeros(2, 2))}
    load_weights(store.best(), params)
    assert torch.equal(params["w"], torch.full((2, 2), 2.0))
    trainer, state = load_trainer(store.latest())
    assert state == {"step": 4} and torch.equal(trainer["rng"]["torch"], torch.get_rng_state())


def test_a_torn_write_is_never_read(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    save(store, 1)
    torn = store.path(2)  # renamed into place, killed before COMPLETE was written
    torn.mkdir()
    (torn / "weights.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoints" / ".tmp-step-00000003").mkdir()  # killed mid-write
    assert store.latest().name == "step-00000001"
    save(store, 3)  # the next save cleans both up
    assert sorted(p.name for p in store.root.glob("*step-*")) == ["step-00000001", "step-00000003"]


def test_the_trainer_state_round_trips_without_pickle(tmp_path):
    from safetensors import safe_open

    from tailorlm.train.checkpoint import STRUCTURE_KEY

    trainer = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}},
                             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": ["w"], "fused": None}]},
               "schedule": {"last_epoch": 3, "_last_lr": [0.5]}, "rng": {"python": [3, [1, 2 ** 40], None]}}
    path = CheckpointStore(tmp_path).save(1, {"w": torch.zeros(1)}, trainer, {"step": 1})
    loaded, _ = load_trainer(path)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    assert list(loaded["optimizer"]["state"]) == [0]  # an int key again
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 3))
    assert loaded["schedule"] == trainer["schedule"] and loaded["rng"] == trainer["rng"]
    with safe_open(str(path / "trainer.safetensors"), framework="pt") as f:
        assert STRUCTURE_KEY in f.metadata()


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    for step in (1, 2, 3):
        save(store, step, value=step)
    weights = store.path(3) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a disk that filled up mid-copy
    state = store.path(2) / "state.json"
    state.write_text(state.read_text().replace("2", "9"))  # same size, other content
    assert store.latest().name == "step-00000003"  # the cheap scan trusts COMPLETE alone
    assert store.latest(verify=True).name == "step-00000001"
    out = capsys.readouterr().out
    assert "step-00000003 is damaged (weights.safetensors has" in out and "the manifest says" in out
    assert "step-00000002 is damaged (state.json does not match its checksum)" in out


def test_a_damaged_best_checkpoint_keeps_the_final_weights(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "checkpoints")
    save(store, 1, best=1)
    save(store, 2, best=1)
    (store.path(1) / "state.json").unlink()
    assert store.best() is None
    assert "the best checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("planted, message", [
    (b"\x80\x04K\x01.", r"trainer.safetensors is not a trainer state written by tailorlm"),  # a pickle
    (None, r"no trainer.safetensors \(trainer.pt: a pickle from an older tailorlm, which is no longer loaded\)"),
])
def test_a_trainer_file_tailorlm_did_not_write_is_refused(tmp_path, planted, message):
    path = save(CheckpointStore(tmp_path), 1)
    if planted is None:
        (path / "trainer.safetensors").rename(path / "trainer.pt")
    else:
        (path / "trainer.safetensors").write_bytes(planted)
    with pytest.raises(TailorError, match=message):
        load_trainer(path)


def test_a_weights_file_that_is_not_safetensors_is_refused(tmp_path):
    path = save(CheckpointStore(tmp_path), 1)
    (path / "weights.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(TailorError, match=r"weights.safetensors is not a readable safetensors file"):
        load_weights(path, {"w": torch.nn.Parameter(torch.zeros(2, 2))})


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1)
    with pytest.raises(TailorError, match=r"checkpoint lacks 1 parameter\(s\) this run trains, e.g. v"):
        load_weights(path, {"v": torch.nn.Parameter(torch.zeros(1))})


def test_selector_tracks_the_best_and_runs_out_of_patience():
    sel = Selector("val_loss", patience=2, min_delta=0.01)
    assert sel.update(1, {"val_loss": 1.0}) and not sel.update(2, {"val_loss": 0.995})  # within min_delta
    assert not sel.should_stop and not sel.update(3, {"val_loss": 1.2}) and sel.should_stop
    assert (sel.best_step, sel.best_value) == (1, 1.0)
    # small gains add up against the kept checkpoint: 1.0 -> 0.995 (within min_delta) -> 0.989 (0.011 below 1.0)
    steady = Selector("val_loss", min_delta=0.01)
    assert [steady.update(s, {"val_loss": v}) for s, v in ((1, 1.0), (2, 0.995), (3, 0.989))] == [True, False, True]
    acc = Selector("accuracy")
    assert acc.update(1, {"accuracy": 0.5}) and acc.update(2, {"accuracy": 0.6}) and not acc.update(3, {"accuracy": 0.55})
    assert Selector.from_state(acc.state()) == acc
    # a tie of the task metric goes to the lower validation loss; a tie without it keeps the earlier step
    tied = Selector("classification/accuracy")
    steps = [(40, 0.906, 0.181), (80, 0.906, 0.127), (120, 0.906, 0.203)]
    assert [tied.update(s, {"classification/accuracy": a, "val_loss": v}) for s, a, v in steps] == [True, True, False]
    assert (tied.best_step, tied.best_loss, tied.bad_evals) == (80, 0.127, 1)
    assert not tied.update(160, {"classification/accuracy": 0.906}) and tied.best_step == 80
    assert Selector.from_state({k: v for k, v in tied.state().items() if k != "best_loss"}).best_loss is None
    # within min_delta of the best seen (one answer of 40) is a tie too; a run of ties cannot walk the metric down
    band = Selector("classification/accuracy", min_delta=0.025)
    steps = [(40, 0.925, 0.181), (80, 0.900, 0.127), (120, 0.925, 0.203), (160, 0.875, 0.100), (200, 0.975, 0.3)]
    assert [band.update(s, {"classification/accuracy": a, "val_loss": v}) for s, a, v in steps] == \
        [True, True, False, False, True]
    assert (band.best_step, band.best_value, band.top_value) == (200, 0.975, 0.975)
    # the best seen counts though it was not kept: 0.920 (a higher loss) makes 0.880 more than min_delta below
    seen = Selector("classification/accuracy", min_delta=0.025)
    steps = [(1, 0.900, 0.30), (2, 0.920, 0.40), (3, 0.880, 0.20)]
    assert [seen.update(s, {"classification/accuracy": a, "val_loss": v}) for s, a, v in steps] == [True, False, False]
    assert (seen.best_step, seen.top_value) == (1, 0.920)


def scripted_evaluations(values):
    """An evaluate hook returning the given val_loss at each evaluation (0 first)."""
    it = iter(values)
    return lambda model, ctx, step: {"val_loss": next(it)}


def test_early_stopping_keeps_and_restores_the_best_checkpoint(tmp_path, tiny_tokenizer):
    strategy = make_strategy(MethodSpec(name="full"))
    model = strategy.prepare(tiny_llama(len(tiny_tokenizer)))
    store = CheckpointStore(tmp_path / "checkpoints", keep=1)
    hooks = Hooks(evaluate=scripted_evaluations([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8]), checkpoints=store,
                  select=SelectSpec(patience=2))
    result = train(model, strategy, memorize_samples(tiny_tokenizer), TrainSpec(max_steps=12, batch_size=4, eval_every=2),
                   1e-2, tiny_tokenizer.pad_token_id, torch.device("cpu"), hooks)
    assert result.stopped_early and result.completed == 8 and result.best_step == 4
    assert result.events[-1]["event"].startswith("early stop at step 8: val_loss has not improved for 2 evaluations")
    assert sorted(p.name for p in store.complete()) == ["step-00000004", "step-00000008"]
    restored = restore_best(model, strategy, store, result)
    assert restored.name == "step-00000004"
    from safetensors.torch import load_file

    saved = load_file(restored / "weights.safetensors")  # the model now holds step 4's weights, not step 8's
    assert all(torch.equal(p.detach(), saved[n]) for n, p in strategy.checkpoint_params(model).items())


def test_a_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    import tailorlm.train.loop as loop

    real, calls = loop.accumulate_gradients, []

    def poisoned(loss_fn, group, ctx, no_sync=None, objective=None):
        calls.append(1)
        loss, tokens = real(loss_fn, group, ctx, no_sync, objective)
        return (float("nan") if len(calls) == 4 else loss), tokens

    monkeypatch.setattr(loop, "accumulate_gradients", poisoned)
    strategy = make_strategy(MethodSpec(name="lora"))
    model = strategy.prepare(tiny_llama(len(tiny_tokenizer)))
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    with pytest.raises(TailorError, match=r"the training loss became nan at step 4; lower train.lr or check the "
                                          r"data; the last good checkpoint is .*step-00000003 \(resume from it"):
        train(model, strategy, memorize_samples(tiny_tokenizer), TrainSpec(max_steps=6, batch_size=4, eval_every=0,
              checkpoint_every=1), 1e-2, tiny_tokenizer.pad_token_id, torch.device("cpu"), Hooks(checkpoints=store))
    assert store.latest().name == "step-00000003"
    assert json.loads((store.latest() / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is used up"),
    # what safetensors 0.8 raises on a full disk (measured on a 64 KiB tmpfs): not an OSError
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "the disk is full"),
])
def test_a_full_disk_leaves_no_partial_checkpoint_and_says_so(tmp_path, monkeypatch, failure, reason):
    import tailorlm.train.checkpoint as checkpoint

    store = CheckpointStore(tmp_path / "checkpoints")
    save(store, 1)

    def no_room(tensors, path, metadata=None):
        Path(path).write_bytes(b"the first bytes fit")  # a partial file, as a filling disk leaves
        raise failure

    monkeypatch.setattr(checkpoint, "save_file", no_room)
    with pytest.raises(TailorError) as e:
        save(store, 2)
    assert str(e.value) == (f"{reason}: could not write {store.path(2)}; free some space on the disk that holds "
                            f"{store.root}")
    assert sorted(p.name for p in store.root.iterdir()) == ["latest", "step-00000001"]  # nothing half-written


def test_a_full_disk_after_the_rename_removes_the_unmarked_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "checkpoints")
    save(store, 1)
    real = Path.write_text

    def marker_does_not_fit(self, text, *args, **kwargs):
        if self.name != MARKER:
            return real(self, text, *args, **kwargs)
        real(self, text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", marker_does_not_fit)
    with pytest.raises(TailorError, match=r"^the disk is full: could not write .*step-00000002; "):
        save(store, 2)
    assert sorted(p.name for p in store.root.iterdir()) == ["latest", "step-00000001"]
    assert store.latest().name == "step-00000001"
