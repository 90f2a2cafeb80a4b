"""The demo zoo: small models of several families trained on the synthetic motion dataset.

Nothing can download Kinetics weights on an offline machine, so leaps ships its own trained
models (registry entries ``demo.*``, built through their real adapters at reduced width and
depth) together with a few stimulus videos per class. ``leaps train-demo`` retrains them,
reproducibly from a seed, and writes into the zoo folder (``leaps/zoo`` by default):

    <model>.safetensors   the network's state dict (the adapter's plain-state-dict format)
    <model>.json          the training record: recipe, seed, validation accuracy per class,
                          seconds, library versions, sha256 of the weights
    stimuli/<class>_<i>.mp4   clips of each class from a held-out seed, encoded as real videos

Training data is drawn fresh every epoch (seed, epoch), so the models see new clips each time
and cannot memorise; validation clips come from a seed no epoch uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor, nn

from leaps.adapter import VideoClassifier
from leaps.datasets import make_clip, make_dataset
from leaps.errors import LeapsError

ZOO = Path(str(resources.files("leaps") / "zoo"))
STIMULI_PER_CLASS = 8
# Seeds of make_dataset/make_clip that training epochs never use.
VALIDATION_SEED = 900_001
STIMULUS_SEED = 900_002


@dataclass
class TrainRecipe:
    """How a demo model is trained (the same for every family)."""

    epochs: int = 40                 # at most; training stops once `stop_at` is reached
    clips_per_class: int = 96        # fresh clips per class and epoch
    batch_size: int = 32
    lr: float = 3e-3                 # AdamW, one-cycle (warm-up then cosine decay)
    weight_decay: float = 1e-4
    validation_clips_per_class: int = 64
    stop_at: float = 0.98            # validation accuracy after which training stops
    seed: int = 0
    warmup: float = 0.15             # fraction of the one-cycle schedule spent warming up
    clip_grad: float | None = None   # clip the gradients' global norm to this (None: never)


def demo_models() -> list[str]:
    """The registry's demo zoo entries."""
    from leaps.registry import load_registry

    return [name for name in load_registry().models if name.startswith("demo.")]


def untrained(model: str) -> VideoClassifier:
    """A demo entry built with random weights (never its shipped ones)."""
    from leaps.plugins import get_host
    from leaps.registry import load_registry

    spec = load_registry().get(model)
    return get_host().adapter(spec.adapter)().build(spec, None)


@torch.no_grad()
def accuracy_per_class(model: nn.Module, videos: Tensor, labels: Tensor, classes: int,
                       batch_size: int = 64) -> list[float]:
    """Top-1 accuracy of ``model`` for each class (eval mode)."""
    model.eval()
    predicted = torch.cat([model(chunk).argmax(dim=1) for chunk in videos.split(batch_size)])
    return [float((predicted[labels == c] == c).float().mean()) for c in range(classes)]


def train_epoch(model: nn.Module, videos: Tensor, labels: Tensor,
                optimizer: torch.optim.Optimizer, batch_size: int = 32,
                generator: torch.Generator | None = None,
                schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                clip_grad: float | None = None) -> Tensor:
    """One epoch of cross-entropy over shuffled batches (train mode); the mean loss, on device.

    ``generator`` shuffles (default: torch's global one); ``schedule`` steps after each batch;
    ``clip_grad`` clips the gradients' global norm before each step."""
    model.train()
    losses = []
    for batch in torch.randperm(len(videos), generator=generator).split(batch_size):
        loss = nn.functional.cross_entropy(model(videos[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def fit(model: nn.Module, videos: Tensor, labels: Tensor, epochs: int, lr: float = 3e-3,
        batch_size: int = 32) -> nn.Module:
    """Train ``model`` on fixed clips with AdamW for ``epochs`` epochs; return it in eval mode
    (the quick training tests and benchmarks give small models)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        train_epoch(model, videos, labels, optimizer, batch_size)
    return model.eval()


def train(model: str, recipe: TrainRecipe,
          on_epoch: Callable[[int, float, float], None] | None = None
          ) -> tuple[VideoClassifier, dict[str, Any]]:
    """Train demo entry ``model`` from scratch; returns it (eval mode) and its training record.

    ``on_epoch(epoch, mean training loss, validation accuracy)`` reports progress."""
    torch.manual_seed(recipe.seed)
    classifier = untrained(model)
    spec = classifier.spec
    classes = classifier.labels
    validation = make_dataset(recipe.validation_clips_per_class, spec.frames, spec.size,
                              VALIDATION_SEED, classes)
    steps_per_epoch = -(-recipe.clips_per_class * len(classes) // recipe.batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch,
        pct_start=recipe.warmup)
    order = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    per_class: list[float] = []
    for epoch in range(recipe.epochs):
        videos, labels, _ = make_dataset(recipe.clips_per_class, spec.frames, spec.size,
                                         recipe.seed * 1000 + epoch, classes)
        loss = train_epoch(classifier, videos, labels, optimizer, recipe.batch_size, order,
                           schedule, recipe.clip_grad)
        per_class = accuracy_per_class(classifier, validation[0], validation[1], len(classes))
        accuracy = sum(per_class) / len(per_class)
        if on_epoch is not None:
            on_epoch(epoch + 1, float(loss), accuracy)
        if accuracy >= recipe.stop_at:
            break
    classifier.eval()
    record = {
        "model": model, "recipe": asdict(recipe), "epochs_trained": epoch + 1,
        "validation": {"clips_per_class": recipe.validation_clips_per_class,
                       "seed": VALIDATION_SEED,
                       "accuracy": sum(per_class) / len(per_class),
                       "accuracy_per_class": dict(zip(classes, per_class))},
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }
    return classifier, record


def save(classifier: VideoClassifier, record: dict[str, Any], folder: Path) -> Path:
    """Write ``<model>.safetensors`` and ``<model>.json`` into ``folder`` (atomically)."""
    from safetensors.torch import save_file

    from leaps.adapter import sha256_file
    from leaps.runs import library_versions, write_json
    from leaps.video import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{record['model']}.safetensors"
    state = {k: v.detach().contiguous() for k, v in classifier.net.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
        tmp.chmod(0o644)  # safetensors creates owner-only files; this one is package data
    record = {**record, "weights": weights.name, "sha256": sha256_file(weights),
              "versions": library_versions(["pytorchvideo"])}
    write_json(folder / f"{record['model']}.json", record)
    return weights


def write_stimuli(folder: Path, classes: Sequence[str], frames: int, size: int,
                  per_class: int = STIMULI_PER_CLASS) -> list[Path]:
    """Held-out clips of each class as MP4 files ``<class>_<i>.mp4``."""
    from leaps.video import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    return [write_mp4(make_clip(name, frames, size, STIMULUS_SEED, i).video,
                      folder / f"{name}_{i}.mp4")
            for name in classes for i in range(per_class)]


@click.command("train-demo")
@click.option("--model", "models", multiple=True,
              help="Demo entry to train (repeatable) [default: every demo.* entry].")
@click.option("--out", type=click.Path(file_okay=False), default=str(ZOO), show_default=True,
              help="Zoo folder to write weights, records and stimuli into.")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainRecipe.epochs,
              show_default=True, help="At most this many epochs.")
@click.option("--stop-at", type=click.FloatRange(0, 1), default=TrainRecipe.stop_at,
              show_default=True, help="Stop once the validation accuracy reaches this.")
@click.option("--clips-per-class", type=click.IntRange(min=1),
              default=TrainRecipe.clips_per_class, show_default=True,
              help="Fresh training clips per class and epoch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainRecipe.lr,
              show_default=True, help="Peak learning rate (the training record keeps it).")
@click.option("--warmup", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=TrainRecipe.warmup, show_default=True,
              help="Fraction of the one-cycle learning-rate schedule spent warming up.")
@click.option("--clip-grad", type=click.FloatRange(min=0, min_open=True),
              default=TrainRecipe.clip_grad,
              help="Clip the gradients' global norm to this before each step [default: no "
                   "clipping].")
@click.option("--seed", type=int, default=TrainRecipe.seed, show_default=True)
@click.option("--stimuli/--no-stimuli", default=True, show_default=True,
              help="Also write the stimulus videos.")
def train_demo(models: tuple[str, ...], out: str, epochs: int, stop_at: float,
               clips_per_class: int, lr: float, warmup: float, clip_grad: float | None, seed: int,
               stimuli: bool) -> None:
    """Train the demo zoo on the synthetic motion dataset (reproducible from --seed)."""
    known = demo_models()
    chosen = list(models) or known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise LeapsError(f"not a demo model: {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")
    recipe = TrainRecipe(epochs=epochs, clips_per_class=clips_per_class, lr=lr, stop_at=stop_at,
                         seed=seed, warmup=warmup, clip_grad=clip_grad)
    folder = Path(out)
    for name in chosen:
        def report(epoch: int, loss: float, accuracy: float, name: str = name) -> None:
            click.echo(f"{name} epoch {epoch}/{epochs}: loss {loss:.3f}, "
                       f"validation accuracy {accuracy:.1%}")

        classifier, record = train(name, recipe, report)
        weights = save(classifier, record, folder)
        click.echo(f"{weights} ({record['parameters']:,} parameters, validation accuracy "
                   f"{record['validation']['accuracy']:.1%}, {record['seconds']} s)")
    if stimuli:
        example = untrained(chosen[0])
        paths = write_stimuli(folder / "stimuli", example.labels, example.spec.frames,
                              example.spec.size)
        click.echo(f"{len(paths)} stimulus videos in {folder / 'stimuli'}")

