"""CUDA code paths; skipped where CUDA is absent (CI), run on a GPU machine."""
import pytest
import torch

from ds_zo.model.dual_forward import dual_forward
from ds_zo.model.perturbed_copies import PerturbedCopies
from ds_zo.model.units import cut_into_units, resolve_trainable
from ds_zo.optimizer import StepRecord, apply_step
from ds_zo.perturb import PerturbationGenerator, param_key
from models import batch, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_slices_equal_whole_and_are_deterministic():
    gen = PerturbationGenerator(chunk_elements=1024)
    whole = gen.z(3, 0, 7, 5000, device="cuda")
    assert whole.device.type == "cuda"
    assert torch.equal(gen.z(3, 0, 7, 5000, 1000, 3500, device="cuda"), whole[1000:3500])
    assert torch.equal(PerturbationGenerator(chunk_elements=1024).z(3, 0, 7, 5000, device="cuda"), whole)


@cuda
def test_cuda_dual_forward_equals_two_forwards_and_update_matches_formula():
    model = tiny_model("llama").cuda().eval()
    b = {k: v.cuda() for k, v in batch().items()}
    units = cut_into_units(model, resolve_trainable(model, []))
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    gen = PerturbationGenerator()
    copies = PerturbedCopies(gen, keys, 1e-2)
    copies.set_slots(11, [(0, 1), (0, -1)])
    with torch.no_grad(), dual_forward(units, 2, 2, copies):
        dual = model(input_ids=torch.cat([b["input_ids"]] * 2), attention_mask=torch.cat([b["attention_mask"]] * 2),
                     use_cache=False).logits
    with torch.no_grad():
        plus_params = {n: p + 1e-2 * gen.z(11, 0, param_key(n), p.numel(), device="cuda").view_as(p)
                       for n, p in model.named_parameters()}
        plus = torch.func.functional_call(model, plus_params, args=(),
                                          kwargs=dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                      use_cache=False)).logits
    torch.testing.assert_close(dual[:2], plus, rtol=1e-5, atol=1e-6)
    p = next(model.parameters())
    before = p.detach().clone()
    rec = StepRecord(step=0, seed=11, g=(0.5,), lr=1e-2, wd=0.0)
    apply_step(p.data, keys[id(p)], rec, True, gen)
    z = gen.z(11, 0, keys[id(p)], p.numel(), device="cuda").view_as(p)
    torch.testing.assert_close(p.detach(), before - 1e-2 * (0.5 * z), rtol=0, atol=0)
