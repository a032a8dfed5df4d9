"""1-bit compression: sign packing, scales, error feedback and the bytes it sends; config validation.

The hook runs in a one-process Gloo group here, driven by real DDP buckets; the 2-process runs are in
tests/integration/test_compression.py.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from imgtrain.config import ConfigError, DistributedConfig, OneBitConfig, load_config
from imgtrain.distributed.comm_hooks import (
    OneBitCompression,
    create_compression,
    onebit_decode,
    onebit_encode,
    pack_signs,
    unpack_signs,
)

from conftest import free_port


def test_pack_unpack_round_trip_and_bit_order():
    bits = torch.rand(8 * 1001, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_signs(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 1001
    assert torch.equal(unpack_signs(packed).bool(), bits)
    one = torch.zeros(16, dtype=torch.bool)
    one[3] = one[8] = True
    assert pack_signs(one).tolist() == [8, 1]


def test_encode_decode_keeps_signs_and_chunk_l1_norm():
    chunk = 16
    x = torch.randn(4 * chunk, generator=torch.Generator().manual_seed(1))
    x[-5:] = 0.0  # padding of a tensor of 59 elements
    counts = torch.tensor([16.0, 16.0, 16.0, 11.0])
    packed, scales = onebit_encode(x, counts, chunk)
    assert packed.numel() == x.numel() // 8 and scales.numel() == 4
    torch.testing.assert_close(scales[:3], x[:48].view(3, chunk).abs().mean(1))
    torch.testing.assert_close(scales[3], x[48:59].abs().mean())  # mean over the real elements only
    y = onebit_decode(packed, scales, chunk)
    real = x[:59]
    assert torch.equal(torch.sign(y[:59]), torch.where(torch.signbit(real), -1.0, 1.0))
    torch.testing.assert_close(y.view(4, chunk).abs()[:, 0], scales)


@pytest.fixture(scope="module")
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp(model: nn.Module, cfg: DistributedConfig) -> tuple[nn.Module, OneBitCompression]:
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
    comp = create_compression(ddp, cfg, world_size=1, backend="gloo")
    assert isinstance(comp, OneBitCompression)
    return ddp, comp


def test_error_feedback_sent_plus_residual_is_the_true_gradient_sum(one_process_group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 50), nn.ReLU(), nn.Linear(50, 3))
    cfg = DistributedConfig(compression="onebit", bucket_cap_mb=0.005, onebit=OneBitConfig(0, chunk_size=64))
    ddp, comp = _ddp(model, cfg)
    names = [n for n, _ in model.named_parameters()]
    true_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    sent_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(6):
        x = torch.randn(8, 37)
        # The true gradient of this step, computed outside DDP on a copy of the same weights.
        ref = nn.Sequential(nn.Linear(37, 50), nn.ReLU(), nn.Linear(50, 3))
        ref.load_state_dict(model.state_dict())
        ref(x).square().mean().backward()
        ddp(x).square().mean().backward()
        for n, p, rp in zip(names, model.parameters(), ref.parameters(), strict=True):
            true_sum[n] += rp.grad
            sent_sum[n] += p.grad
            # Each tensor arrives as signs times one scale per chunk: at most ceil(numel/64) magnitudes.
            assert p.grad.abs().unique().numel() <= -(-p.numel() // 64)
        model.zero_grad()
    assert comp.step == 6
    for n in names:
        torch.testing.assert_close(
            sent_sum[n] + comp.residual[n].view_as(sent_sum[n]), true_sum[n], rtol=1e-5, atol=1e-5
        )
        assert comp.residual[n].abs().sum() > 0  # the compression really lost something each step


def test_warmup_is_plain_allreduce_and_bytes_are_one_32nd(one_process_group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 600), nn.Linear(600, 100))  # 660,700 parameters
    cfg = DistributedConfig(compression="onebit", onebit=OneBitConfig(warmup_steps=1, chunk_size=2048))
    ddp, comp = _ddp(model, cfg)
    x = torch.randn(4, 1000)
    ddp(x).sum().backward()
    exact = [p.grad.clone() for p in model.parameters()]
    ref = nn.Sequential(nn.Linear(1000, 600), nn.Linear(600, 100))
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    for a, p in zip(exact, ref.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)  # warm-up step: uncompressed
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    payload, wire = comp.take_bytes(1)
    assert payload == fp32
    model.zero_grad()
    ddp(x).sum().backward()
    payload, _ = comp.take_bytes(1)
    assert payload == comp.expected_bytes_per_step()
    # Signs: 1/32 of fp32; scales: 4 bytes per chunk of 2048 (plus padding of each tensor to whole chunks).
    assert fp32 / 32 < payload < fp32 / 32 * (1 + 1.5 / 64 + 0.01)
    st = comp.state_dict()
    assert st["step"] == 2 and set(st["residual"]) == {n for n, _ in model.named_parameters()}


def test_compression_config_is_validated_with_the_key():
    cfg = load_config(None, ["distributed.compression=powersgd", "distributed.powersgd.rank=4"])
    assert cfg.distributed.powersgd.rank == 4
    with pytest.raises(ConfigError, match="distributed.compression"):
        load_config(None, ["distributed.compression=topk"])
    with pytest.raises(ConfigError, match="distributed.onebit.chunk_size"):
        load_config(None, ["distributed.onebit.chunk_size=100"])
    with pytest.raises(ConfigError, match="distributed.powersgd.start_iter"):
        load_config(None, ["distributed.powersgd.start_iter=1"])
    with pytest.raises(ConfigError, match="distributed.powersgd.bogus"):
        load_config(None, ["distributed.powersgd.bogus=1"])


def _onebit(model: nn.Module, world: int, chunk: int, numpy_ops: bool | None = None) -> OneBitCompression:
    cfg = DistributedConfig(compression="onebit", onebit=OneBitConfig(warmup_steps=0, chunk_size=chunk))
    comp = create_compression(model, cfg, world_size=world, backend=None)  # no hook: called directly below
    assert isinstance(comp, OneBitCompression)
    comp.numpy_ops = numpy_ops
    return comp


def test_two_ranks_apply_the_same_average_and_numpy_and_torch_bit_paths_agree():
    """Two ranks' 1-bit messages, gathered and decoded on each rank: both ranks get the same gradient,
    the mean of each rank's signs x scales, over several steps (residuals carried). The CPU path (NumPy's
    packbits, blocks) and the torch path that GPUs run give bit-identical messages, residuals and results."""
    g = torch.Generator().manual_seed(3)
    # One tensor spanning several encoder blocks (2^17 elements each on CPU), small ones with padding.
    model = nn.ModuleDict({"big": nn.Linear(700, 500), "small": nn.Linear(30, 3)})
    shapes = [p.shape for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    chunk = 64
    ranks = {path: [_onebit(model, 2, chunk, path) for _ in range(2)] for path in (None, False)}
    for _ in range(3):
        grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
        grads[0][1].view(-1)[:4] = torch.tensor([0.0, -0.0, 0.0, -0.0])  # exact zeros of both signs
        results = {}
        for path, comps in ranks.items():
            msgs, lays, sent = [], [], []
            for comp, gr in zip(comps, grads, strict=True):
                message, lay = comp.compress_bucket(gr, names)
                msgs.append(message.clone())
                lays.append(lay)
                packed, scales = message[: lay.nsign], message[lay.nsign :].view(torch.float32)
                sent.append(onebit_decode(packed, scales, chunk))  # what this rank contributes, padded
            outs = []
            for comp, lay in zip(comps, lays, strict=True):
                lay.gathered.copy_(torch.stack(msgs))
                out = [torch.empty(s) for s in shapes]
                comp.decompress_into(out, lay)
                outs.append(out)
            for a, b in zip(outs[0], outs[1], strict=True):
                assert torch.equal(a, b)  # every rank applies the same gradient
            mean = (sent[0] + sent[1]) / 2
            for (_, off, n), o in zip(lays[0].slots, outs[0], strict=True):
                torch.testing.assert_close(o.view(-1), mean[off : off + n], rtol=1e-6, atol=0)
            results[path] = (msgs, outs, [dict(c.residual) for c in comps])
        (m_np, o_np, r_np), (m_t, o_t, r_t) = results[None], results[False]
        assert all(torch.equal(a, b) for a, b in zip(m_np, m_t, strict=True))
        assert all(
            torch.equal(a, b) for x, y in zip(o_np, o_t, strict=True) for a, b in zip(x, y, strict=True)
        )
        assert all(torch.equal(a[n], b[n]) for a, b in zip(r_np, r_t, strict=True) for n in names)


def test_torch_bit_packing_matches_numpy():
    bits = torch.rand(8 * 513, generator=torch.Generator().manual_seed(4)) > 0.5
    packed = pack_signs(bits, numpy_ops=True)
    assert torch.equal(pack_signs(bits, numpy_ops=False), packed)
    assert torch.equal(unpack_signs(packed, numpy_ops=False), unpack_signs(packed, numpy_ops=True))
