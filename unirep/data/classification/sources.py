"""Data sources: where a run's domains come from, by name (``data.source``).

A source resolves a data root (generating it first for synthetic sources), lists its domains and
builds each domain's dataset per split with the Decathlon preprocessing. Every source returns
samples as ``{"image": [3, crop, crop], "label": int, "image_id": int}``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from unirep.config.schema import ClassificationConfig, DataConfig
from unirep.data.classification.decathlon import SPLITS, DecathlonDomain
from unirep.data.classification.mini_decathlon import ensure_mini_decathlon
from unirep.data.classification.stats import domain_mean_std
from unirep.data.classification.transforms import build_transform
from unirep.data.memory import MemoryCache, memory_cache
from unirep.errors import DataError, DataRootError
from unirep.io import file_sha256
from unirep.registry import Registry

if TYPE_CHECKING:  # `datasets` is imported only by runs that read a Hugging Face domain
    from unirep.data.classification.hf import HFDomain

DATA_SOURCES: Registry[Any] = Registry("data source")

LAYOUT = "<root>/annotations/<domain>_{train,val,test}.json and <root>/data/<domain>/<split>/*.jpg"


@dataclass
class DomainSet:
    """The domains of a run and how to read them."""

    root: Path
    domains: list[str]
    data: DataConfig
    spec: ClassificationConfig
    cache_dir: Path
    _stats: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    # read once per (domain, split), untransformed: reading an annotation file (1.2 M entries
    # for ImageNet) is not free, nor is the decoding pass of on_corrupt=skip
    _raw: dict[tuple[str, str], DecathlonDomain | HFDomain] = field(default_factory=dict)
    _datasets: dict[tuple[str, str, bool], Any] = field(default_factory=dict)
    # {domain: preprocessing} recorded by an exported model, used instead of the config's
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)
    # decoded training-resolution images (data.memory_cache_mib), shared by the splits
    memory: MemoryCache | None = None

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = memory_cache(self.data.memory_cache_mib)

    def mean_std(self, domain: str) -> tuple[list[float], list[float]]:
        """Per-domain normalisation (reference figures, or computed once from train and cached)."""
        if domain not in self._stats:
            path = (
                self.spec.hf_domains[domain].path if domain in self.spec.hf_domains else self.root
            )
            train = self.raw(domain, "train")
            self._stats[domain] = domain_mean_std(path, domain, self.cache_dir, train_set=train)
        return self._stats[domain]

    def raw(self, domain: str, split: str) -> DecathlonDomain | HFDomain:
        """Domain ``domain``'s ``split`` without a transform (PIL images), read once."""
        key = (domain, split)
        if key not in self._raw:
            if domain in self.spec.hf_domains:
                self._raw[key] = self._hf(domain, split, transform=None)
            else:
                self._raw[key] = DecathlonDomain(
                    self.root,
                    domain,
                    split,
                    on_corrupt=self.data.on_corrupt,
                    scan_cache_dir=self.cache_dir,
                )
                self._raw[key].memory = self.memory
        return self._raw[key]

    def check(self) -> None:
        """Check every split of every domain up front, cheaply (see the readers' ``check``): the
        annotation files are consistent, every split is non-empty, every listed image exists,
        and image ids are unique within each split of every domain and over the domains (they
        key the submission). With ``data.on_corrupt=skip`` each image is also decoded once and
        the undecodable ones are left out (:meth:`skipped`).

        Raises:
            DataError, DataRootError: naming the file (or dataset) and what is wrong.
        """
        for domain in self.domains:  # a domain with one class makes accuracy meaningless
            labels = {label for label in self.raw(domain, "train").labels if label >= 0}
            if len(labels) < 2:
                raise DataError(
                    f"domain {domain!r} ({self.source_of(domain, 'train')}): its training split "
                    f"has {len(labels)} class{'es' if len(labels) != 1 else ''}; a classification "
                    "domain needs at least 2 (leave it out with classification.domains)"
                )
        for split in SPLITS:
            owner: dict[int, str] = {}
            for domain in self.domains:
                raw = self.raw(domain, split)
                raw.check()
                for image_id in raw.image_ids:
                    other = owner.setdefault(image_id, domain)
                    if other != domain:
                        raise DataError(
                            f"image id {image_id} of split {split!r} is used by domains "
                            f"{other!r} ({self.source_of(other, split)}) and {domain!r} "
                            f"({self.source_of(domain, split)}); ids must be unique over the "
                            "domains of a run (they key the submission)"
                        )

    def source_of(self, domain: str, split: str) -> str:
        """The file or dataset ``split`` of ``domain`` is read from, for messages."""
        raw = self.raw(domain, split)
        if isinstance(raw, DecathlonDomain):
            return str(raw.annotation_file)
        return f"split {raw.split!r} of dataset {raw.name_or_path!r}"

    def skipped(self) -> list[dict[str, str]]:
        """Images left out as undecodable (``data.on_corrupt=skip``), over every domain and split
        read so far: ``{"path", "split", "stream", "reason"}``."""
        entries = [
            {"path": e["path"], "split": split, "stream": domain, "reason": e["reason"]}
            for (domain, split), raw in self._raw.items()
            for e in raw.skipped
        ]
        order = {d: i for i, d in enumerate(self.domains)}
        return sorted(
            entries,
            key=lambda e: (order.get(e["stream"], -1), SPLITS.index(e["split"]), e["path"]),
        )

    def _hf(self, domain: str, split: str, transform: Any) -> HFDomain:
        from unirep.data.classification.hf import HFDomain, global_id_offset

        spec = self.spec.hf_domains[domain]
        if split not in spec.splits:
            raise DataRootError(
                f"config key 'classification.hf_domains.{domain}.splits' has no {split!r} entry "
                f"(it maps unirep's train/val/test to the dataset's split names)"
            )
        return HFDomain(
            spec.path,
            spec.splits[split],
            train_split=spec.splits.get("train"),
            image_column=spec.image_column,
            label_column=spec.label_column,
            transform=transform,
            config_name=spec.config_name,
            cache_dir=self.cache_dir / "hf",
            id_column=spec.id_column,
            id_offset=global_id_offset(domain, split),
            on_corrupt=self.data.on_corrupt,
            scan_cache_dir=self.cache_dir,
        )

    def fingerprint(self, domain: str) -> str:
        """Identifies the training data a teacher saw (annotation file or dataset fingerprint)."""
        if domain in self.spec.hf_domains:
            train: Any = self.raw(domain, "train")  # an HFDomain
            text = (
                f"{self.spec.hf_domains[domain].path}|{train.split}|{train.hf_dataset._fingerprint}"
            )
            return hashlib.sha256(text.encode()).hexdigest()
        return file_sha256(self.root / "annotations" / f"{domain}_train.json")

    def preprocessing(self, domain: str) -> dict[str, Any]:
        """What an exported model needs to preprocess this domain's images at test time (the
        recorded one, for a domain :attr:`recorded` names)."""
        if domain in self.recorded:
            return self.recorded[domain]
        mean, std = self.mean_std(domain)
        return {
            "resize": self.spec.resize,
            "crop": self.crop(domain),
            "square_resize": domain in self.spec.square_resize,
            "mean": mean,
            "std": std,
        }

    def dataset(self, domain: str, split: str, train: bool = False) -> DecathlonDomain | HFDomain:
        """Domain ``domain``'s ``split``; ``train`` turns on random crops and flips.

        Built once per (domain, split, train) and shared by every phase of the run.
        """
        key = (domain, split, train)
        if key not in self._datasets:
            self._datasets[key] = self._build_dataset(domain, split, train)
        return self._datasets[key]

    def _build_dataset(self, domain: str, split: str, train: bool) -> DecathlonDomain | HFDomain:
        pre = self.preprocessing(domain)
        transform = build_transform(
            train=train,
            resize=pre["resize"],
            crop=pre["crop"],
            mean=pre["mean"],
            std=pre["std"],
            flip=domain not in self.spec.no_flip,
            square_resize=pre["square_resize"],
        )
        return self.raw(domain, split).with_transform(transform)

    def datasets(self, split: str, train: bool = False) -> dict[str, Dataset]:
        """Every domain's ``split``, in domain order."""
        return {d: self.dataset(d, split, train) for d in self.domains}

    def forget_datasets(self) -> None:
        """Drop the transformed datasets built so far (the untransformed reads are kept)."""
        self._datasets.clear()

    def crop(self, domain: str) -> int:
        """The domain's crop size (``classification.crops.<domain>``, else
        ``classification.crop``)."""
        return self.spec.crops.get(domain, self.spec.crop)

    def batch_size(self, domain: str) -> int:
        return self.spec.batch_sizes.get(domain, self.data.batch_size)


def _domains_in(root: Path) -> list[str]:
    annotations = root / "annotations"
    if not annotations.is_dir():
        raise DataRootError(
            f"data root {str(root)!r} has no annotations/ folder; expected {LAYOUT}"
        )
    found = sorted(p.name[: -len("_train.json")] for p in annotations.glob("*_train.json"))
    if not found:
        raise DataRootError(f"no <domain>_train.json in {str(annotations)!r}; expected {LAYOUT}")
    return found


def _select(available: list[str], wanted: list[str], where: str) -> list[str]:
    if not wanted:
        return available
    missing = [d for d in wanted if d not in available]
    if missing:
        raise DataRootError(
            f"domain(s) {missing} not found in {where}; available: {', '.join(available)}"
        )
    return list(wanted)


@DATA_SOURCES.register("decathlon")
def decathlon_source(data: DataConfig, spec: ClassificationConfig, cache_dir: Path) -> DomainSet:
    """An existing Visual Decathlon tree (``decathlon-1.0/``) at ``data.root``."""
    if not data.root:
        raise DataRootError(
            "data.root is not set: point it at the decathlon-1.0 folder "
            f"(data.root=/path/to/decathlon-1.0), which must hold {LAYOUT}"
        )
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DataRootError(f"data root {str(root)!r} does not exist; expected {LAYOUT}")
    where = f"{str(root)!r} (annotations/<domain>_train.json)"
    return DomainSet(root, _with_hf(_domains_in(root), spec, where), data, spec, cache_dir)


def _with_hf(available: list[str], spec: ClassificationConfig, where: str) -> list[str]:
    """The run's domains: those of the tree plus ``classification.hf_domains``, filtered by
    ``classification.domains``."""
    clash = sorted(set(available) & set(spec.hf_domains))
    if clash:
        raise DataRootError(
            f"classification.hf_domains {clash} have the names of domains already under {where}; "
            "rename them"
        )
    everything = available + list(spec.hf_domains)
    return _select(everything, spec.domains, f"{where} or classification.hf_domains")


@DATA_SOURCES.register("hf")
def hf_source(data: DataConfig, spec: ClassificationConfig, cache_dir: Path) -> DomainSet:
    """Only Hugging Face ``datasets`` domains (``classification.hf_domains``), no Decathlon
    tree."""
    if not spec.hf_domains:
        raise DataRootError(
            "data.source=hf needs classification.hf_domains, e.g. "
            'classification.hf_domains="{pets: {path: /data/pets, splits: {train: train, '
            'val: val, test: test}}}"'
        )
    domains = _with_hf([], spec, "data.source=hf (no Decathlon tree)")
    return DomainSet(cache_dir, domains, data, spec, cache_dir)


def synthetic_root(data: DataConfig, cache_dir: Path) -> Path:
    """Where the embedded benchmark with these generator settings lives."""
    if data.root:
        return Path(data.root).expanduser()
    g = {"seed": 0, "image_size": 32, "scale": 1.0, **data.generator}
    return cache_dir / f"mini-decathlon-seed{g['seed']}-px{g['image_size']}-x{g['scale']}"


@DATA_SOURCES.register("synthetic-decathlon")
def synthetic_decathlon_source(
    data: DataConfig, spec: ClassificationConfig, cache_dir: Path
) -> DomainSet:
    """The embedded mini-decathlon, generated deterministically on first use (no download)."""
    root = synthetic_root(data, cache_dir)
    ensure_mini_decathlon(root, **data.generator)
    where = f"{str(root)!r} (annotations/<domain>_train.json)"
    return DomainSet(root, _with_hf(_domains_in(root), spec, where), data, spec, cache_dir)


def build_domains(data: DataConfig, spec: ClassificationConfig, cache_dir: Path) -> DomainSet:
    """Resolve ``data.source`` into the run's :class:`DomainSet`."""
    return DATA_SOURCES.build(data.source, data=data, spec=spec, cache_dir=cache_dir)
