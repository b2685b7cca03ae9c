"""The any-time steps: sizes from the data, the cost model, the validation split near-duplicates cannot
fool, the candidate pool across steps, threads from the load, and a whole run through the steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from autodl_core import threads as threads_module
from autodl_core.ensemble import Candidate, CandidatePool
from autodl_core.metrics import nauc
from autodl_core.planner import SideRate
from autodl_core.stages.steps import MAX_UPSAMPLE, step_sides
from autodl_core.threads import ThreadGovernor, threads_for
from autodl_core.validation import check_split, near_duplicate_components


def test_step_sides_follow_the_data_up_to_the_cap():
    assert step_sides((500, 375), 288)[-1] == 288  # photos: up to the cap
    assert step_sides((28, 28), 288)[-1] <= MAX_UPSAMPLE * 28  # small images: a bounded upsampling
    assert step_sides((8, 8), 288) == [64]  # tiny: at least the smallest side
    assert step_sides((100, 100), 160) == sorted(step_sides((100, 100), 160))


def test_side_rate_is_a_power_law_in_the_side_within_its_bounds():
    rate = SideRate([(96, 400.0), (160, 144.0)])  # exponent 2: cost per pixel
    assert rate.exponent == pytest.approx(2.0, abs=1e-6)
    assert rate.images_per_s(320) == pytest.approx(144.0 / 4, rel=1e-6)
    assert rate.images_per_s((160, 160)) == pytest.approx(144.0)
    flat = SideRate([(96, 400.0), (160, 390.0)])  # fixed costs at small sizes: not extrapolated as such
    assert flat.exponent == 1.5


def test_threads_follow_the_cores_other_processes_leave(monkeypatch):
    assert threads_for(2, 0.0) == 2 and threads_for(2, 0.3) == 2
    assert threads_for(2, 1.0) == 1 and threads_for(2, 2.0) == 1  # at least one
    assert threads_for(8, 2.6) == 5
    now = [0.0]
    busy = [(0.0, 0.0)]
    monkeypatch.setattr(threads_module, "_busy_seconds", lambda: busy[0])
    governor = ThreadGovernor(cpus=2, clock=lambda: now[0])
    governor.reading()

    def advance(others, own=1.0, seconds=2.0):
        now[0] += seconds
        machine, mine = busy[0]
        busy[0] = (machine + (others + own) * seconds, mine + own * seconds)
        return governor.update()

    assert advance(others=1.0) is None  # one reading: proposed, not applied
    assert advance(others=1.0) == 1 and governor.threads == 1  # two agree: one thread
    assert advance(others=0.0) is None and advance(others=0.0) == 2  # the neighbour left
    assert advance(others=1.0, seconds=0.1) is None  # too short a window to read


def _clustered_features(n_clusters, per_cluster, dim=32, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    features = np.repeat(centers, per_cluster, axis=0) + noise * rng.normal(size=(n_clusters * per_cluster, dim))
    return torch.tensor(features, dtype=torch.float32), np.repeat(np.arange(n_clusters), per_cluster)


def test_validation_is_grouped_when_test_examples_have_no_near_duplicates_in_training():
    """Frames of the same people: the test set holds other people, the random split does not."""
    features, person = _clustered_features(60, 10)
    order = np.random.default_rng(1).permutation(len(features))  # read order: shuffled
    features, person = features[order], person[order]
    labels = np.eye(3, dtype=np.float32)[person % 3]
    random_mask = (np.arange(len(features)) * 2654435761 % 1000) < 100
    test, _ = _clustered_features(20, 5, seed=7)  # other people
    mask, report = check_split(features, labels, random_mask, test, multilabel=False)
    assert mask is not None and report.grouped
    assert report.val_share > 0.9 and report.test_share < 0.1 and report.val_share_after == 0.0
    held_out = set(person[mask].tolist())
    assert not held_out & set(person[~mask].tolist())  # no person on both sides
    assert 0.5 * random_mask.sum() <= mask.sum() <= random_mask.sum() + 10


def test_validation_stays_random_when_the_test_set_shares_the_near_duplicates():
    """Augmented copies on both sides of the test split: the random split mirrors it."""
    features, person = _clustered_features(60, 10)
    labels = np.eye(3, dtype=np.float32)[person % 3]
    random_mask = (np.arange(len(features)) * 2654435761 % 1000) < 100
    test = features[::7] + 0.01
    mask, report = check_split(features, labels, random_mask, test, multilabel=False)
    assert mask is None and not report.grouped and report.test_share > 0.9


def test_a_cluster_holding_most_of_a_class_stays_on_the_training_side():
    features, person = _clustered_features(10, 20)
    labels = np.eye(10, dtype=np.float32)[person]  # each class is one person: never hold a whole class out
    random_mask = np.zeros(len(features), bool)
    random_mask[::10] = True
    mask, report = check_split(features, labels, random_mask, torch.randn(20, 32), multilabel=False)
    assert mask is None and "too few clusters" in report.reason


def test_near_duplicate_components_give_up_on_one_big_cluster():
    features = torch.ones(50, 8) + 1e-3 * torch.randn(50, 8)
    unit = features / features.norm(dim=1, keepdim=True)
    assert near_duplicate_components(unit, 0.9, max_pairs=100) is None
    components = near_duplicate_components(unit, 0.9)
    assert len(set(components.tolist())) == 1


def test_candidate_pool_keeps_each_steps_candidates_and_a_bounded_total():
    pool = CandidatePool(lambda y, p: 0.0, max_checkpoints=2)
    probs = np.zeros((3, 2))
    pool.add(Candidate("thumbnails", probs, None))
    pool.add(Candidate("probe", probs, None))
    pool.add(Candidate("probe:a@96x96", probs, None, kind="probe", group="a@96x96"))
    pool.add(Candidate("probe:b@224x224", probs, None, kind="probe", group="b@224x224"))
    assert {c.name for c in pool} == {"thumbnails", "probe", "probe:a@96x96", "probe:b@224x224"}
    for step in range(4):
        pool.add(Candidate(f"finetune:a@96x96:{step}", probs, None, group="a@96x96"))
    assert [c.name for c in pool if c.group == "a@96x96" and c.kind == "finetune"] == [
        "finetune:a@96x96:2", "finetune:a@96x96:3"]
    for step in range(20):
        pool.add(Candidate(f"finetune:b@224x224:{step}", probs, None, group="b@224x224"))
    names = [c.name for c in pool]
    assert len(names) <= 12 and "probe:a@96x96" in names and "finetune:b@224x224:19" in names


def test_a_run_through_the_steps_buys_quality_until_the_end_within_budget():
    """Digits on a CPU: thumbnails, the probe, then steps (probes at larger sizes, fine-tuning), every
    prediction well-formed, within the budget, the last ones from the steps."""
    from autodl_core.arrays import ArrayDataset, ArrayMetadata
    from autodl_core.config import PipelineConfig
    from autodl_core.solver import Solver
    from tools.replay import digits_split
    import time

    train, test = digits_split()
    config = PipelineConfig(step_backbones="", first_slice_seconds=2.0)  # one backbone keeps the test short
    solver = Solver(ArrayMetadata(train, "digits"), config, device="cpu")
    assert solver.steps is not None
    budget, start, history = 45.0, time.monotonic(), []
    while not solver.done_training:
        left = start + budget - time.monotonic()
        if left <= 0:
            break
        solver.train(train, left)
        left = start + budget - time.monotonic()
        history.append((time.monotonic() - start, solver.test(test, left)))
    assert time.monotonic() - start <= budget
    assert all(p.shape == (len(test.labels), 10) and np.isfinite(p).all() for _, p in history)
    assert solver.steps.history and solver.steps.history[0].startswith("probe mobilenetv2_100@")
    assert any(h.startswith("tune") for h in solver.steps.history), solver.steps.history
    assert any(c.group for c in solver.candidates), [c.name for c in solver.candidates]
    assert nauc(test.labels, history[-1][1]) > 0.97
    stats = solver.stats()
    assert stats["steps"] == solver.steps.history and stats["storage_hw"]


def _photo_task(n=120, side=256, classes=3, seed=0):
    from autodl_core.arrays import ArrayDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.integers(0, 60, (n, side, side, 3), dtype=np.uint8)
    x[..., 0] += (labels * 60).astype(np.uint8)[:, None, None]
    y = np.eye(classes, dtype=np.float32)[labels]
    return ArrayDataset(x[:100], y[:100]), ArrayDataset(x[100:], y[100:])


def _run_data(train):
    from autodl_core.arrays import ArrayMetadata
    from autodl_core.config import PipelineConfig
    from autodl_core.device_plan import plan_for
    from autodl_core.planner import RateMeter
    from autodl_core.planner import TimePlanner
    from autodl_core.run_data import RunData

    device = torch.device("cpu")
    return RunData(ArrayMetadata(train, "photos"), PipelineConfig(), device, TimePlanner(RateMeter(1e6)),
                   (0.5,) * 3, (0.5,) * 3, plan_for(device))


def test_the_steps_read_the_images_again_at_their_large_size():
    """The first stages read at the small size (fast early predictions); a step that looks larger reads
    the same examples again at the large size, checked by their labels."""
    import time

    train, test = _photo_task()
    data = _run_data(train)
    data.open_train(train)
    data.read_all_train(time.monotonic() + 60)
    data.read_test(test, time.monotonic() + 60)
    small, large = tuple(data.profile.storage_hw), tuple(data.large_storage_hw)
    assert max(small) <= 128 and min(large) == 256 and data.step_storage_hw() == large
    assert data.reread_needed((224, 224)) and not data.reread_needed((96, 96))
    labels = data.train_y.copy()
    assert data.reread_at_large_size(time.monotonic() + 60)
    assert data.train_x.shape[1:3] == large and data.test_x.shape[1:3] == large and len(data.test_x) == 20
    assert np.array_equal(data.train_y, labels) and tuple(data.profile.storage_hw) == large
    assert not data.reread_needed((288, 288))  # nothing larger to read


def test_the_chunks_read_again_are_joined_without_a_second_copy_of_them_all():
    from autodl_core.run_data import _join_releasing

    chunks = [np.full((n, 4, 4, 3), i, np.uint8) for i, n in enumerate((5, 3, 4))]
    expected = np.concatenate(chunks)[:10]
    parts = list(chunks)
    joined = _join_releasing(parts, 10)
    assert np.array_equal(joined, expected) and parts == []  # every chunk released from the list
    assert len(_join_releasing([np.zeros((2, 4, 4, 3), np.uint8)], 10)) == 2  # fewer read than asked


def test_a_dataset_that_reads_differently_twice_keeps_the_small_size():
    import time

    train, test = _photo_task()
    data = _run_data(train)
    data.open_train(train)
    data.read_all_train(time.monotonic() + 60)
    data.read_test(test, time.monotonic() + 60)
    data.train_y = data.train_y[::-1].copy()  # as if the second read came in another order
    small = tuple(data.profile.storage_hw)
    assert not data.reread_at_large_size(time.monotonic() + 60)
    assert data.large_storage_hw is None and tuple(data.profile.storage_hw) == small
    assert data.step_storage_hw() == small and not data.reread_needed((288, 288))


def test_when_no_stronger_step_fits_the_best_tuning_goes_on_from_its_weights():
    """After another backbone's probe took the caches, the fine-tuning step with the best validation score
    is resumed (its activations cached again, a new cycle from its best weights), not restarted."""
    import time

    from autodl_core.arrays import ArrayMetadata
    from autodl_core.config import PipelineConfig
    from autodl_core.solver import Solver
    from autodl_core.stages.finetune import FinetuneStage
    from autodl_core.stages.steps import ProbeStep
    from tools.replay import digits_split

    train, test = digits_split()
    config = PipelineConfig(step_backbones="", first_slice_seconds=2.0)
    solver = Solver(ArrayMetadata(train, "digits"), config, device="cpu")
    start = time.monotonic()
    while solver.finetune is None or solver.finetune.best_state is None:
        assert time.monotonic() - start < 120, "no fine-tuning step with weights"
        solver.train(train, 60)
        solver.test(test, 60)
    steps, tuned = solver.steps, solver.finetune
    steps.tuned = set(config.step_backbone_names())  # nothing stronger left
    other = ProbeStep(solver.ctx, tuned.net, (48, 48), steps.fit_idx, steps.val_idx, then_tune=False)
    other.step(time.monotonic() + 60)  # another probe takes the caches
    assert other.finished and solver.ctx.caches.size == (48, 48)
    steps.current = other
    resume = steps._next_step(time.monotonic() + 120)
    assert isinstance(resume, ProbeStep) and resume.resume is tuned and resume.size == tuned.size
    steps.current = resume
    resume.step(time.monotonic() + 60)
    weights = {k: v.clone() for k, v in tuned.best_state.items()}
    goes_on = steps._next_step(time.monotonic() + 120)
    assert goes_on is tuned and isinstance(goes_on, FinetuneStage) and solver.ctx.caches.size == tuned.size
    # From its best weights (a few steps planning its schedule since), not from the pretrained top again:
    model, pretrained = tuned.tuner.model.state_dict(), tuned.net.top.state_dict()
    moved = [k for k in weights if k.startswith("backbone.") and weights[k].is_floating_point()
             and not torch.equal(weights[k], pretrained[k[len("backbone."):]])]

    def distance(a, b):
        return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in moved)) ** 0.5

    assert moved and distance(model, weights) < 0.5 * distance(
        weights, {k: pretrained[k[len("backbone."):]] for k in moved})
    steps.current = goes_on
    solver.train(train, 60)
    assert solver.test(test, 60).shape == (len(test.labels), 10) and "resume" in " ".join(steps.history)


def test_step_backbones_stay_within_the_memory_cap(monkeypatch):
    """The backbones and their engines hold memory: under a small cap the steps keep the first backbone only,
    under a large one every step backbone is built."""
    from autodl_core import memory as memory_module
    from autodl_core import solver as solver_module
    from autodl_core.config import PipelineConfig
    from autodl_core.memory import MemoryBudget

    built = []
    monkeypatch.setattr(solver_module, "prepare_backbone",
                        lambda config, metadata, device, plan, name=None: built.append(name) or name)
    readings = iter([1.6, 2.2, 2.8])  # GB: after the first backbone, then after each step backbone
    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: next(readings))
    config = PipelineConfig(step_backbones="efficientnet_lite0,efficientnet_lite2", memory_cap_gb=4.0)
    nets = solver_module._step_backbones(config, None, torch.device("cpu"), None, MemoryBudget(4.0, base_gb=1.0))
    assert list(nets) == built == ["efficientnet_lite0", "efficientnet_lite2"]

    built.clear()
    readings = iter([1.6, 2.2])
    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: next(readings))
    small = PipelineConfig(step_backbones="efficientnet_lite0,efficientnet_lite2", memory_cap_gb=1.5)
    nets = solver_module._step_backbones(small, None, torch.device("cpu"), None, MemoryBudget(1.5, base_gb=1.0))
    # 0.6 GB after the first, 0.6 more for Lite0 (1.2 <= 1.5); Lite2 would make about 1.8: left out
    assert list(nets) == built == ["efficientnet_lite0"]

    built.clear()
    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: 1.6)
    tiny = PipelineConfig(step_backbones="efficientnet_lite0,efficientnet_lite2", memory_cap_gb=0.05)
    assert solver_module._step_backbones(tiny, None, torch.device("cpu"), None, MemoryBudget(0.05, base_gb=1.0)) == {}
    assert built == []


class _StoredData:
    """What the steps' choices read of the run's data: stored and large sizes, counts."""

    def __init__(self, stored, large, n_train, n_test):
        from types import SimpleNamespace

        self.profile = SimpleNamespace(storage_hw=tuple(stored), flip_ok=True, channels=3)
        self.large_storage_hw = tuple(large) if large is not None else None
        self.n_read, self.n_test_read = n_train, n_test

    def step_storage_hw(self):
        return self.large_storage_hw or self.profile.storage_hw

    def reread_needed(self, size):
        large = self.large_storage_hw
        return large is not None and large != self.profile.storage_hw and min(size) > min(self.profile.storage_hw)


def _steps_for(n_train, n_test, stored, large=None, left=255.0, memory=None):
    """A StepsStage after its first probe at 64 px, with MobileNetV2's rates on a 2-core AVX-512 EPYC
    (frozen pass 3,336 img/s at 64 px; the top's training 842 / 395 img/s at 64 / 128 px)."""
    from types import SimpleNamespace

    from autodl_core.config import PipelineConfig
    from autodl_core.planner import RateMeter
    from autodl_core.planner import TimePlanner
    from autodl_core.stages.steps import StepsStage
    from autodl_core.warmup import TRAINING_OVERHEAD

    config = PipelineConfig()

    def net(name, slower=1.0, train_bytes_per_pixel=279.0):
        # MobileNetV2's trunk output (64 channels at stride 16) for the memory the caches take; the bytes a
        # training step saves per example and pixel as the warm-up measured them (Lite0 365, Lite2 499)
        return SimpleNamespace(name=name, rate=RateMeter(3336.0 * 64 * 64 / slower),
                               train_rate=SideRate([(64, 842.0 / slower), (128, 395.0 / slower)]),
                               activation_bytes=lambda size: 2 * 64 * -(-size[0] // 16) * -(-size[1] // 16),
                               training_bytes=lambda size, batch: int(TRAINING_OVERHEAD * train_bytes_per_pixel * batch
                                                                      * size[0] * size[1]))

    nets = {n.name: n for n in (net(config.backbone), net("efficientnet_lite0", 2.0, 365.0),
                                net("efficientnet_lite2", 2.2, 499.0))}
    ctx = SimpleNamespace(config=config, planner=TimePlanner(nets[config.backbone].rate),
                          data=_StoredData(stored, large, n_train, n_test), memory=memory,
                          caches=SimpleNamespace(nbytes=lambda: 0))
    steps = StepsStage(ctx, thumbnails=None, probe=SimpleNamespace(size=(64, 64)), nets=nets)
    n_val = min(500, n_train // 10)
    steps.val_idx, steps.fit_idx = np.arange(n_val), np.arange(n_val, n_train)
    return steps, nets, config


def test_a_large_set_tunes_its_backbone_to_the_end_at_the_size_its_images_afford():
    """CIFAR-10's size (49,500 + 500 held out, 10,000 test, 32 px): a larger frozen probe first, then the
    pipeline's backbone fine-tuned until the end (not three more probes and a short tuning at 80 px)."""
    import time

    steps, nets, config = _steps_for(50_000, 10_000, stored=(32, 32))
    deadline = time.monotonic() + 255.0
    first = steps._stronger_step(deadline)
    assert first.net is nets[config.backbone] and not first.then_tune and min(first.size) > 64
    steps.current = None
    second = steps._stronger_step(deadline)
    assert second.net is nets[config.backbone] and second.then_tune and second.tune_to_end
    assert 64 <= min(second.size) <= min(first.size)
    small, _, _ = _steps_for(1_000, 300, stored=(32, 32))  # where three epochs fit: a step, not the whole run
    step = small._stronger_step(deadline)
    assert step.then_tune and not step.tune_to_end


def test_the_steps_caches_stay_within_the_memory_cap(monkeypatch):
    """A step's activation caches count against the memory cap: CIFAR-10's 60,000 images at 224 px take
    ~2.4 GB of MobileNetV2 activations; under a cap that leaves ~0.5 GB the steps choose a side whose
    caches fit, and with nothing left the smallest side."""
    import time

    from autodl_core import memory as memory_module
    from autodl_core.memory import MemoryBudget

    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: 2.0)
    roomy, nets, config = _steps_for(50_000, 10_000, stored=(32, 32), memory=MemoryBudget(8.0, base_gb=1.0))
    deadline = time.monotonic() + 255.0
    free = roomy._stronger_step(deadline)
    tight, _, _ = _steps_for(50_000, 10_000, stored=(32, 32), memory=MemoryBudget(1.5, base_gb=1.0))
    capped = tight._stronger_step(deadline)
    side, net = min(capped.size), capped.net
    training = tight.training_gb(side, net) if capped.then_tune else 0.0  # a frozen probe trains nothing
    assert tight.cache_gb(side, net) + training <= 0.5 < roomy.cache_gb(min(free.size), free.net)
    assert min(capped.size) < min(free.size)
    full, _, _ = _steps_for(50_000, 10_000, stored=(32, 32), memory=MemoryBudget(0.5, base_gb=1.0))
    assert full._sides() == [64]


def test_the_steps_count_a_training_steps_working_set_against_the_cap(monkeypatch):
    """DTD's shape (1,000 photos stored at 320 px): the caches of every side fit a 3-GB room, but
    EfficientNet-Lite2's top trained on a batch of 64 at 320 px saves ~3.9 GB for its backward pass
    (DTD's run at 256 x 264 px grew 1.5 GB past its cap): those sides are left out, the rest stay."""
    from autodl_core import memory as memory_module
    from autodl_core.memory import MemoryBudget

    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: 2.0)
    steps, _, _ = _steps_for(1_000, 300, stored=(320, 320), memory=MemoryBudget(4.0, base_gb=1.0))
    every = _steps_for(1_000, 300, stored=(320, 320))[0]._sides()
    sides = steps._sides()
    assert all(steps.cache_gb(s) < 0.5 for s in every)  # the caches alone would allow every side
    assert max(sides) < max(every) and sides == every[:len(sides)]
    assert all(steps.cache_gb(s) + steps.training_gb(s) <= 3.0 for s in sides)
    assert steps.cache_gb(max(every)) + steps.training_gb(max(every)) > 3.0


def test_each_backbone_is_charged_its_own_working_set_and_frozen_probes_none(monkeypatch):
    """DTD's shape under the same 3-GB room: MobileNetV2 saves 279 bytes a pixel for its backward pass,
    EfficientNet-Lite2 499, so MobileNetV2's tuning keeps sides Lite2's leaves out; a frozen probe that no
    tuning follows trains nothing and keeps the sides its caches allow."""
    from autodl_core import memory as memory_module
    from autodl_core.memory import MemoryBudget

    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: 2.0)
    steps, nets, config = _steps_for(1_000, 300, stored=(320, 320), memory=MemoryBudget(4.0, base_gb=1.0))
    every = _steps_for(1_000, 300, stored=(320, 320))[0]._sides()
    mobilenet, lite2 = nets[config.backbone], nets["efficientnet_lite2"]
    assert steps._sides() == steps._sides(lite2)  # no backbone named: the one that needs most
    assert max(steps._sides(mobilenet)) > max(steps._sides(lite2))
    for net in (mobilenet, lite2):
        assert all(steps.cache_gb(s, net) + steps.training_gb(s, net) <= 3.0 for s in steps._sides(net))
        assert steps._sides(net, training=False) == every  # the caches alone fit at every side


def test_a_step_that_reads_the_images_again_counts_their_larger_copy_against_the_cap(monkeypatch):
    """Blood cells' shape (9,957 training and 2,487 test images stored at 96 x 128, read again at 180 x 240
    for sides above 96): the larger copy takes ~1.2 GB more than the stored one. Sides that need it count
    it with their caches and training, so under a room of 2 GB they are left out, where without the
    reading again they would fit; sides within the stored size are charged nothing for it."""
    from autodl_core import memory as memory_module
    from autodl_core.memory import MemoryBudget

    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: 3.0)
    steps, nets, config = _steps_for(9_957, 2_487, stored=(96, 128), large=(180, 240),
                                     memory=MemoryBudget(4.0, base_gb=1.0))
    net = nets[config.backbone]
    growth = (9_957 + 2_487) * 3 * (180 * 240 - 96 * 128) / 1e9
    assert steps.reread_gb(96) == 0.0 and abs(steps.reread_gb(160) - growth) < 1e-9
    sides = steps._sides(net)
    without = [s for s in _steps_for(9_957, 2_487, stored=(96, 128), large=(180, 240))[0]._sides(net)
               if steps.cache_gb(s, net) + steps.training_gb(s, net) <= 2.0]
    assert max(sides) < max(without)  # the images' larger copy is what leaves those sides out
    assert all(steps.cache_gb(s, net) + steps.training_gb(s, net) + steps.reread_gb(s) <= 2.0 for s in sides)
    assert 96 in sides  # the stored size costs no reading again


def test_reading_the_images_again_counts_both_copies_until_the_stored_one_goes(monkeypatch):
    """Blood cells' shape again: while the images are read again at 180 x 240 the larger copy is held in full
    beside the stored one, with a chunk being joined, before any cache fills (their process grew 1.74 GB at
    that peak, 1.41 GB once the stored copy was let go). Under a room of 1.7 GB a frozen probe's sides that
    need the reading are left out, though the copy's growth and their caches would fit it; the stored size
    stays."""
    from autodl_core import memory as memory_module
    from autodl_core.memory import MemoryBudget
    from autodl_core.run_data import REREAD_CHUNK

    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: 3.0)
    steps, nets, config = _steps_for(9_957, 2_487, stored=(96, 128), large=(180, 240),
                                     memory=MemoryBudget(4.0, base_gb=0.7))  # room: 1.7 GB
    net = nets[config.backbone]
    every = _steps_for(9_957, 2_487, stored=(96, 128), large=(180, 240))[0]._sides(net, training=False)
    peak = (9_957 + 2_487 + 2 * REREAD_CHUNK) * 3 * 180 * 240 / 1e9
    assert steps.reading_peak_gb(96) == 0.0 and abs(steps.reading_peak_gb(160) - peak) < 1e-9
    assert peak > 1.7 > steps.reread_gb(160)
    growth_fits = [s for s in every if steps.cache_gb(s, net) + steps.reread_gb(s) <= 1.7]
    assert max(growth_fits) > 96  # counted once the stored copy is gone, larger sides would fit
    assert steps._sides(net, training=False) == [s for s in every if s <= 96]


def test_the_saved_tensor_count_grows_with_the_pixels_a_training_step_sees():
    """What the warm-up measures for the memory cap: the bytes autograd saves for a training step's
    backward pass, each storage once; four times the pixels, about four times the bytes."""
    import torch

    from autodl_core.warmup import SavedTensorBytes

    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    counted = []
    for side in (16, 32):
        saved = SavedTensorBytes()
        with saved.counting():
            layer(torch.randn(2, 3, side, side)).sum().backward()
        counted.append(saved.nbytes)
    assert counted[0] >= 2 * 3 * 16 * 16 * 4  # at least the input the first convolution saves (fp32)
    assert 3.0 < counted[1] / counted[0] < 4.5
    saved = SavedTensorBytes()
    with torch.no_grad(), saved.counting():
        layer(torch.randn(2, 3, 16, 16))
    assert saved.nbytes == 0  # nothing is saved without a backward pass to come


def test_memory_budget_counts_what_the_solver_adds(monkeypatch):
    from autodl_core import memory as memory_module
    from autodl_core.memory import MemoryBudget, release_freed_memory

    reading = [1.4]
    monkeypatch.setattr(memory_module, "process_memory_gb", lambda: reading[0])
    budget = MemoryBudget(4.0)  # the base is the process's memory when the solver starts
    reading[0] = 3.0
    assert abs(budget.held_gb() - 1.6) < 1e-9 and abs(budget.left_gb() - 2.4) < 1e-9
    assert budget.fits(2.4) and not budget.fits(2.5) and budget.fits(2.5, freed_gb=0.2)
    reading[0] = 1.0  # below the base (freed memory handed back): holds nothing, not less
    assert budget.held_gb() == 0.0 and budget.peak_held_gb == 1.6 > 0
    assert release_freed_memory() in (True, False)  # glibc hands pages back; elsewhere it is a no-op


def test_the_heap_is_trimmed_at_most_once_an_interval_inside_loops(monkeypatch):
    """The frozen passes' loops hand freed pages back at most once a TRIM_INTERVAL_S (each
    trim's pages are faulted in again by the next batches); a call without an interval always trims."""
    from autodl_core import memory as memory_module

    calls = []
    monkeypatch.setattr(memory_module, "_TRIM", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(memory_module, "_last_trim", 0.0)
    assert memory_module.trim_heap(memory_module.TRIM_INTERVAL_S)
    assert not memory_module.trim_heap(memory_module.TRIM_INTERVAL_S)  # too soon after the last
    assert memory_module.trim_heap() and memory_module.release_freed_memory()
    assert calls == [0, 0, 0]
    monkeypatch.setattr(memory_module, "_TRIM", None)  # macOS, musl, Windows: nothing to call
    assert not memory_module.trim_heap()


def test_before_reading_the_data_again_the_steps_look_at_the_stored_size():
    """Photos stored at 128 px for the early stages and wanted at 340 x 384: one frozen probe at the stored
    size (no reading) comes before the step that reads them all again."""
    import time

    steps, nets, config = _steps_for(1_000, 272, stored=(128, 144), large=(340, 384))
    deadline = time.monotonic() + 280.0
    first = steps._stronger_step(deadline)
    assert not steps.ctx.data.reread_needed(first.size) and min(first.size) >= 64 * 1.3
    assert not first.then_tune
    steps.current = None
    second = steps._stronger_step(deadline)
    assert steps.ctx.data.reread_needed(second.size) and second.net is first.net


def test_a_tuning_step_below_its_probe_is_recovering_not_on_a_plateau():
    """Two stale slices after an epoch end a step once it has passed its probe; below the probe it goes on
    until RECOVERY_EPOCHS and RECOVERY_STEPS (knee X-rays passed their probe only after ~2 epochs, 350
    steps; three epochs of a small set are a few dozen steps)."""
    from types import SimpleNamespace

    from autodl_core.stages.finetune import RECOVERY_EPOCHS, RECOVERY_STEPS, FinetuneStage, StepStart

    stage = FinetuneStage.__new__(FinetuneStage)
    stage.ctx = SimpleNamespace(config=SimpleNamespace(patience_slices=4))
    stage.start = StepStart(head=None, size=(96, 96), group="net@96x96", until=0.0, probe_score=0.45)
    stage.fit_idx, stage.stale_slices = np.arange(320), 2
    stage.leaving_head, stage.start_score = True, 0.50
    stage.tuner = SimpleNamespace(steps=20, batch_size=32, total_steps_hint=40)  # two epochs
    stage.best_score = 0.60  # above its probe and its start: two stale slices are a plateau
    assert stage._converged()
    stage.best_score = 0.30  # below its probe: still recovering
    assert not stage._converged()
    stage.best_score = stage.start_score = 0.48  # above its probe, but nothing tuned has passed its start
    assert not stage._converged()
    stage.leaving_head = False  # (a later schedule starts from tuned weights: no recovery)
    assert stage._converged()
    stage.leaving_head, stage.best_score = True, 0.30
    stage.tuner.steps = int(RECOVERY_EPOCHS * 10) + 1  # past RECOVERY_EPOCHS of a small set, not its steps
    assert not stage._converged()
    stage.tuner.steps = RECOVERY_STEPS  # ... until both are done
    assert stage._converged()


def test_a_tuning_step_cuts_its_learning_rate_once_after_falls():
    """A fall goes back to the best weights; within a step only the first one also cuts the learning rate
    (the single-stage path keeps cutting at every fall, as before)."""
    from types import SimpleNamespace

    from autodl_core.stages.finetune import FinetuneStage, StepStart

    def stage(start):
        s = FinetuneStage.__new__(FinetuneStage)
        restored = []
        s.start, s.best_score, s.best_state, s.stale_slices, s.lr_cuts = start, 0.8, {"w": 1}, 0, 0
        s.leaving_head, s.start_score, s.fit_idx = False, 0.8, np.arange(320)
        s.tuner = SimpleNamespace(steps=100, schedule=SimpleNamespace(warmup_steps=10), base_lrs=[1.0],
                                  batch_size=32, model=SimpleNamespace(load_state_dict=restored.append),
                                  ema=SimpleNamespace(load_state_dict=restored.append))
        return s, restored

    step, restored = stage(StepStart(head=None, size=(96, 96), group="g", until=0.0, probe_score=0.8))
    step._track(0.5)
    step._track(0.5)
    assert step.tuner.base_lrs == [pytest.approx(0.3)] and len(restored) == 4
    single, _ = stage(None)
    single._track(0.5)
    single._track(0.5)
    assert single.tuner.base_lrs == [pytest.approx(0.09)]


def test_a_step_leaving_its_probes_head_goes_back_once_then_goes_on():
    """While a step's first schedule has not passed the weights it started from (the probe's head), the first
    fall goes back to them and cuts the learning rate; later falls go on from where they are (going back
    every time restarted the recovery from the head: knee X-rays never passed it). Once past RECOVERY_EPOCHS
    and RECOVERY_STEPS, or once a tuned checkpoint has passed the start, falls go back again."""
    from types import SimpleNamespace

    from autodl_core.stages.finetune import RECOVERY_EPOCHS, RECOVERY_STEPS, FinetuneStage, StepStart

    s = FinetuneStage.__new__(FinetuneStage)
    restored = []
    s.start = StepStart(head=None, size=(96, 96), group="g", until=0.0, probe_score=0.37)
    s.best_score = s.start_score = 0.375  # the start: the probe's head
    s.best_state, s.stale_slices, s.lr_cuts, s.leaving_head, s.fit_idx = {"w": 0}, 0, 0, True, np.arange(3200)
    s.tuner = SimpleNamespace(steps=60, schedule=SimpleNamespace(warmup_steps=10), base_lrs=[1.0], batch_size=32,
                              model=SimpleNamespace(load_state_dict=restored.append),
                              ema=SimpleNamespace(load_state_dict=restored.append))
    s._track(-0.05)  # the first fall: back to the head, learning rate cut
    assert len(restored) == 2 and s.tuner.base_lrs == [pytest.approx(0.3)]
    s.tuner.steps = 120
    s._track(0.19)  # still leaving the head (0.19 < 0.375, 1.2 epochs): goes on from here
    assert len(restored) == 2 and s.tuner.base_lrs == [pytest.approx(0.3)] and s.best_state == {"w": 0}
    s.tuner.steps = max(int(RECOVERY_EPOCHS * 100) + 1, RECOVERY_STEPS)  # recovered or not: back to the best again
    s._track(0.30)
    assert len(restored) == 4
    s.tuner.steps = 20
    s.leaving_head = False  # a later schedule (from tuned weights): back at every fall, as before
    s._track(0.30)
    assert len(restored) == 6


def test_a_step_out_of_patience_ends_the_step_not_the_run():
    """No validation gain for `patience_slices` slices ends a step (the steps stage goes on with a stronger
    one or the best one); only the single fine-tuning stage ends the run there."""
    from types import SimpleNamespace

    from autodl_core.stages.finetune import FinetuneStage, StepStart

    def stage(start):
        s = FinetuneStage.__new__(FinetuneStage)
        s.ctx = SimpleNamespace(done_training=False, predictions=SimpleNamespace(nothing_new=lambda: None))
        s.start, s.stale_slices, s.finished = start, 4, False
        s.tuner = SimpleNamespace(steps=250)
        return s

    step = stage(StepStart(head=None, size=(160, 160), group="g", until=0.0, probe_score=0.54))
    step._out_of_patience()
    assert step.finished and not step.ctx.done_training
    single = stage(None)
    single._out_of_patience()
    assert single.ctx.done_training and not single.finished


def test_where_the_frozen_features_are_weak_the_tuning_goes_where_many_epochs_fit():
    """Knee X-rays' shape (3,985 examples stored at 128 px): the first step plans its tuning at a large size,
    where three epochs fit; once its frozen probe scores low on validation (0.37), the tuning moves to a
    smaller size where TUNE_MIN_EPOCHS_WEAK epochs fit in the step's share. Where the probe scores high,
    its cached activations are tuned at once."""
    import time

    from autodl_core.planner import TUNE_MIN_EPOCHS_WEAK, TUNE_STEP_SHARE, WEAK_FEATURES_NAUC
    from autodl_core.stages.steps import ProbeStep

    for probe_score, weak in ((0.37, True), (0.9, False)):
        steps, nets, config = _steps_for(3_985, 1_656, stored=(128, 128))
        steps._tune = lambda probe_step, deadline, last_step=False: ("tune", probe_step)
        deadline = time.monotonic() + 270.0
        first = steps._stronger_step(deadline)
        assert isinstance(first, ProbeStep) and first.then_tune and not first.sized_for_weak
        assert min(first.size) >= 160
        first.head, first.val_score = object(), (lambda s=probe_score: s)
        steps.current = first
        nxt = steps._next_step(deadline)
        assert steps.weak_features() is weak and (probe_score < WEAK_FEATURES_NAUC) is weak
        if not weak:
            assert nxt == ("tune", first)
            continue
        assert isinstance(nxt, ProbeStep) and nxt.then_tune and nxt.sized_for_weak and nxt.net is first.net
        assert min(nxt.size) < min(first.size)
        net = nets[config.backbone]
        epochs = TUNE_STEP_SHARE * 270.0 * net.train_rate.images_per_s(nxt.size) / len(steps.fit_idx)
        assert epochs >= TUNE_MIN_EPOCHS_WEAK
        steps.current = nxt  # its probe done: tuned there, not moved again
        nxt.head, nxt.val_score = object(), (lambda: 0.35)
        assert steps._next_step(deadline) == ("tune", nxt)


def test_where_the_features_are_weak_a_large_set_is_tuned_where_the_most_epochs_fit():
    """A set large for its budget (CIFAR-10's size, 32 px): with strong features the pipeline's backbone is
    tuned to the end at the largest size where one epoch fits; with weak ones (a step's probe at 0.45) at a
    size where twelve fit in the time left, or the smallest."""
    import time

    from autodl_core.planner import TUNE_MIN_EPOCHS_WEAK

    chosen = {}
    for probe_score in (0.95, 0.45):
        steps, nets, config = _steps_for(50_000, 10_000, stored=(32, 32))
        steps.frozen_score = probe_score
        steps.probed[config.backbone] = 192  # its large probe is made: what remains is the tuning
        deadline = time.monotonic() + 255.0
        step = steps._stronger_step(deadline)
        assert step.net is nets[config.backbone] and step.then_tune and step.tune_to_end
        chosen[probe_score] = min(step.size)
    assert chosen[0.45] < chosen[0.95], chosen
    net = nets[config.backbone]
    epochs = 0.9 * 255.0 * net.train_rate.images_per_s((chosen[0.45],) * 2) / len(steps.fit_idx)
    assert epochs >= TUNE_MIN_EPOCHS_WEAK or chosen[0.45] == 64


def test_a_weak_first_probe_sizes_the_first_step_for_tuning():
    """Knee X-rays' shape again: where the first probe (64 px) already scores below FIRST_PROBE_WEAK_NAUC
    on validation and no better than the raw thumbnails (0.19 against 0.39), the first step is a probe at
    the size where TUNE_MIN_EPOCHS_WEAK epochs fit, followed by its tuning: not a larger frozen probe first
    (15 s at 192 px that only confirmed it). Blood cells' first probe (0.70) and pedestrians' (0.36, above
    their thumbnails' 0.33) leave the verdict to the steps' own probes."""
    import time

    from autodl_core.planner import TUNE_MIN_EPOCHS_WEAK, TUNE_STEP_SHARE

    cases = ((0.19, 0.39, True), (0.70, 0.48, False), (0.36, 0.33, False), (0.19, float("-inf"), False),
             (float("-inf"), 0.39, False))
    for first_score, thumbnails, weak in cases:
        steps, nets, config = _steps_for(3_985, 1_656, stored=(128, 128))
        steps.note_first_probe(first_score, thumbnails)
        assert steps.weak_features() is weak, (first_score, thumbnails)
        deadline = time.monotonic() + 270.0
        first = steps._stronger_step(deadline)
        assert first.then_tune and first.sized_for_weak is weak
        if not weak:
            assert min(first.size) >= 160
            continue
        assert min(first.size) < 160
        epochs = TUNE_STEP_SHARE * 270.0 * nets[config.backbone].train_rate.images_per_s(first.size) \
            / len(steps.fit_idx)
        assert epochs >= TUNE_MIN_EPOCHS_WEAK
        first.head, first.val_score = object(), (lambda: 0.41)  # its own probe lifts nothing
        steps.current = first
        steps._tune = lambda probe_step, deadline, last_step=False: ("tune", probe_step)
        assert steps._next_step(deadline) == ("tune", first)
    lifted, _, _ = _steps_for(3_985, 1_656, stored=(128, 128))
    lifted.note_first_probe(0.45, 0.49)
    assert lifted.weak_features()
    first = lifted._stronger_step(time.monotonic() + 270.0)
    first.head, first.val_score = object(), (lambda: 0.8)  # its probe at 0.8: the features carry after all
    lifted.current = first
    lifted._tune = lambda probe_step, deadline, last_step=False: ("tune", probe_step)
    assert lifted._next_step(time.monotonic() + 260.0) == ("tune", first) and not lifted.weak_features()


def test_when_nothing_stronger_fits_the_best_tuning_goes_on_not_the_last_one():
    """Knee X-rays at T = 300 s: MobileNetV2's step at 112 px reached validation 0.60, then EfficientNet-Lite2's
    at 64 px 0.49; with no stronger step left, the better one is resumed (its activations cached again), not
    the last one's new cycles. Where the last step is the best, it goes on at once."""
    import time
    from types import SimpleNamespace

    from autodl_core.stages.finetune import FinetuneStage
    from autodl_core.stages.steps import ProbeStep

    def tune(net, size, best_score, extended):
        stage = FinetuneStage.__new__(FinetuneStage)
        stage.net, stage.size, stage.best_score = net, size, best_score
        stage.tuner, stage.best_state, stage.finished = object(), {"w": 0}, True
        stage.start = SimpleNamespace(group=f"{net.name}@{size[0]}x{size[1]}")
        stage.extend = lambda until, stage=stage: extended.append(stage)
        return stage

    for lite_score, lite_goes_on in ((0.49, False), (0.65, True)):
        steps, nets, config = _steps_for(3_985, 1_656, stored=(128, 128))
        extended = []
        mobile = tune(nets[config.backbone], (112, 112), 0.60, extended)
        lite = tune(nets["efficientnet_lite2"], (64, 64), lite_score, extended)
        steps.tunes = {config.backbone: mobile, "efficientnet_lite2": lite}
        steps.tuned = set(nets)  # nothing stronger is left
        steps.current = lite
        nxt = steps._next_step(time.monotonic() + 140.0)
        if lite_goes_on:
            assert nxt is lite and extended == [lite]
        else:
            assert isinstance(nxt, ProbeStep) and nxt.resume is mobile and nxt.size == (112, 112) and not extended
            assert steps.history[-1] == f"resume {mobile.start.group}"
