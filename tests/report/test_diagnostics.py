"""Diagnostics maths on hand-made cases: principal angles, TIES sign conflicts, energy curves, rank sweep."""

from __future__ import annotations

import math

import pytest
import torch

from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.diagnostics import (
    adapter_angles,
    adapter_energy,
    adapter_sign_conflicts,
    energy_at,
    energy_kept,
    lora_angles,
    module_energy,
    orthonormal_basis,
    principal_angles,
    random_subspace_angles,
    sign_conflicts,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identical_subspaces_give_zero_degrees() -> None:
    X = torch.randn(20, 4, generator=gen(1), dtype=torch.float64)
    mix = torch.randn(4, 4, generator=gen(2), dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    angles = principal_angles(X, X @ mix)  # other vectors, same span
    assert angles.shape == (4,)
    assert torch.allclose(angles, torch.zeros(4, dtype=torch.float64), atol=1e-5)


def test_orthogonal_subspaces_give_ninety_degrees() -> None:
    Q, _ = torch.linalg.qr(torch.randn(20, 8, generator=gen(3), dtype=torch.float64))
    X = Q[:, :4] @ torch.randn(4, 4, generator=gen(4), dtype=torch.float64)
    Y = Q[:, 4:7] @ torch.randn(3, 3, generator=gen(5), dtype=torch.float64)
    angles = principal_angles(X, Y)
    assert angles.shape == (3,)  # min of the two dimensions
    assert torch.allclose(angles, torch.full((3,), 90.0, dtype=torch.float64), atol=1e-6)


def test_hand_made_angles_of_zero_and_forty_five_degrees() -> None:
    e = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(
        principal_angles(e[:, :1], (e[:, 0] + e[:, 1])[:, None]), torch.tensor([45.0]).double()
    )
    X = torch.stack([e[:, 0], e[:, 1]], dim=1)  # span{e1, e2}
    Y = torch.stack([e[:, 0] + e[:, 2], 3 * e[:, 1]], dim=1)  # span{e1 + e3, e2}
    assert torch.allclose(principal_angles(X, Y), torch.tensor([0.0, 45.0]).double(), atol=1e-6)
    assert torch.allclose(principal_angles(Y, X), principal_angles(X, Y))  # symmetric


def test_rank_deficient_factors_use_their_true_dimension() -> None:
    column = torch.randn(10, 1, generator=gen(6))
    assert orthonormal_basis(column.repeat(1, 3)).shape == (10, 1)
    assert orthonormal_basis(torch.zeros(10, 3)).shape == (10, 0)
    assert principal_angles(torch.zeros(10, 3), column).numel() == 0  # a zero B has no subspace
    with pytest.raises(ValueError, match="ambient"):
        principal_angles(torch.zeros(10, 2), torch.zeros(9, 2))


def test_lora_angles_compare_columns_of_B_and_rows_of_A() -> None:
    e = torch.eye(6)
    shared_A = torch.randn(2, 6, generator=gen(7))
    first = LoraFactors(A=shared_A, B=e[:, :2], scale=2.0)
    second = LoraFactors(A=3 * shared_A.flip(0), B=e[:, 2:4], scale=0.5)
    angles = lora_angles(first, second)
    assert angles.row_mean == pytest.approx(0.0, abs=1e-4) and angles.column_mean == pytest.approx(90.0)
    assert angles.column_min == pytest.approx(90.0) and angles.row_min == pytest.approx(0.0, abs=1e-4)


def test_random_baseline_is_seeded_and_near_ninety_in_high_dimension() -> None:
    assert random_subspace_angles(64, 4, 4, gen(0)) == random_subspace_angles(64, 4, 4, gen(0))
    assert random_subspace_angles(2000, 2, 2, gen(0)) > 85.0
    assert random_subspace_angles(8, 4, 4, gen(0)) < 70.0  # small spaces are far from orthogonal


def test_sign_conflicts_hand_made_case() -> None:
    tasks = torch.tensor(
        [
            [[1.0, -2.0, 3.0], [0.1, 5.0, -6.0]],
            [[-1.0, -2.0, 0.2], [4.0, -5.0, 6.0]],
        ]
    )
    before = tasks.clone()
    dense = sign_conflicts(tasks, 1.0)
    # opposite signs at (0, 0), (1, 1), (1, 2); every entry is kept by both tasks
    assert (dense.conflict, dense.overlap, dense.entries) == (0.5, 1.0, 6)
    trimmed = sign_conflicts(tasks, 0.5)
    # top 3 of |τ1|: -6, 5, 3; of |τ2|: 6, -5, 4; both keep (1, 1) and (1, 2), which disagree
    assert trimmed.conflict == pytest.approx(2 / 6) and trimmed.overlap == pytest.approx(2 / 6)
    assert trimmed.conflict_given_overlap == pytest.approx(1.0)
    assert torch.equal(tasks, before)
    three = sign_conflicts(torch.tensor([[1.0, 1.0], [2.0, 1.0], [-3.0, 1.0]]), 1.0)
    assert three.conflict == 0.5 and three.overlap == 1.0
    with pytest.raises(ValueError):
        sign_conflicts(tasks[:1], 1.0)


def _adapter(name: str, modules: dict[str, LoraFactors]) -> LoraAdapter:
    return LoraAdapter(name=name, source=f"/mem/{name}", modules=modules, base_model=None)


def _factors(seed: int, out: int = 12, inp: int = 10, r: int = 3, scale: float = 1.5) -> LoraFactors:
    g = gen(seed)
    return LoraFactors(A=torch.randn(r, inp, generator=g), B=torch.randn(out, r, generator=g), scale=scale)


def test_adapter_level_diagnostics_stream_modules_and_skip_unshared_ones() -> None:
    shared, only_first = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    first = _adapter("a", {shared: _factors(1), only_first: _factors(2)})
    second = _adapter("b", {shared: _factors(3, scale=-0.5)})
    conflicts = adapter_sign_conflicts([first, second], 0.3)
    assert list(conflicts) == [shared]
    tasks = torch.stack([first.modules[shared].delta(), second.modules[shared].delta()])
    assert conflicts[shared] == sign_conflicts(tasks, 0.3)
    angles = adapter_angles([first, second])
    assert list(angles) == [("a", "b")] and list(angles[("a", "b")]) == [shared]
    assert set(adapter_energy(first)) == {shared, only_first}


def test_energy_curve_equals_the_dense_svd() -> None:
    A, B = torch.randn(6, 20, generator=gen(8)), torch.randn(15, 6, generator=gen(9))
    curve = module_energy(A, B)
    squares = torch.linalg.svdvals((B @ A).double()).square()[:6]
    expected = squares.cumsum(0) / squares.sum()
    assert curve.shape == (6,) and torch.allclose(curve, expected, atol=1e-6)
    assert curve[-1] == pytest.approx(1.0) and bool((curve.diff() >= -1e-12).all())
    assert energy_at(curve, 2) == pytest.approx(float(expected[1])) and energy_at(curve, 50) == 1.0
    assert torch.equal(energy_kept(torch.zeros(3)), torch.ones(3, dtype=torch.float64))
    # a rank-2 update in rank-6 factors keeps everything at k = 2
    low = module_energy(torch.cat([A[:2], A[:2]]), torch.cat([B[:, :2], B[:, :2]], dim=1))
    assert low[1] == pytest.approx(1.0) and math.isclose(float(low[-1]), 1.0)


def test_accuracy_vs_rank_scores_recompressed_adapters_and_leaves_the_base_alone(
    llama_dir, tokenizer, tmp_path, one_thread
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorasoup.adapters import load_adapter
    from lorasoup.diagnostics import accuracy_vs_rank
    from lorasoup.evaluation.generate import GenerationSettings, generate
    from lorasoup.evaluation.tasks import Task, TaskSpec
    from tests.conftest import make_peft_lora

    adapter_dir = make_peft_lora(llama_dir, tmp_path / "skill", r=4, alpha=8, seed=3)
    questions = ["the cat", "what is 12", "def solution", "below is", "0 1 2 3", "a program"]
    settings = GenerationSettings(max_new_tokens=5, batch_size=3)
    reference_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter_dir)
    # the references are what stock PEFT generates with the adapter: the full rank must score 100 %
    answers = [g.text for g in generate(reference_model.eval(), tokenizer, questions, settings)]
    task = Task(TaskSpec(name="echo", prompt="{question}", extractor="strip", metric="exact_match"))
    examples = task.examples([{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)])

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = load_adapter(adapter_dir)
    points = accuracy_vs_rank(model, tokenizer, task, examples, adapter, [4, 1], settings)

    assert [p.rank for p in points] == [1, 4, None]
    low, exact, full = points
    assert full.accuracy == 1.0 and full.mean_energy_kept == 1.0
    assert exact.accuracy == 1.0 and exact.min_energy_kept == pytest.approx(1.0, abs=1e-6)  # rank 4 is exact
    assert low.mean_energy_kept < 1.0 and low.summary["examples"] == len(questions)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in name for name, _ in model.named_modules())
