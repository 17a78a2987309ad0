"""The ZO-SGD update θ ← θ − lr·((1/q) Σ_j g_j·z_j + wd·θ), applied from the step record, against the plain
expression bit for bit: z·g is drawn already scaled by |g| and the sign is carried separately, which must not change
a single rounding."""
import pytest
import torch

from ds_zo.optimizer import StepRecord, apply_step
from ds_zo.perturb import PerturbationGenerator


def plain(theta, zs, grads, lr, wd, decays):
    upd = sum(g * z for g, z in zip(grads, zs)) / len(grads)
    if decays and wd:
        upd = upd + wd * theta
    return theta - lr * upd


@pytest.mark.parametrize("grads", [(0.731,), (-2.25,), (0.0,), (-0.0,), (1.5, -0.25), (-3.0, -1e-4), (-7.0, 2.0, 0.5)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("numel", [7, 300, 5000])
def test_update_equals_plain_expression(grads, wd, numel):
    gen = PerturbationGenerator(chunk_elements=1024)
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    record = StepRecord(step=0, seed=11, g=grads, lr=0.05, wd=wd)
    zs = [gen.z(11, j, 3, numel) for j in range(len(grads))]
    for decays in (False, True):
        got = theta.clone()
        apply_step(got, 3, record, decays, gen)
        assert torch.equal(got, plain(theta, zs, grads, 0.05, wd, decays)), (grads, wd, decays)


def test_update_rounds_once_into_16_bit_parameters():
    gen = PerturbationGenerator(chunk_elements=64)
    theta = torch.randn(200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    record = StepRecord(step=0, seed=2, g=(-4.0,), lr=0.5, wd=0.0)
    got = theta.clone()
    apply_step(got, 9, record, True, gen)
    want = plain(theta.float(), [gen.z(2, 0, 9, 200)], (-4.0,), 0.5, 0.0, True).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_span_scratch_is_one_span_and_a_second_only_when_asked():
    """The generator's float32 span scratch (the update's, shared with the working copies' ε·z): one span unless
    more are asked for (the update's z with several perturbations); reused, grown when asked for more spans or when
    the span grows; one set per device and stream (on CPU: the device alone)."""
    gen = PerturbationGenerator(chunk_elements=100)
    gen.span = lambda device: 100
    cpu = torch.device("cpu")
    one = gen.span_scratch(cpu)
    assert [t.numel() for t in one] == [100] and gen.span_scratch(cpu, 1) is one
    two = gen.span_scratch(cpu, 2)
    assert [t.numel() for t in two] == [100, 100] and gen.span_scratch(cpu, 1) is two
    gen.span = lambda device: 300
    three = gen.span_scratch(cpu)
    assert [t.numel() for t in three] == [300, 300]          # as many spans as before, each the new span
    assert list(gen._spans) == [(cpu, None)] and gen.span_scratch_nbytes() == 2400
