"""Unit checks of the solver's building blocks: value ranges, storage shapes, heads, trunk/top split."""
import numpy as np
import pytest
import torch

from autodl_core.heads import LinearHead, thumbnails
from autodl_core.images import Preprocessor, to_three_channels, working_size
from autodl_core.profile import DataProfile, choose_storage_shape
from autodl_core.tfreader import value_transform


def test_value_transform_keeps_small_integer_ranges_exact():
    # The kit gives PNG 0..16 data as 0..16/255: stored back as the integers 0..16.
    offset, scale = value_transform(0.0, 16 / 255)
    assert (offset, scale) == (0.0, 255.0)
    assert round((16 / 255 + offset) * scale) == 16
    # Dense data in 0..255 stays; other ranges are stretched to 0..255.
    assert value_transform(0.0, 200.0) == (0.0, 1.0)
    offset, scale = value_transform(-3.0, 5.0)
    assert (-3.0 + offset) * scale == pytest.approx(0.0) and (5.0 + offset) * scale == pytest.approx(255.0)


def _profile(rows, cols, channels=3, median=(0, 0)):
    return DataProfile(n_train=100, n_classes=2, rows=rows, cols=cols, channels=channels, median_hw=median,
                       value_min=0.0, value_max=1.0)


def test_storage_shape_caps_large_and_variable_images():
    assert choose_storage_shape(_profile(32, 32), 128, 4.0) == (32, 32)
    assert choose_storage_shape(_profile(2000, 1000), 128, 4.0) == (128, 64)
    variable = _profile(-1, -1, median=(160, 75))
    h, w = choose_storage_shape(variable, 128, 4.0)
    assert h == 128 and w % 4 == 0 and 56 <= w <= 64
    tiny_memory = _profile(100, 100)
    choose_storage_shape(tiny_memory, 128, 0.001)
    assert tiny_memory.max_cached_examples == 1000  # never below a usable floor


def test_working_size_keeps_aspect_and_multiples_of_8():
    assert working_size((32, 32), 64) == (64, 64)
    assert working_size((128, 60), 64) == (136, 64)


def test_preprocessor_maps_any_channel_count_to_rgb():
    pre = Preprocessor([0.5] * 3, [0.5] * 3, channels_last=False)
    for channels in (1, 2, 3, 4):
        x = np.full((2, 10, 12, channels), 255, np.uint8)
        out = pre(x, (16, 16))
        assert out.shape == (2, 3, 16, 16)
        assert torch.allclose(out, torch.ones_like(out))  # 255 -> 1.0 -> (1 - 0.5) / 0.5
    assert to_three_channels(torch.zeros(1, 5, 4, 4)).shape[1] == 3


def test_linear_head_as_linear_reproduces_its_logits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20)).astype(np.float32) * rng.uniform(0.01, 5, size=20).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)]
    head = LinearHead(multilabel=False).fit(x, y, max_iter=60)
    weight, bias = head.as_linear()
    linear = torch.nn.Linear(20, 3)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        assert torch.allclose(linear(torch.from_numpy(x)), head.logits(x), atol=1e-3)
    assert (head.predict_proba(x).argmax(1) == y.argmax(1)).mean() > 0.75  # not linearly separable


def test_linear_head_stops_inside_a_step_when_its_deadline_has_passed():
    """The deadline is checked at every loss evaluation: a fit whose deadline has already passed makes
    the minimum number of evaluations (one L-BFGS step would make up to 25) and keeps the best point
    evaluated, which is better than the prior it started from."""
    from autodl_core.heads import MIN_EVALUATIONS

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 30)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[(x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)]
    free = LinearHead(multilabel=False).fit(x, y, max_iter=40)
    assert free.evaluations > MIN_EVALUATIONS
    late = LinearHead(multilabel=False).fit(x, y, max_iter=40, deadline=0.0)  # monotonic time 0: long gone
    assert late.evaluations == MIN_EVALUATIONS
    assert torch.isfinite(late.weight).all() and late.weight.abs().sum() > 0
    prior_loss = np.log(4)
    probs = late.predict_proba(x)
    late_loss = -np.log(probs[np.arange(len(y)), y.argmax(1)]).mean()
    assert late_loss < prior_loss


def test_multilabel_head_and_thumbnails():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (60, 30, 20, 3), dtype=np.uint8)
    y = (rng.random((60, 4)) < 0.5).astype(np.float32)
    images[y[:, 0] == 1] //= 4  # label 0 readable from brightness
    feats = thumbnails(images, side=6)
    assert feats.shape == (60, 6 * 6 * 3)
    probs = LinearHead(multilabel=True).fit(feats, y).predict_proba(feats)
    assert probs.shape == (60, 4) and np.all((probs >= 0) & (probs <= 1))
    assert probs[y[:, 0] == 1, 0].mean() > probs[y[:, 0] == 0, 0].mean()


def test_thumbnails_in_chunks_are_the_whole_set_at_once():
    """Thumbnails are made a chunk at a time (memory); the features are those of all images at once."""
    import torch.nn.functional as F

    from autodl_core.heads import THUMBNAIL_CHUNK

    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (THUMBNAIL_CHUNK * 2 + 7, 24, 18, 3), dtype=np.uint8)
    whole = F.adaptive_avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float(), (12, 12))
    expected = whole.reshape(len(images), -1).numpy()
    assert np.allclose(thumbnails(images), expected)
    positions = np.flatnonzero(rng.random(len(images)) < 0.5)
    assert np.allclose(thumbnails(images, positions=positions), expected[positions])
    assert thumbnails(images, positions=np.zeros(0, int)).shape == (0, 12 * 12 * 3)


def test_trunk_and_top_compose_to_the_backbone():
    timm = pytest.importorskip("timm")
    from autodl_core.trunk import split_backbone

    backbone = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0).eval()
    trunk, top = split_backbone(backbone, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(top(trunk(x)), backbone(x), atol=1e-5)
    with pytest.raises(ValueError, match="cannot split"):
        split_backbone(torch.nn.Linear(2, 2), 2)


def test_min_gain_leaves_room_near_saturated_validation():
    from autodl_core.planner import min_gain

    assert min_gain(0.90, 0.0) == pytest.approx(0.001)  # the usual bar
    assert min_gain(0.9983, 0.0) == pytest.approx(0.000425)  # a quarter of the error left
    assert 1.0 - 0.9995 > min_gain(0.9995, 0.0) > 0  # a perfect checkpoint can still pass
    assert min_gain(1.0, 0.0) == 0 and min_gain(-np.inf, 0.0) == pytest.approx(0.001)
    assert min_gain(0.90, 0.5) == pytest.approx(0.011)  # expensive predictions need a clearer gain


def test_flip_tta_is_rechecked_on_every_checkpoint_while_on():
    from autodl_core.metrics import nauc
    from autodl_core.tta import FlipTTA

    y_val = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    good = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.8 + 0.1  # a sane checkpoint: perfect ranking
    broken = np.eye(3)[[1, 2, 0, 1, 2, 0]] * 0.8 + 0.1  # a diverged one: every example wrong
    helps_broken = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.9 + 0.05  # flipped predictions that outvote the broken ones

    def apply(tta, plain, flipped, recheck=True):
        return tta.apply(plain, y_val, nauc, affordable=lambda: True, flipped=flipped, recheck=recheck)

    tta = FlipTTA()
    # decided on a diverged first slice: flips "help" (anything beats a wrong model)
    assert apply(tta, broken, lambda: helps_broken) is not broken and tta.on is True
    # the next, sane checkpoint: flips now hurt (mirrored glyphs), so TTA goes off and plain is used
    assert apply(tta, good, lambda: broken) is good and tta.on is False
    # off stays off at this resolution: no flipped predictions are even computed
    assert apply(tta, good, None) is good
    # forced on without re-checking (recheck=False): the averaged predictions
    forced = FlipTTA()
    forced.on = True
    assert np.allclose(apply(forced, good, lambda: broken, recheck=False), (good + broken) / 2)
    assert forced.on is True
    # undecided and not affordable, or the flipped pass not done in time: off, plain returned
    for affordable, flipped in ((lambda: False, None), (lambda: True, lambda: None)):
        tta = FlipTTA()
        assert tta.apply(good, y_val, nauc, affordable=affordable, flipped=flipped) is good and tta.on is False


def test_call_deadline_keeps_the_kits_own_time_between_calls():
    """The kit writes each prediction file between our test() and the next train(): the most it took
    is kept free at the end, beside the safety margin."""
    from autodl_core.planner import RateMeter
    from autodl_core.planner import SAFETY_SECONDS, TimePlanner

    planner = TimePlanner(RateMeter(1.0))  # only the deadline arithmetic
    assert planner.call_deadline(100.0, 50.0) == 150.0 - SAFETY_SECONDS
    planner._returned_at = 100.0
    assert planner.call_deadline(102.5, 40.0) == 142.5 - SAFETY_SECONDS - 2.5  # 2.5 s of the kit's writing
    planner._returned_at = 110.0
    assert planner.call_deadline(110.1, 30.0) == pytest.approx(140.1 - SAFETY_SECONDS - 2.5)  # the most seen is kept


def test_top_features_give_up_rather_than_end_past_the_deadline():
    from autodl_core.engines import TorchRunner
    from autodl_core.trunk import top_features

    class Cache:  # what top_features reads of an ActivationCache
        def get(self, positions, device):
            return torch.ones(len(positions), 4)

    top = TorchRunner(torch.nn.Identity(), "cpu")
    assert top_features(top, Cache(), np.arange(10), "cpu", batch_size=4).shape == (10, 4)
    assert top_features(top, Cache(), np.arange(10), "cpu", batch_size=4, deadline=0.0) is None  # long past


def test_planner_answers_whether_a_resize_fits():
    """A resize is affordable when its new caches cost at most half the time left and leave 30 s."""
    import time

    from autodl_core.planner import RateMeter
    from autodl_core.planner import TimePlanner

    planner = TimePlanner(RateMeter(100.0 * 64 * 64))  # 100 img/s at 64 px, 25 img/s at 128 px
    now = time.monotonic()
    # top mode: 500 val + 1,000 test + 125 first-share examples at 25 img/s = 65 s of caches
    args = dict(n_val=500, n_test=1000, n_fit=5000, top_mode=True, test_cost=0.0)
    assert planner.resize_affordable((64, 64), (128, 128), now + 200, **args) is not None
    assert planner.resize_affordable((64, 64), (128, 128), now + 100, **args) is None  # 65 > 50
    # full fine-tuning builds no caches: only the 30 s of training must remain after the test prediction
    full = dict(args, top_mode=False)
    assert planner.resize_affordable((64, 64), (128, 128), now + 40, **full) is not None
    assert planner.resize_affordable((64, 64), (128, 128), now + 40, **dict(full, test_cost=15.0)) is None


def test_planner_schedule_length_and_replanning():
    import time

    from autodl_core.planner import RateMeter
    from autodl_core.planner import TimePlanner

    planner = TimePlanner(RateMeter(1.0))
    deadline = time.monotonic() + 100
    assert planner.planned_steps(deadline, 0.1) == pytest.approx(800, abs=2)  # 80% of the time left
    assert planner.planned_steps(deadline, 10.0) == 50  # never fewer than 50
    assert planner.replanned_steps(deadline, 0.12, 0.1, 300) is None  # within 25%: kept
    assert planner.replanned_steps(deadline, 0.2, 0.1, 300) == pytest.approx(300 + 400, abs=2)


def test_probe_reads_no_more_than_its_slice_can_turn_into_features():
    from autodl_core.planner import RateMeter
    from autodl_core.planner import TimePlanner

    planner = TimePlanner(RateMeter(100.0 * 64 * 64))  # 100 features/s at 64 px
    # reading is free (not yet measured): 0.7 x 10 s x 100/s = 700 examples, read ones first
    assert planner.probe_feature_target(10.0, (64, 64), have=200, have_features=0, most=10_000) == 700
    planner.note_read(100, 1.0)  # reading at 100 examples/s: unread examples cost twice as much
    assert planner.probe_feature_target(10.0, (64, 64), have=200, have_features=0, most=10_000) == 450
    assert planner.probe_feature_target(10.0, (64, 64), have=200, have_features=0, most=300) == 300


def test_resolution_growth_asks_for_a_larger_size_only_when_it_can_help():
    from autodl_core.config import PipelineConfig
    from autodl_core.growth import ResolutionGrowth

    growth = ResolutionGrowth(PipelineConfig(resolution_growth=1.5, max_resolution=128, max_resolution_growths=2))
    storage = (256, 256)
    assert growth.next_size((64, 64), storage, 0.9, has_best_weights=True) == (96, 96)
    assert growth.next_size((64, 64), storage, 0.9, has_best_weights=False) is None  # nothing to go on from
    assert growth.next_size((64, 64), storage, 0.9999, has_best_weights=True) is None  # validation saturated
    assert growth.next_size((128, 128), storage, 0.9, has_best_weights=True) is None  # at the maximum
    growth.refuse((64, 64))
    assert growth.next_size((64, 64), storage, 0.9, has_best_weights=True) is None  # refused here before
    growth.grew(), growth.grew()
    assert growth.next_size((96, 96), storage, 0.9, has_best_weights=True) is None  # growths used up


def test_the_planners_deadlines_inside_a_call_leave_their_reserves():
    """Every deadline a stage works to comes from the planner and keeps its reserve before the call's end."""
    import time

    from autodl_core import planner as p

    deadline = time.monotonic() + 100.0
    assert p.TimePlanner.probe_slice_deadline(deadline, 1000.0, 7.0) == deadline - 7.0
    assert p.TimePlanner.feature_pass_deadline(deadline, deadline) == deadline - p.FEATURE_PASS_RESERVE
    assert p.TimePlanner.probe_fit_deadline(deadline, 3.0) <= time.monotonic() + p.PROBE_FIT_SECONDS
    assert p.TimePlanner.probe_fit_deadline(time.monotonic() + 2.0, 3.0) < time.monotonic()  # no room: already due
    assert p.TimePlanner.step_fit_deadline(deadline - p.STEP_PASS_RESERVE) <= deadline - p.STEP_PASS_RESERVE
    assert p.TimePlanner.thumbnail_fit_deadline(time.monotonic() + 1.5) <= time.monotonic() + 0.5
    assert p.TimePlanner.step_timing_deadline(deadline) <= time.monotonic() + p.STEP_TIMING_SECONDS
    assert p.TimePlanner.read_all_must_stop(time.monotonic() + p.READ_ALL_RESERVE - 0.5)
    assert not p.TimePlanner.read_all_must_stop(deadline)
    assert p.TRAIN_SLICE_SHARE + p.CACHE_SLICE_SHARE == pytest.approx(1.0)  # a slice: training, then caches
    assert p.TimePlanner.cache_slice_seconds(10.0) == pytest.approx(10.0 * p.CACHE_SLICE_SHARE)


def test_training_images_are_appended_in_one_buffer():
    """Chunks read go into one buffer sized for the declared set (no copy of what was read at each chunk);
    a set larger than declared grows it; the images are those of the chunks, in order."""
    from types import SimpleNamespace

    from autodl_core.run_data import RunData

    data = RunData.__new__(RunData)
    data.train_x, data._train_buffer = None, None
    data.profile = SimpleNamespace(n_train=10, max_cached_examples=1000)
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 255, (4, 5, 6, 3), dtype=np.uint8) for _ in range(4)]
    for i, chunk in enumerate(chunks):
        data.train_x = data._append_train_images(chunk)
        assert np.array_equal(data.train_x, np.concatenate(chunks[:i + 1]))
        if i == 0:
            first_buffer = data._train_buffer
            assert len(first_buffer) == 10  # the declared set
    assert data._train_buffer is not first_buffer and len(data._train_buffer) >= 16


def test_a_large_probe_head_is_told_by_its_row_norm():
    """What starts the fine-tuning at a lower learning rate (learner.LARGE_HEAD_ROW_NORM): the root-mean-square
    norm of the head's rows, whatever the number of classes; CIFAR-10's heads (3) and PneumoniaMNIST's (11)
    are not large, knee X-rays' (39) and blood cells' (63) are."""
    import torch

    from autodl_core.learner import LARGE_HEAD_LR_FACTOR, LARGE_HEAD_ROW_NORM, head_row_norm, lp_ft_learning_rate

    for classes, row in ((10, 3.2), (2, 10.9), (5, 38.7), (4, 63.2)):
        weight = torch.full((classes, 1280), row / 1280 ** 0.5)
        assert abs(head_row_norm(weight) - row) < 1e-3
        assert (head_row_norm(weight) > LARGE_HEAD_ROW_NORM) is (row > 20)
        expected = 0.016 * LARGE_HEAD_LR_FACTOR if row > 20 else 0.016
        assert abs(lp_ft_learning_rate(0.016, weight) - expected) < 1e-12
