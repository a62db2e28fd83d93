"""Train step, loss scaling, accumulation, clipping, LR schedules, EMA, atomic checkpoints, mixed precision."""
import json
import math
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops
from mindspore.amp import DynamicLossScaler

from ms_diffusion.training import EMA, TrainStep, build_lr_schedule
from ms_diffusion.io.checkpoint import (CheckpointError, export_safetensors, list_checkpoints, load_checkpoint,
                                              load_safetensors, newest_readable_checkpoint, newest_readable_meta,
                                              prune_checkpoints, read_checkpoint_meta, save_checkpoint)
from ms_diffusion.training.optim import current_lr


def _dense(seed=0):
    ms.set_seed(seed)
    np.random.seed(seed)
    return nn.Dense(4, 3)


def _mse(net):
    def loss_fn(x, y):
        d = net(x) - y
        return (d * d).mean()
    return loss_fn


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return Tensor(rng.standard_normal((n, 4)).astype(np.float32)), Tensor(rng.standard_normal((n, 3)).astype(np.float32))


def test_overflow_skips_update_and_halves_scale():
    net = _dense()
    opt = nn.Adam(net.trainable_params(), learning_rate=0.1)
    step = TrainStep(_mse(net), opt, loss_scaler=DynamicLossScaler(1024.0, 2, 1000))
    x, y = _data()
    before = net.weight.asnumpy().copy()
    loss, norm, finite = step(x * np.float32(np.inf), y)        # non-finite gradients
    assert not bool(finite.asnumpy())
    np.testing.assert_array_equal(net.weight.asnumpy(), before)  # update skipped
    assert step.loss_scale == 512.0
    assert int(opt.global_step.asnumpy().reshape(-1)[0]) == 0                    # the LR schedule did not advance
    loss, norm, finite = step(x, y)
    assert bool(finite.asnumpy()) and np.abs(net.weight.asnumpy() - before).max() > 0
    assert step.loss_scale == 512.0 and int(opt.global_step.asnumpy().reshape(-1)[0]) == 1



@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_non_finite_gradient_element_skips_the_update(bad):
    """The finiteness check goes through the global norm: one Inf or NaN element in one of several
    gradients must be enough to skip the update."""
    class Two(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = ms.Parameter(Tensor(np.ones(3, np.float32)), name="a")
            self.b = ms.Parameter(Tensor(np.ones(4, np.float32)), name="b")

        def construct(self, x, s):
            return (self.a * x).sum() + (self.b * s).sum()

    net = Two()
    opt = nn.SGD(net.trainable_params(), learning_rate=0.1)
    step = TrainStep(net, opt, clip_grad_norm=1.0, loss_scaler=DynamicLossScaler(8.0, 2, 1000))
    x = Tensor(np.array([1.0, 2.0, 3.0], np.float32))
    s = Tensor(np.array([0.5, bad, 0.25, 1.0], np.float32))   # d loss / d b = s
    _, norm, finite = step(x, s)
    assert not bool(finite.asnumpy()) and not np.isfinite(float(norm.asnumpy()))
    np.testing.assert_array_equal(net.a.asnumpy(), np.ones(3, np.float32))
    np.testing.assert_array_equal(net.b.asnumpy(), np.ones(4, np.float32))
    assert step.loss_scale == 4.0
    _, _, finite = step(x, Tensor(np.array([0.5, 2.0, 0.25, 1.0], np.float32)))
    assert bool(finite.asnumpy()) and not np.array_equal(net.a.asnumpy(), np.ones(3, np.float32))

def test_loss_scaling_does_not_change_the_update():
    x, y = _data()
    results = []
    for scaler in (None, DynamicLossScaler(2.0 ** 12, 2, 1000)):
        net = _dense()
        opt = nn.SGD(net.trainable_params(), learning_rate=0.1)
        step = TrainStep(_mse(net), opt, loss_scaler=scaler)
        loss, _, _ = step(x, y)
        results.append((float(loss.asnumpy()), net.weight.asnumpy().copy()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)   # the returned loss is unscaled
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_accumulation_equals_one_big_batch():
    x, y = _data(8)
    net_a = _dense()
    step_a = TrainStep(_mse(net_a), nn.Adam(net_a.trainable_params(), learning_rate=0.05))
    step_a(x, y)
    net_b = _dense()
    step_b = TrainStep(_mse(net_b), nn.Adam(net_b.trainable_params(), learning_rate=0.05), grad_accum=2)
    loss, norm, finite = step_b(x[:4], y[:4])
    assert norm is None and finite is None                       # first micro-batch: no update yet
    np.testing.assert_array_equal(net_b.weight.asnumpy(), _dense().weight.asnumpy())
    loss, norm, finite = step_b(x[4:], y[4:])
    assert bool(finite.asnumpy())
    np.testing.assert_allclose(net_b.weight.asnumpy(), net_a.weight.asnumpy(), rtol=1e-5, atol=1e-6)


def test_clipping_by_global_norm():
    x, y = _data()
    net = _dense()
    opt = nn.SGD(net.trainable_params(), learning_rate=1.0)
    w0 = [p.asnumpy().copy() for p in net.trainable_params()]
    ref = _dense()
    grads = ms.grad(_mse(ref), grad_position=None, weights=ref.trainable_params())(x, y)
    raw_norm = math.sqrt(sum(float((g.asnumpy() ** 2).sum()) for g in grads))
    step = TrainStep(_mse(net), opt, clip_grad_norm=0.1)
    _, norm, _ = step(x, y)
    assert float(norm.asnumpy()) == pytest.approx(raw_norm, rel=1e-5)   # the norm before clipping is reported
    delta = math.sqrt(sum(float(((p.asnumpy() - w) ** 2).sum()) for p, w in zip(net.trainable_params(), w0)))
    assert delta == pytest.approx(0.1, rel=1e-4)                        # SGD lr 1: the step is the clipped grad


def test_lr_schedules():
    net = _dense()
    sched = build_lr_schedule("cosine", 1e-3, warmup_steps=10, total_steps=110, min_lr=1e-5)
    expected = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 1e-5 + 0.5 * (1e-3 - 1e-5), 110: 1e-5, 500: 1e-5}
    for step, value in expected.items():
        assert float(sched(Tensor(step, ms.int32)).asnumpy()) == pytest.approx(value, rel=1e-5)
    const = build_lr_schedule("constant", 2e-4, warmup_steps=4)
    assert [round(float(const(Tensor(s, ms.int32)).asnumpy()), 8) for s in (0, 1, 3, 9)] == [5e-5, 1e-4, 2e-4, 2e-4]
    opt = nn.Adam(net.trainable_params(), learning_rate=sched)
    assert current_lr(opt) == pytest.approx(1e-4, rel=1e-5)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        build_lr_schedule("step", 1e-3)


def _set_dense(net, weight, bias):
    """Write new online weights in place, as an optimizer step does. (Not ``set_data``: a graph compiled before
    it -- the EMA's -- keeps reading the tensor the Parameter held when it was compiled, on MindSpore 2.10.)"""
    ops.assign(net.weight, Tensor(weight))
    ops.assign(net.bias, Tensor(bias))


def _online_weights(steps, seed):
    """The online weights a training run would hand the EMA after each optimizer step: (W (3, 4), b (3,))."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
            for _ in range(steps)]


# (ours, ema-pytorch's) options; {} and {} compare both libraries' defaults (beta 0.9999, 100, 10, 1, 2/3, 0)
EMA_CASES = {
    "defaults": ({}, {}, 150),
    "every step, from step 2": (dict(decay=0.999, update_after_step=2, update_every=1),
                                dict(beta=0.999, update_after_step=2, update_every=1), 12),
    "every 3rd, gamma 2, power 3/4, min": (dict(decay=0.9, update_after_step=5, update_every=3, inv_gamma=2.0,
                                                power=0.75, min_decay=0.3),
                                           dict(beta=0.9, update_after_step=5, update_every=3, inv_gamma=2.0,
                                                power=0.75, min_value=0.3), 30),
    "reaches its cap": (dict(decay=0.6, update_after_step=0, update_every=2, inv_gamma=4.0, power=1.0),
                        dict(beta=0.6, update_after_step=0, update_every=2, inv_gamma=4.0, power=1.0), 20),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(EMA_CASES))
def test_ema_inv_gamma_warmup_matches_ema_pytorch(case):
    """Ours and ema-pytorch's EMA, fed the same online weights step after step, hold the same average."""
    torch = pytest.importorskip("torch")
    ema_pytorch = pytest.importorskip("ema_pytorch")
    ours_kw, theirs_kw, steps = EMA_CASES[case]
    online, shadow = _dense(0), _dense(1)
    t_online, t_shadow = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with torch.no_grad():
        for t_net, net in ((t_online, online), (t_shadow, shadow)):
            t_net.weight.copy_(torch.from_numpy(net.weight.asnumpy()))
            t_net.bias.copy_(torch.from_numpy(net.bias.asnumpy()))
    ours = EMA(online, shadow, warmup="inv_gamma", **ours_kw)
    theirs = ema_pytorch.EMA(t_online, ema_model=t_shadow, **theirs_kw)
    lerps = 0
    for step, (w, b) in enumerate(_online_weights(steps, seed=steps)):
        _set_dense(online, w, b)
        with torch.no_grad():
            t_online.weight.copy_(torch.from_numpy(w))
            t_online.bias.copy_(torch.from_numpy(b))
        before = shadow.weight.asnumpy().copy()
        ours.update()
        theirs.update()
        assert ours.state()["step"] == int(theirs.step) == step + 1
        np.testing.assert_allclose(shadow.weight.asnumpy(), theirs.ema_model.weight.detach().numpy(),
                                   rtol=1e-6, atol=1e-6, err_msg=f"{case}: update {step + 1}")
        np.testing.assert_allclose(shadow.bias.asnumpy(), theirs.ema_model.bias.detach().numpy(),
                                   rtol=1e-6, atol=1e-6, err_msg=f"{case}: update {step + 1}")
        after = shadow.weight.asnumpy()
        lerps += not (np.array_equal(after, before) or np.array_equal(after, w))
        if step + 1 > theirs.update_after_step + 1:   # ema-pytorch's decay is defined from there on
            assert ours.current_decay(ours.step) == pytest.approx(theirs.get_current_decay(), abs=1e-6)
    assert lerps > 0, "the case never averaged: it checks only copies"


def _lit_ema_reference(initial, online_seq, decay, use_num_updates=True):
    """ldm's LitEma (ldm/modules/ema.py): the shadow starts as a copy of the model; each forward does
    num_updates += 1; decay = min(decay, (1 + num_updates) / (10 + num_updates)); shadow -= (1 - decay)(shadow - p)
    (a fixed decay when use_num_upates=False)."""
    shadow = [np.asarray(a, np.float64).copy() for a in initial]
    out = []
    for n, params in enumerate(online_seq, start=1):
        d = min(decay, (1 + n) / (10 + n)) if use_num_updates else decay
        shadow = [s - (1.0 - d) * (s - np.asarray(p, np.float64)) for s, p in zip(shadow, params)]
        out.append([s.copy() for s in shadow])
    return out


@pytest.mark.parametrize("warmup,decay", [("ldm", 0.9999), ("ldm", 0.5), ("none", 0.7)])
def test_ema_ldm_warmup_matches_lit_ema(warmup, decay):
    online, shadow = _dense(0), _dense(1)
    ema = EMA(online, shadow, decay=decay, warmup=warmup)
    ema.copy_from_online()                         # LitEma's buffers start as a clone of the model
    initial = (online.weight.asnumpy(), online.bias.asnumpy())
    seq = _online_weights(20, seed=3)
    want = _lit_ema_reference(initial, seq, decay, use_num_updates=(warmup == "ldm"))
    for n, ((w, b), (ref_w, ref_b)) in enumerate(zip(seq, want), start=1):
        _set_dense(online, w, b)
        ema.update()
        np.testing.assert_allclose(shadow.weight.asnumpy(), ref_w, rtol=1e-6, atol=1e-6, err_msg=f"update {n}")
        np.testing.assert_allclose(shadow.bias.asnumpy(), ref_b, rtol=1e-6, atol=1e-6, err_msg=f"update {n}")
    assert ema.state() == {"step": 20}


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "step_00000001.ckpt"
    save_checkpoint(path, {"w": np.arange(6, dtype=np.float32)}, {"step": 1})
    good = path.read_bytes()

    real_save = ms.save_checkpoint

    def crashing_save(items, name, **kwargs):
        real_save(items, name, **kwargs)
        with open(name, "r+b") as f:                 # half-written file, then the "power cut"
            f.truncate(os.path.getsize(name) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(ms, "save_checkpoint", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"w": np.zeros(6, dtype=np.float32)}, {"step": 2})
    assert path.read_bytes() == good                 # the old checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary left behind
    monkeypatch.undo()
    arrays, meta = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(6, dtype=np.float32))
    assert meta == {"step": 1}


def test_safetensors_export_keeps_shapes_and_metadata(tmp_path):
    weights = {"scale_factor": np.array(0.18, np.float32), "w": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    path = export_safetensors(tmp_path / "model.safetensors", weights, {"step": 7, "weights": "ema"})
    arrays, meta = load_safetensors(path)
    assert arrays["scale_factor"].shape == () and float(arrays["scale_factor"]) == np.float32(0.18)
    np.testing.assert_array_equal(arrays["w"], weights["w"])          # a transposed (non-contiguous) view
    assert meta == {"step": 7, "weights": "ema"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]   # no temporary file left


def test_checkpoint_listing_pruning_and_errors(tmp_path):
    for step in (1, 5, 12, 30):
        save_checkpoint(tmp_path / f"step_{step:08d}.ckpt", {"w": np.full(2, step, np.float32)}, {"step": step})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 5, 12, 30]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [12, 30]
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a MindSpore checkpoint"):
        load_checkpoint(tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    assert read_checkpoint_meta(tmp_path / "step_00000030.ckpt") == {"step": 30}    # the metadata alone
    for bad, match in (("broken.ckpt", "corrupt or not a MindSpore checkpoint"), ("missing.ckpt", "does not exist")):
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint_meta(tmp_path / bad)
    # the newest that reads, a truncated newer one passed over: with its tensors (and one line saying so), or
    # its metadata alone
    good = (tmp_path / "step_00000030.ckpt").read_bytes()
    (tmp_path / "step_00000040.ckpt").write_bytes(good[: len(good) // 2])
    lines = []
    path, arrays, meta = newest_readable_checkpoint(tmp_path, log=lines.append)
    assert (path.name, meta, arrays["w"].tolist()) == ("step_00000030.ckpt", {"step": 30}, [30.0, 30.0])
    assert len(lines) == 1 and "step_00000040.ckpt is unreadable" in lines[0] and "(step 30)" in lines[0]
    assert newest_readable_meta(tmp_path) == {"step": 30}
    assert newest_readable_meta(tmp_path / "empty") is None and newest_readable_checkpoint(tmp_path / "empty") is None
    for step in (12, 30):
        (tmp_path / f"step_{step:08d}.ckpt").write_bytes(b"truncated")
    assert newest_readable_meta(tmp_path) is None
    with pytest.raises(CheckpointError, match="step_00000040.ckpt"):   # none reads: the newest one's error
        newest_readable_checkpoint(tmp_path)


def test_checkpoint_reader_equals_mindspores_and_skips_what_is_not_asked(tmp_path, monkeypatch):
    """Our entry-by-entry .ckpt reader against ms.load_checkpoint: every dtype a checkpoint may hold (bfloat16 as
    float32), a 0-d tensor, tensors split into slices (MindSpore's slice size made 1 KB here), a
    unicode string, a file with a CRC tail; only the wanted entries; a file cut short, named."""
    import mindspore.train.serialization as serialization

    from ms_diffusion.io.ms_checkpoint_io import read_ms_checkpoint_entries

    rng = np.random.default_rng(0)
    values = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "f16": rng.standard_normal(7).astype(np.float16),
              "f64": rng.standard_normal((2, 2)), "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
              "i64": np.arange(4, dtype=np.int64), "u8": np.arange(9, dtype=np.uint8), "i8": np.arange(-4, 4, dtype=np.int8),
              "bool": np.array([True, False, True]), "scalar": np.array(2.5, np.float32), "empty": np.zeros((0,), np.float32),
              "big": rng.standard_normal((40, 30)).astype(np.float32), "big_i64": np.arange(700, dtype=np.int64)}
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)          # KB: "big" and "big_i64" span several entries
    items = [{"name": k, "data": ms.Parameter(ms.Tensor(v), name=k)} for k, v in values.items()]
    items.append({"name": "bf16", "data": ms.Parameter(ms.Tensor(values["f32"], ms.bfloat16), name="bf16")})
    meta = {"text": "ünïcode ✓", "step": 3}
    for crc in (False, True):
        path = tmp_path / f"crc_{crc}.ckpt"
        ms.save_checkpoint(items, str(path), append_dict={"meta": json.dumps(meta)}, crc_check=crc)
        ref = ms.load_checkpoint(str(path))
        ours = read_ms_checkpoint_entries(path)
        assert list(ours) == list(ref)
        assert json.loads(ours["meta"]) == meta == json.loads(ref["meta"])
        assert "empty" not in ref                               # MindSpore writes no zero-size tensor
        for name in set(values) - {"empty"}:
            want = ref[name].asnumpy()
            assert ours[name].dtype == want.dtype and ours[name].shape == want.shape, name
            np.testing.assert_array_equal(ours[name], want, err_msg=name)
        np.testing.assert_array_equal(ours["bf16"], ref["bf16"].astype(ms.float32).asnumpy())
        assert ours["bf16"].dtype == np.float32
    assert set(read_ms_checkpoint_entries(path, want=lambda n: n in ("meta", "big"))) == {"big", "meta"}
    data = path.read_bytes()
    assert data.count(b"\n\x03big\x12") == 5                 # "big" (4800 bytes) was written as 5 slices
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut short"):
        read_ms_checkpoint_entries(tmp_path / "cut.ckpt", want=lambda n: n == "meta")
    from mindspore.train.checkpoint_pb2 import Checkpoint
    damaged = Checkpoint()
    entry = damaged.value.add()
    entry.tag, entry.tensor.tensor_type, entry.tensor.tensor_content = "x", "Float32", b"\0" * 4
    entry.tensor.dims.extend([10 ** 12])                          # dims no file this size can hold
    (tmp_path / "dims.ckpt").write_bytes(damaged.SerializeToString())
    with pytest.raises(ValueError, match=r"entry 'x': dims \[1000000000000\] of Float32 do not fit"):
        read_ms_checkpoint_entries(tmp_path / "dims.ckpt")


class FixedBatches:
    """An ImageSource serving the same few images every epoch (for optimisation tests)."""

    def __init__(self, images, labels=None):
        self.images = images
        self.labels = np.zeros(len(images), np.int32) if labels is None else labels
        self.num_samples = len(images)

    def batches_per_epoch(self, batch_size):
        return self.num_samples // batch_size

    def epoch(self, epoch, batch_size, start_batch=0):
        for b in range(start_batch, self.batches_per_epoch(batch_size)):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            yield self.images[sl], self.labels[sl]
