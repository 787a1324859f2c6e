"""The built-in demo: a small convolutional net trained with dropout *before* BatchNorm on a
built-in dataset, then linted, measured, and evaluated with three choices of BatchNorm statistics.

    varshift demo --data mnist1d --epochs 20 --out varshift-demo

Set-up (chosen once, not tuned on the outcome): :class:`DemoNet`, three blocks of
conv → ``nn.Dropout(p=0.3)`` → BatchNorm → ReLU (the placement Li et al., CVPR 2019, show to
shift the variance every BatchNorm sees between training and inference), then a linear head;
Adam (learning rate 1e-3), batches of 64, cross entropy. Everything runs on the CPU and is
deterministic given the seed (model initialisation, shuffling and dropout masks all come from
it; the caller's random state is left untouched).

After training, :func:`run_demo`

1. lints the model (:func:`varshift.diagnose.lint`, predicted shift from a batch of training
   data),
2. measures the shift at every BatchNorm on the training split
   (:func:`varshift.diagnose.measure`),
3. evaluates on the test split (a) the model as trained (the moving averages training stored),
   (b) a copy whose BatchNorm statistics were re-estimated on the training split with dropout
   off (:func:`varshift.fix.recalibrate_bn`, varshift's fix), (c) a copy re-estimated with
   dropout on, which is what :func:`torch.optim.swa_utils.update_bn` does (it calls
   ``model.train()``).

The statistics are re-estimated on training data only, so the test split is used for nothing but
the three evaluations.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varshift.data import SplitDataset, load_dataset
from varshift.diagnose import LintReport, ShiftReport, lint, measure
from varshift.fix import recalibrate_bn

__all__ = [
    "DEFAULT_EPOCHS",
    "DEMO_DATASETS",
    "DemoNet",
    "DemoResult",
    "Evaluation",
    "digits_net",
    "mnist1d_net",
    "mnist5k_net",
    "run_demo",
]

DEMO_DATASETS: dict[str, tuple[int, ...]] = {
    "mnist1d": (1, 40),
    "digits": (1, 8, 8),
    "mnist5k": (1, 28, 28),
}
"""The built-in classification datasets the demo trains on, with their per-sample input shape
(10 classes each); see :mod:`varshift.data.builtin`."""

NUM_CLASSES = 10
DROPOUT_P = 0.3
CHANNELS = 32
DEFAULT_EPOCHS: dict[str, int] = {"mnist1d": 20, "digits": 20, "mnist5k": 5}
"""Training epochs when ``run_demo`` is not given any: each dataset's demo then takes well under
two minutes on two CPU cores (mnist5k's 28×28 convolutions cost about 30 times mnist1d's)."""
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
# Batches for everything that does not train: large enough for stable BatchNorm estimates.
STATISTICS_BATCH = 256
# Training samples in the batch lint uses to predict the shift from the data.
LINT_SAMPLES = 256


class DemoNet(nn.Module):
    """Three blocks of conv → dropout → BatchNorm → ReLU, then flatten → linear.

    The convolutions are 1-D for inputs ``Tensor[N, C, L]`` (``input_shape = (C, L)``) and 2-D
    for ``Tensor[N, C, H, W]``; kernel 3, padding 1, stride 1 in the first block and 2 in the
    others. Modules are named ``blocks.<i>.conv``, ``.drop``, ``.bn``, ``.act`` and ``head``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int = NUM_CLASSES,
        *,
        channels: int = CHANNELS,
        p: float = DROPOUT_P,
    ) -> None:
        super().__init__()
        shape = tuple(int(size) for size in input_shape)
        if len(shape) not in (2, 3):
            raise ValueError(
                f"input_shape must be (C, L) or (C, H, W), got {tuple(input_shape)!r}"
            )
        conv: type[nn.Conv1d | nn.Conv2d] = nn.Conv1d if len(shape) == 2 else nn.Conv2d
        norm: type[nn.BatchNorm1d | nn.BatchNorm2d] = (
            nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
        )
        blocks: list[nn.Module] = []
        in_channels, spatial = shape[0], shape[1:]
        for index in range(3):
            stride = 1 if index == 0 else 2
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                [
                    ("conv", conv(in_channels, channels, 3, stride=stride, padding=1)),
                    ("drop", nn.Dropout(p)),
                    ("bn", norm(channels)),
                    ("act", nn.ReLU()),
                ]
            )
            blocks.append(nn.Sequential(layers))
            in_channels = channels
            spatial = tuple((size - 1) // stride + 1 for size in spatial)
        self.blocks = nn.Sequential(*blocks)
        features = channels
        for size in spatial:
            features *= size
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.blocks(x).flatten(1))
        return logits


def mnist1d_net() -> DemoNet:
    """The demo's network for ``builtin:mnist1d`` (a factory for ``--model``)."""
    return DemoNet(DEMO_DATASETS["mnist1d"])


def digits_net() -> DemoNet:
    """The demo's network for ``builtin:digits`` (a factory for ``--model``)."""
    return DemoNet(DEMO_DATASETS["digits"])


def mnist5k_net() -> DemoNet:
    """The demo's network for ``builtin:mnist5k`` (a factory for ``--model``)."""
    return DemoNet(DEMO_DATASETS["mnist5k"])


@dataclass(frozen=True, eq=False)
class Evaluation:
    """One model evaluated in eval mode on the test split: mean cross entropy and accuracy."""

    key: str
    label: str
    model: nn.Module
    loss: float
    accuracy: float


@dataclass(frozen=True, eq=False)
class DemoResult:
    """Everything :func:`run_demo` computed; ``str()`` is the demo's printed report.

    ``trained``, ``recalibrated_off`` and ``recalibrated_on`` are evaluated on the same test
    split (``dataset.x_test``); the two recalibrated models are copies of the trained one whose
    BatchNorm statistics were re-estimated on ``dataset.x_train`` with dropout off / on.
    """

    dataset: SplitDataset
    epochs: int
    seed: int
    p: float
    train_loss: tuple[float, ...]
    train_seconds: float
    lint: LintReport
    shift: ShiftReport
    trained: Evaluation
    recalibrated_off: Evaluation
    recalibrated_on: Evaluation
    files: tuple[Path, ...] = ()

    @property
    def evaluations(self) -> tuple[Evaluation, Evaluation, Evaluation]:
        return (self.trained, self.recalibrated_off, self.recalibrated_on)

    def __str__(self) -> str:
        data = self.dataset
        last = f", final training loss {self.train_loss[-1]:.4f}" if self.train_loss else ""
        lines = [
            f"varshift demo: DemoNet (3 x conv -> dropout(p={self.p:g}) -> BatchNorm -> ReLU, "
            f"then linear) on {data.name}, {len(data.x_train)} train / {len(data.x_test)} test "
            f"samples, seed {self.seed}",
            f"trained {self.epochs} epoch(s) in {self.train_seconds:.1f} s{last}",
            "",
            str(self.lint),
            "",
            "Measured on the training split:",
            str(self.shift),
            "",
            f"Test split ({len(data.x_test)} samples), eval mode:",
        ]
        width = max(len(e.label) for e in self.evaluations)
        lines += [
            f"  {e.label:<{width}}  accuracy {e.accuracy:.4f}  loss {e.loss:.4f}"
            for e in self.evaluations
        ]
        return "\n".join(lines)


def run_demo(
    *,
    data: str = "mnist1d",
    epochs: int | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    p: float = DROPOUT_P,
    train_size: int | None = None,
    test_size: int | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> DemoResult:
    """Train :class:`DemoNet` on a built-in dataset, lint and measure it, and evaluate it with
    its stored, recalibrated (dropout off) and recalibrated (dropout on) BatchNorm statistics.

    Args:
        data: ``"mnist1d"``, ``"digits"`` or ``"mnist5k"`` (see :data:`DEMO_DATASETS`).
        epochs: training epochs (>= 0; 0 evaluates the freshly initialised net); ``None``: the
            dataset's :data:`DEFAULT_EPOCHS`.
        out_dir: when given, the folder (created if needed) for ``variance_shift.png`` (the
            shift report's figure), ``accuracy.png`` (the three test accuracies) and
            ``model.pt`` (the trained ``state_dict``); listed in :attr:`DemoResult.files`.
        seed: seeds initialisation, shuffling, dropout, the recalibration with dropout on, and
            the train/test split of ``digits``. The global random state is restored afterwards.
        p: the dropout probability of every block.
        train_size, test_size: use a stratified subset of that many samples (``None``: all).
        threads: torch's intra-op threads while the demo runs (``None``: leave the setting as
            it is). One by default: layers this small gain little from more, and on a busy
            machine extra threads wait on each other (measured on a shared 2-core machine: 13 ms
            per training step with one thread, 500 ms with two).
        progress: tqdm bars on stderr (training epochs, measurement, recalibration).

    Raises:
        ValueError: an unknown ``data``, ``epochs < 0``, a subset size out of range.
        NotADirectoryError: ``out_dir`` is an existing file (refused before any training).
    """
    if data not in DEMO_DATASETS:
        raise ValueError(f"data must be one of {list(DEMO_DATASETS)}, got {data!r}")
    if epochs is None:
        epochs = DEFAULT_EPOCHS[data]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"out_dir {str(out_dir)!r} is a file, not a folder")
    dataset = load_dataset(data, seed=seed)
    if train_size is not None or test_size is not None:
        dataset = dataset.subset(train_size, test_size, seed=seed)
    with torch.random.fork_rng(devices=[]), _intra_op_threads(threads):
        torch.manual_seed(seed)
        model = DemoNet(dataset.input_shape, dataset.num_outputs, p=p)
        started = time.perf_counter()
        losses = _train(model, dataset, epochs=epochs, seed=seed, progress=progress)
        seconds = time.perf_counter() - started
        report = lint(model, dataset.x_train[:LINT_SAMPLES])
        statistics = list(torch.split(dataset.x_train, STATISTICS_BATCH))
        shift = measure(model, statistics, progress=progress)
        fixed = recalibrate_bn(copy.deepcopy(model), statistics, progress=progress)
        noisy = recalibrate_bn(copy.deepcopy(model), statistics, keep_noise=True, progress=progress)
        result = DemoResult(
            dataset=dataset,
            epochs=epochs,
            seed=seed,
            p=p,
            train_loss=tuple(losses),
            train_seconds=seconds,
            lint=report,
            shift=shift,
            trained=_evaluate("trained", "as trained (stored statistics)", model, dataset),
            recalibrated_off=_evaluate(
                "recalibrated_off", "recalibrated, dropout off (varshift)", fixed, dataset
            ),
            recalibrated_on=_evaluate(
                "recalibrated_on", "recalibrated, dropout on (like update_bn)", noisy, dataset
            ),
        )
    if out_dir is None:
        return result
    return _write_files(result, Path(out_dir))


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    model: nn.Module, dataset: SplitDataset, *, epochs: int, seed: int, progress: bool
) -> list[float]:
    """Adam on shuffled mini-batches; returns the sample-weighted mean training loss per epoch.
    Leaves ``model`` in eval mode."""
    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    shuffle = torch.Generator().manual_seed(seed)
    count = len(dataset.x_train)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(epochs), desc="training", unit="epoch", file=sys.stderr, disable=not progress)
    for _ in bar:
        total = 0.0
        for index in torch.split(torch.randperm(count, generator=shuffle), BATCH_SIZE):
            if len(index) < 2:
                continue  # BatchNorm cannot estimate a variance from one sample
            loss = F.cross_entropy(model(dataset.x_train[index]), dataset.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def _evaluate(key: str, label: str, model: nn.Module, dataset: SplitDataset) -> Evaluation:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x in torch.split(dataset.x_test, STATISTICS_BATCH)])
    labels = dataset.y_test
    accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    return Evaluation(key, label, model, float(F.cross_entropy(logits, labels)), accuracy)


def _write_files(result: DemoResult, out_dir: Path) -> DemoResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "model.pt"
    torch.save(result.trained.model.state_dict(), checkpoint)
    shift_png = result.shift.plot(out_dir / "variance_shift.png")
    accuracy_png = _plot_accuracy(result, out_dir / "accuracy.png")
    return dataclasses.replace(result, files=(shift_png, accuracy_png, checkpoint))


def _plot_accuracy(result: DemoResult, path: Path) -> Path:
    """A bar per evaluation: test accuracy, its value written on the bar."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the demo's figures need matplotlib: pip install 'varshift[plot]'"
        ) from None

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, never pyplot: the caller's backend and figures stay as they are
    axis = figure.subplots()
    labels = [e.label.replace(" (", "\n(") for e in result.evaluations]
    values = [e.accuracy for e in result.evaluations]
    bars = axis.bar(labels, values, color=["tab:grey", "tab:green", "tab:orange"])
    axis.bar_label(bars, labels=[f"{v:.3f}" for v in values])
    axis.set_ylim(0.0, 1.05)
    axis.set_ylabel("test accuracy")
    axis.tick_params(axis="x", labelsize="small")
    axis.set_title(
        f"{result.dataset.name}: dropout (p={result.p:g}) before BatchNorm, "
        f"{len(result.dataset.x_test)} test samples"
    )
    figure.savefig(path)
    return path
