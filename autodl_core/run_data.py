"""The data a run has read: training examples (read in chunks, as time allows), the held-out
validation split, the test set (read across calls when a deadline comes first), and their
copies on the device.

Images are kept as uint8 at one storage shape chosen from a first peek (sizes, channels, value
range), so that memory stays bounded whatever the raw data looks like.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from autodl_core import readers
from autodl_core.config import PipelineConfig
from autodl_core.device_plan import DevicePlan
from autodl_core.images import Preprocessor
from autodl_core.memory import MemoryBudget, release_freed_memory
from autodl_core.planner import PEEK_SECONDS, TimePlanner, in_seconds, seconds_since
from autodl_core.profile import DataProfile, choose_storage_shape

log = logging.getLogger("autodl_core.run_data")

REREAD_CHUNK = 1024  # examples per chunk when the images are read again at the large size


class RunData:
    def __init__(self, metadata, config: PipelineConfig, device: torch.device, planner: TimePlanner,
                 mean, std, plan: DevicePlan, memory: MemoryBudget | None = None):
        self.metadata, self.config, self.device, self.planner = metadata, config, device, planner
        # The stored images share the memory cap with what the solver already holds (its backbones with
        # their engines): they are bounded by what the cap leaves when the data is first seen.
        self.memory = memory
        self.mean, self.std = mean, std
        self.plan = plan
        self.n_classes = int(metadata.get_output_size())
        self.profile: DataProfile | None = None
        self.preprocess: Preprocessor | None = None
        self.train_reader = None
        self.train_x = self.train_y = None
        self._train_buffer = None  # what train_x is a view of: room for the whole training set
        self.test_x = None
        self.is_val = None
        self.n_test = None  # known once the test set is read (or counted after a failure)
        self.on_device = {}  # "train"/"test": the uint8 arrays mirrored on the GPU (plan.images_on_device)
        self._test_reader, self._test_parts = None, []  # the test set, read over several calls if need be
        self.large_storage_hw = None  # where the any-time steps want the images: read again at this size
        self._datasets = {}  # "train"/"test": the datasets as handed over (read again at the large size)
        self._reread = None  # the reading again at large_storage_hw under way: {split: (reader, parts)}

    # ------------------------------------------------------------------ training data
    def open_train(self, dataset, read_train: bool = True):
        peek = readers.peek(dataset, deadline=in_seconds(PEEK_SECONDS))
        self.profile = DataProfile.from_metadata_and_peek(self.metadata, peek)
        images_gb = self.images_memory_gb()
        self._datasets["train"] = dataset
        if self.config.uses_steps(self.device.type):
            # The any-time steps may look at the images up to max_step_side on the shorter side (a 4:3
            # photo's longer side 4/3 of it), within the memory cap: read again at that size when a step
            # needs it. The first stages read at the small size: images stored at 384 px were read 3x
            # slower and put the first predictions off by seconds (Oxford flowers: -0.019 ALC).
            max_side = int(round(self.config.max_step_side * 4 / 3))
            self.large_storage_hw = choose_storage_shape(self.profile, max_side, images_gb, shrink_to_fit=True)
        self.profile.storage_hw = choose_storage_shape(self.profile, self.config.max_resolution, images_gb)
        self.value_offset, self.value_scale = readers.value_transform(peek.value_min, peek.value_max)
        self.preprocess = Preprocessor(self.mean, self.std, pixel_max=255.0, device=self.device)
        if read_train:
            self.train_reader = readers.ChunkReader(dataset, self.profile.storage_hw, self.value_offset,
                                                     self.value_scale, batch_size=self.read_batch())
        log.info("profile: %s", self.profile)

    def images_memory_gb(self) -> float:
        """The memory the stored images may take: what the cap leaves beside what the solver holds (never
        below a tenth of the cap: choose_storage_shape's floors keep a usable set even then)."""
        cap = self.config.memory_cap_gb
        return cap if self.memory is None else max(0.1 * cap, self.memory.left_gb())

    def read_batch(self) -> int:
        """Examples per read batch: 64 for images up to 256 x 256, fewer for larger ones, so that a batch
        (decoded before the deadline is checked again) stays short: 64 photos of 2,000 px take ~3.5 s
        to decode on a slow CPU, one takes ~55 ms."""
        h, w = self.profile.median_hw
        return int(np.clip(64 * (256 * 256) / max(1, h * w), 1, 64))

    @property
    def n_read(self) -> int:
        return 0 if self.train_x is None else len(self.train_x)

    def reading_done(self) -> bool:
        return self.train_reader.exhausted or self.n_read >= self.profile.max_cached_examples

    def read_more_train(self, deadline: float, max_examples: int | None = None) -> int:
        if self.train_reader.exhausted:
            return 0
        cap = self.profile.max_cached_examples
        have = self.n_read
        if have >= cap:
            return 0
        limit = cap - have if max_examples is None else min(max_examples, cap - have)
        started = time.monotonic()
        chunk = self.train_reader.read(max_examples=limit, deadline=deadline)
        if chunk is None:
            return 0
        x, y = chunk
        self.planner.note_read(len(x), seconds_since(started))
        self.train_x = self._append_train_images(x)
        self.train_y = y if self.train_y is None else np.concatenate([self.train_y, y])
        if self.plan.images_on_device:
            self._mirror_on_device("train", x)
        self.is_val = self.val_mask(len(self.train_x))
        self.profile.update_labels(self.train_y)
        self.profile.pixel_max = max(self.profile.pixel_max, float(x.max()) if len(x) else 0.0)
        return len(x)

    def _append_train_images(self, x: np.ndarray) -> np.ndarray:
        """The stored training images with chunk `x` after them, in one buffer sized for the whole set
        (grown by doubling where the set is larger than declared): appending by concatenation copied
        every image read so far at each chunk and held two copies at once at the end (0.7 GB for blood
        cells' 9,957 images at 96 x 128)."""
        have = self.n_read
        buffer = self._train_buffer
        if buffer is None or have + len(x) > len(buffer):
            declared = min(max(0, int(self.profile.n_train or 0)), int(self.profile.max_cached_examples or 0))
            capacity = max(have + len(x), declared, 2 * len(buffer) if buffer is not None else 0)
            grown = np.empty((capacity,) + x.shape[1:], x.dtype)
            if have:
                grown[:have] = self.train_x
            self._train_buffer = buffer = grown
        buffer[have:have + len(x)] = x
        return buffer[:have + len(x)]

    def read_all_train(self, deadline: float) -> bool:
        """Read what is left (5 s at a time); False when the deadline comes within 10 s."""
        while not self.reading_done():
            if self.read_more_train(self.planner.read_chunk_deadline(deadline)) == 0:
                break
            if self.planner.read_all_must_stop(deadline):
                return False
        return True

    def all_classes_seen(self) -> bool:
        """Single-label: every class has an example (the label prior kept by the profile as data is read).
        Multi-label data is not asked (rare labels may never show)."""
        if self.train_x is None or self.profile.multilabel or self.profile.class_prior is None:
            return True
        return bool((self.profile.class_prior > 0).all())

    def set_val_mask(self, mask: np.ndarray):
        """A validation split chosen otherwise (autodl_core/validation.py), for the examples read so far;
        examples read later go to training."""
        self._val_override = np.asarray(mask, bool).copy()
        self.is_val = self.val_mask(self.n_read)

    def val_mask(self, n: int) -> np.ndarray:
        """Held-out examples chosen by a fixed hash of the read position: stable as more data arrives."""
        override = getattr(self, "_val_override", None)
        if override is not None:
            return np.concatenate([override[:n], np.zeros(max(0, n - len(override)), bool)])
        return random_val_mask(n, self.config.val_fraction, self.config.val_max)

    def val_labels(self) -> np.ndarray:
        return self.train_y[np.flatnonzero(self.is_val)]

    # ------------------------------------------------------------------ device copies
    def _mirror_on_device(self, name: str, new: np.ndarray):
        """Append newly read uint8 examples to the device copy (the GPU then never waits on host copies)."""
        chunk = torch.from_numpy(np.ascontiguousarray(new)).to(self.device)
        have = self.on_device.get(name)
        self.on_device[name] = chunk if have is None else torch.cat([have, chunk])

    def images(self, name: str):
        """The uint8 arrays the networks read: the device copy where there is one, else numpy."""
        if name in self.on_device:
            return self.on_device[name]
        return self.train_x if name == "train" else self.test_x

    # ------------------------------------------------------------------ test data
    @property
    def n_test_read(self) -> int:
        return len(self.test_x) if self.test_x is not None else 0

    def read_test(self, dataset, deadline: float):
        """Read the test set; when the deadline comes first (a short budget, large images, a busy CPU),
        stop and go on at the next call: this call then returns prior predictions, whose row count the
        metadata declares. Without a declared count the read goes on (the rows must be right)."""
        if self.profile is None:  # test before train: cannot happen with the kit, but be safe
            self.open_train(dataset, read_train=False)
        self._datasets["test"] = dataset
        if self._test_reader is None:
            self._test_reader = readers.ChunkReader(dataset, self.profile.storage_hw, self.value_offset,
                                                    self.value_scale, batch_size=self.read_batch())
        declared = readers.declared_test_count(self.metadata)
        can_stop = declared is not None
        reader, parts = self._test_reader, self._test_parts
        while not reader.exhausted and not (can_stop and sum(len(p) for p in parts) >= declared):
            chunk = reader.read(max_examples=4096, deadline=deadline if can_stop else None)
            if chunk is None:
                break
            parts.append(chunk[0])
            complete = reader.exhausted or (can_stop and sum(len(p) for p in parts) >= declared)
            if can_stop and time.monotonic() >= deadline and not complete:
                self.n_test = declared
                log.info("test set: %d examples read when the deadline came; reading goes on next call",
                         sum(len(p) for p in parts))
                return
        xs = parts
        self._test_reader, self._test_parts = None, []
        self.test_x = np.concatenate(xs) if xs else np.zeros((0,) + tuple(self.profile.storage_hw) + (1,), np.uint8)
        if self.plan.images_on_device:
            self._mirror_on_device("test", self.test_x)
        log.info("read %d test examples", len(self.test_x))

    # ------------------------------------------------------------------ the large size of the steps
    def step_storage_hw(self) -> tuple[int, int]:
        """The storage shape the any-time steps plan their sizes on: the large one, until reading at it failed."""
        return tuple(self.large_storage_hw if self.large_storage_hw is not None else self.profile.storage_hw)

    def reread_needed(self, size) -> bool:
        """Whether a working size looks at more than the stored images hold and the large size holds more."""
        large = self.large_storage_hw
        if large is None or tuple(large) == tuple(self.profile.storage_hw):
            return False
        return min(size) > min(self.profile.storage_hw)

    def reread_at_large_size(self, deadline: float) -> bool:
        """Read the training examples read so far and the test set again at `large_storage_hw`, in chunks until
        the deadline (resumed at the next call); once both are read, they replace the stored ones: True.
        The same order is checked by the labels; a mismatch (a dataset that reads differently twice) keeps
        the small size for good (False, and no further try)."""
        if not self.reread_needed((10 ** 6, 10 ** 6)):
            return True
        if self._reread is None:
            self._reread = {split: (readers.ChunkReader(self._datasets[split], self.large_storage_hw, self.value_offset,
                                                        self.value_scale, batch_size=self.read_batch()), [], [])
                            for split in ("train", "test") if split in self._datasets}
            log.info("reading the data again at %s for the steps", self.large_storage_hw)
        started = time.monotonic()
        targets = {"train": self.n_read, "test": self.n_test_read}
        for split, (reader, parts, labels) in self._reread.items():
            while sum(len(p) for p in parts) < targets[split] and not reader.exhausted:
                if time.monotonic() >= deadline:
                    return False
                chunk = reader.read(max_examples=min(REREAD_CHUNK, targets[split] - sum(len(p) for p in parts)),
                                    deadline=deadline)
                if chunk is None:
                    break
                parts.append(chunk[0])
                labels.append(chunk[1])
        train = _join_releasing(self._reread["train"][1], self.n_read)
        train_y = np.concatenate(self._reread["train"][2])[:self.n_read]
        test = _join_releasing(self._reread["test"][1], self.n_test_read) if "test" in self._reread else None
        if len(train) != self.n_read or not np.allclose(train_y, self.train_y) or (
                test is not None and len(test) != self.n_test_read):
            log.warning("reading again at %s gave other examples: the steps stay at %s", self.large_storage_hw,
                        self.profile.storage_hw)
            self.large_storage_hw, self._reread = None, None
            return False
        self.train_x, self._train_buffer = train, None
        if test is not None:
            self.test_x = test
        self.profile.storage_hw = tuple(self.large_storage_hw)
        self._reread = None
        release_freed_memory()  # the stored copy and the reading's scratch (0.2-0.3 GB on blood cells), handed back
        log.info("read again at %s in %.1fs", self.profile.storage_hw, time.monotonic() - started)
        return True

    def count_test(self, dataset) -> int:
        declared = readers.declared_test_count(self.metadata)
        if declared is not None:
            return declared
        try:
            return readers.count_examples(dataset)
        except Exception:
            log.exception("could not count the test examples")
            return 0

    def prior_predictions(self) -> np.ndarray:
        """The training label frequencies (uniform before any label is read), one row per test example."""
        n_test = len(self.test_x) if self.test_x is not None else (self.n_test or 0)
        if self.train_y is not None and len(self.train_y):
            prior = self.train_y.mean(0)
        else:
            prior = np.full(self.n_classes, 1.0 / max(1, self.n_classes))
        return np.tile(prior, (n_test, 1)).astype(np.float64)

    def sanitize(self, probs) -> np.ndarray:
        """Finite values in [0, 1] of the shape the kit expects, or a ValueError."""
        probs = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        probs = np.clip(probs, 0.0, 1.0)
        n_test = len(self.test_x) if self.test_x is not None else len(probs)
        if probs.shape != (n_test, self.n_classes):
            raise ValueError(f"predictions of shape {probs.shape}, expected {(n_test, self.n_classes)}")
        return probs


def random_val_mask(n: int, fraction: float, most: int) -> np.ndarray:
    """The random validation split of the first n examples read: a fixed hash of the read position (so
    it only grows as more is read), `fraction` of them, at most `most`; none under 100 examples."""
    positions = np.arange(n)
    chosen = (positions * 2654435761 % 1000) < fraction * 1000
    if n < 100:
        chosen[:] = False
    chosen &= np.cumsum(chosen) <= most
    return chosen


def _join_releasing(parts: list, limit: int) -> np.ndarray:
    """The chunks in `parts` as one array of at most `limit` rows, each chunk released once copied (the list is
    emptied): np.concatenate keeps every chunk until it returns, a second copy of the images read again
    (trashnet's 2,527 photos at 344 x 256 px: 0.67 GB more at the peak)."""
    if not parts:
        return np.zeros((0,), np.uint8)
    out = np.empty((min(limit, sum(len(p) for p in parts)),) + parts[0].shape[1:], parts[0].dtype)
    filled = 0
    while parts and filled < len(out):
        chunk = parts.pop(0)
        take = min(len(chunk), len(out) - filled)
        out[filled:filled + take] = chunk[:take]
        filled += take
    parts.clear()
    return out
