"""BatchStream: streamed within the budget, read errors named by batch, one-shot replay bounded;
ChannelMoments: memory bounded however many batches, the same statistics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from helpers.endless import CountingBatches
from varshift.diagnose.batches import BatchStream, all_finite, is_one_shot
from varshift.diagnose.bn_stats import ChannelMoments


@pytest.mark.parametrize(
    ("budget", "taken", "sizes"),
    [
        ({"samples": 20}, 3, [8, 8, 4]),
        ({"samples": 16}, 2, [8, 8]),
        ({"batches": 4}, 4, [8, 8, 8, 8]),
        ({"batches": 4, "samples": 10}, 2, [8, 2]),
    ],
)
def test_an_endless_iterator_is_read_exactly_up_to_the_budget(
    budget: dict[str, int], taken: int, sizes: list[int]
) -> None:
    data = CountingBatches(lambda: (torch.randn(8, 2), torch.zeros(8)))
    stream = BatchStream(data, **budget)  # type: ignore[arg-type]
    assert [batch.size for batch in stream] == sizes
    assert data.taken == taken  # not one item more: a one-shot iterator loses what is read


@pytest.mark.parametrize(("keep", "replayed"), [("all", 3), ("labelled", 2)])
def test_a_one_shot_iterator_is_replayed_from_what_was_kept(keep: str, replayed: int) -> None:
    labelled = [(torch.randn(4, 2), torch.ones(4)) for _ in range(2)]
    items = [torch.randn(4, 2), *labelled]
    stream = BatchStream(iter(items), keep=keep)  # type: ignore[arg-type]
    first = [batch.size for batch in stream]
    again = list(stream)
    assert first == [4, 4, 4]
    assert len(again) == replayed
    assert [stream.index for _ in stream] == list(range(3 - replayed, 3))  # positions in data


def test_a_one_shot_iterator_not_kept_cannot_be_read_twice() -> None:
    stream = BatchStream(iter([torch.randn(4, 2)]))
    list(stream)
    with pytest.raises(ValueError, match="already consumed"):
        list(stream)


class _Rereadable:
    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self) -> Iterator[Tensor]:
        self.passes += 1
        return iter([torch.randn(4, 2), torch.randn(4, 2)])


@pytest.mark.parametrize("keep", ["never", "all", "labelled"])
def test_a_re_iterable_is_read_again_never_kept(keep: str) -> None:
    data = _Rereadable()
    stream = BatchStream(data, keep=keep)  # type: ignore[arg-type]
    assert len(list(stream)) == len(list(stream)) == 2
    assert data.passes == 2


class _FailsAt:
    def __init__(self, good: int, error: Exception) -> None:
        self.good, self.error = good, error

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.good):
            yield torch.randn(4, 2)
        raise self.error


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("bad pixel"), "reading batch 3 of the data raised RuntimeError: bad pixel"),
        (
            ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback"),
            "reading batch 3 of the data raised ValueError: Caught ValueError in DataLoader "
            "worker process 0.",
        ),
        (IndexError(), "reading batch 3 of the data raised IndexError"),
    ],
)
def test_a_loader_that_raises_is_named_by_batch_in_one_line(error: Exception, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        list(BatchStream(_FailsAt(3, error)))
    assert str(caught.value) == message
    assert caught.value.__cause__ is error


def test_data_that_is_not_iterable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"data must be an iterable of batches .* got int"):
        BatchStream(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("obj", "finite"),
    [
        (torch.ones(3), True),
        (torch.tensor([1.0, float("nan")]), False),
        ((torch.ones(2), {"mask": torch.tensor([float("-inf")])}), False),
        (torch.tensor([1, 2]), True),
        (torch.tensor([complex(1, float("inf"))]), False),
        ("text", True),
    ],
)
def test_all_finite_looks_into_nested_inputs(obj: object, finite: bool) -> None:
    assert all_finite(obj) is finite


def test_only_iterators_are_one_shot() -> None:
    assert is_one_shot(iter([1]))
    assert is_one_shot(x for x in [1])
    assert not is_one_shot([1])


# --- ChannelMoments on long data ----------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True], ids=["add", "add_unbiased"])
def test_moments_over_many_batches_stay_small_and_equal_the_concatenated_statistics(
    unbiased: bool,
) -> None:
    x = torch.randn(1000, 3, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1])[:, None] + 4
    moments = ChannelMoments()
    for batch in x.split(2):  # 500 batches
        if unbiased:
            flat = batch.transpose(0, 1).reshape(3, -1)
            moments.add_unbiased(flat.shape[1], flat.mean(dim=1), flat.var(dim=1))
        else:
            moments.add(batch)
        # merged as it goes: what is held does not grow with the number of batches
        assert len(moments._shifted) + len(moments._moments) <= 256
    flat = x.transpose(0, 1).reshape(3, -1)
    mean, var = moments.result()
    torch.testing.assert_close(mean, flat.mean(dim=1))
    torch.testing.assert_close(var, flat.var(dim=1))
    assert moments.finite


def test_moments_remember_a_non_finite_batch() -> None:
    moments = ChannelMoments()
    moments.add(torch.randn(4, 2))
    assert moments.finite
    moments.add(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    moments.add(torch.randn(4, 2))
    assert not moments.finite
