"""`tools speed`: how fast this machine runs the solver's networks, per backbone, resolution and engine.

For each backbone and resolution: images/s of a frozen forward pass of the whole network through
every engine that imports here (torch eager fp32 and bf16, channels-last, the path the solver used
before the engines; ONNX Runtime; OpenVINO), the ratio to torch fp32 and to the best, and the share
of the CPU's peak multiply-accumulate rate the best one reaches; then images/s of a training step of
the top (the blocks the CPU recipe fine-tunes on cached trunk activations) in the settings that could
pay (channels-last or not, 1 or 2 threads). Record it with every benchmark: ALC on a CPU is
compute-bound, and two "2-core" machines differ up to 5x.

    tools speed                                  # MobileNetV2 and EfficientNet-Lite0 at 64, 128, 224 px
    tools speed --backbones efficientnet_lite2 --resolutions 96,288 --out speed.json
"""
from __future__ import annotations

import json
import os
import platform
import time

from autodl_core.errors import UserInputError

DEFAULT_BACKBONES = "mobilenetv2_100,efficientnet_lite0"
DEFAULT_RESOLUTIONS = "64,128,224"


# ---------------------------------------------------------------------------------------- the CPU
def cpu_facts() -> dict:
    """Model, flags that matter, clock and logical CPUs, from /proc/cpuinfo (Linux) where it exists."""
    facts = {"model": platform.processor() or platform.machine(), "flags": [], "mhz": None,
             "cpus": os.cpu_count() or 1, "vendor": ""}
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and facts["model"] in ("", platform.machine(), platform.processor()):
            facts["model"] = value
        elif key == "flags" and not facts["flags"]:
            wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
            facts["flags"] = [f for f in value.split() if f in wanted]
        elif key == "cpu MHz" and facts["mhz"] is None:
            facts["mhz"] = float(value)
        elif key == "vendor_id" and not facts["vendor"]:
            facts["vendor"] = value
        elif key == "cpu family":
            facts["family"] = int(value)
    return facts


def peak_macs_per_s(facts: dict, threads: int) -> tuple[float | None, str]:
    """The fp32 multiply-accumulate peak of `threads` logical CPUs, and how it was reckoned.

    fp32 lanes per cycle: two FMA pipes of the widest vector the CPU has (AVX-512: 2 x 16 on Intel
    server cores; AMD's Zen 4 runs AVX-512 on two 256-bit pipes, 2 x 8; AVX2: 2 x 8). A logical CPU of
    a VM may be a hyperthread: the share is then understated, never overstated."""
    mhz = facts.get("mhz")
    if not mhz:
        return None, "clock unknown"
    flags = set(facts.get("flags", []))
    if "avx512f" in flags and facts.get("vendor") != "AuthenticAMD":
        lanes, how = 32, "2 FMA x 16 fp32 (AVX-512)"
    elif "avx512f" in flags or "avx2" in flags:
        lanes, how = 16, "2 FMA x 8 fp32 (256-bit pipes)"
    else:
        lanes, how = 8, "2 FMA x 4 fp32 (SSE)"
    return threads * lanes * mhz * 1e6, f"{threads} CPUs x {how} x {mhz:.0f} MHz"


def macs_per_image(module, size: int) -> int:
    """Multiply-accumulates of one forward pass at size x size (convolutions and linear layers)."""
    import torch
    import torch.nn as nn

    total = [0]

    def conv_hook(layer, _inputs, output):
        kh, kw = layer.kernel_size
        total[0] += output.numel() * (layer.in_channels // layer.groups) * kh * kw

    def linear_hook(layer, _inputs, output):
        total[0] += output.numel() * layer.in_features

    hooks = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            hooks.append(layer.register_forward_hook(conv_hook))
        elif isinstance(layer, nn.Linear):
            hooks.append(layer.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            module.eval()(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


# ---------------------------------------------------------------------------------------- the measurements
def frozen_rates(network, size: int, batch: int, threads: int, engines: list[str], repeats: int) -> dict:
    """{engine: images/s} of frozen passes of `network` at size x size (or why not, as a string)."""
    import tempfile

    import torch

    from autodl_core.engines import TorchRunner, build_engine, images_per_s, relative_error

    x = torch.randn(batch, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = network.eval()(x[:4]).float()
    rates = {}
    for name, runner in (("torch fp32", TorchRunner(network, "cpu", False)),
                         ("torch bf16", TorchRunner(network, "cpu", True))):
        try:
            rates[name] = images_per_s(runner, x_cl, repeats)
        except Exception as exc:  # no bf16 kernels on this build
            rates[name] = f"{type(exc).__name__}"
    workdir = tempfile.mkdtemp(prefix="autodl-speed-")
    for name in engines:
        if name == "torch":
            continue
        try:
            runner = build_engine(name, network, x[:4], threads, workdir)
            error = relative_error(reference, runner(x[:4]))
            rates[name] = images_per_s(runner, x, repeats)
            rates[f"{name} error"] = error
            if getattr(runner, "precision", "") == "bf16":
                rates[f"{name} bf16"] = True
        except Exception as exc:
            rates[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    return rates


def training_rates(top, trunk, n_features: int, n_classes: int, size: int, batch: int, seconds: float) -> dict:
    """{setting: images/s} of the CPU recipe's training step (the top on cached activations)."""
    import copy

    import numpy as np
    import torch

    from autodl_core.images import Preprocessor
    from autodl_core.learner import Classifier, FineTuner

    with torch.inference_mode():
        activations = trunk(torch.randn(batch * 4, 3, size, size)).clone()
    labels = np.eye(n_classes, dtype=np.float32)[np.arange(len(activations)) % n_classes]
    rates = {}
    threads_now = torch.get_num_threads()
    for threads in sorted({1, threads_now}):
        for channels_last in (True, False):
            torch.set_num_threads(threads)
            model = Classifier(copy.deepcopy(top), n_features, n_classes)
            tuner = FineTuner(model, Preprocessor((0.5,) * 3, (0.5,) * 3, channels_last=channels_last),
                              False, batch_size=batch, freeze_fraction=0.0, freeze_bn=True)
            fmt = torch.channels_last if channels_last else torch.contiguous_format

            def make_batch(idx, fmt=fmt):
                return activations[idx].contiguous(memory_format=fmt)

            tuner.train_until(make_batch, labels, np.arange(len(activations)), deadline=time.monotonic() + 1.0,
                              max_steps=3)
            started, steps = time.monotonic(), tuner.steps
            tuner.train_until(make_batch, labels, np.arange(len(activations)),
                              deadline=time.monotonic() + seconds)
            done = tuner.steps - steps
            rates[f"{threads} thread{'s' if threads > 1 else ''}, {'channels-last' if channels_last else 'NCHW'}"] = \
                done * batch / max(1e-9, time.monotonic() - started)
    torch.set_num_threads(threads_now)
    return rates


def measure(backbones: list[str], resolutions: list[int], batch: int, repeats: int,
            train_seconds: float, threads: int) -> dict:
    import torch

    from autodl_core.engines import available_engines
    from autodl_core.trunk import split_backbone
    from pretrained import create_backbone

    torch.set_num_threads(threads)
    facts = cpu_facts()
    peak, peak_how = peak_macs_per_s(facts, threads)
    engines = available_engines()
    result = {"cpu": facts, "threads": threads, "peak_macs_per_s": peak, "peak_how": peak_how,
              "engines": engines, "torch": torch.__version__, "frozen": [], "training": []}
    for name in backbones:
        network = create_backbone(name, pretrained=True, num_classes=0).eval()
        trunk, top = split_backbone(network, 4)
        for size in resolutions:
            macs = macs_per_image(network, size)
            rates = frozen_rates(network, size, batch, threads, engines, repeats)
            numeric = {k: v for k, v in rates.items() if isinstance(v, float) and not k.endswith("error")}
            best_engine = max(numeric, key=numeric.get) if numeric else None
            row = {"backbone": name, "size": size, "macs_per_image": macs, "rates": rates, "best": best_engine}
            if best_engine and peak:
                # bf16 dot products (AVX512-BF16) do two multiply-accumulates per fp32 lane: that engine's
                # share is of twice the fp32 peak.
                bf16 = best_engine == "torch bf16" or rates.get(f"{best_engine} bf16") is True
                bf16_units = "avx512_bf16" in facts.get("flags", []) or "amx_bf16" in facts.get("flags", [])
                row["best_precision"] = "bf16" if bf16 else "fp32"
                row["best_share_of_peak"] = numeric[best_engine] * macs / (peak * (2 if bf16 and bf16_units else 1))
            result["frozen"].append(row)
            print(format_frozen_row(row), flush=True)
            if train_seconds > 0:
                train = training_rates(top, trunk, int(network.num_features), 10, size, 32, train_seconds)
                result["training"].append({"backbone": name, "size": size, "rates": train})
                print("  training step of the top, batch 32: "
                      + ", ".join(f"{k} {v:.0f} img/s" for k, v in train.items()), flush=True)
    return result


def format_frozen_row(row: dict) -> str:
    rates = row["rates"]
    base = rates.get("torch fp32")
    numeric = {k: v for k, v in rates.items() if isinstance(v, float) and not k.endswith("error")}
    best = max(numeric.values()) if numeric else None
    parts = []
    for key, value in rates.items():
        if key.endswith("error") or key.endswith(" bf16") and value is True:
            continue
        if isinstance(value, float):
            ratio = f" ({value / base:.1f}x fp32, {value / best:.2f} of best)" if isinstance(base, float) else ""
            error = rates.get(f"{key} error")
            parts.append(f"{key} {value:,.0f}{ratio}" + (f" err {error:.1e}" if error is not None else ""))
        else:
            parts.append(f"{key}: {value}")
    share = row.get("best_share_of_peak")
    peak = (f"; best {row['best']} at {100 * share:.0f}% of the {row['best_precision']} peak"
            if share is not None else "")
    return f"{row['backbone']} {row['size']} px ({row['macs_per_image'] / 1e6:.0f} M MACs): " + ", ".join(parts) + peak


def markdown(result: dict) -> str:
    """The frozen-pass table of a measurement, as in docs/benchmarks.md."""
    engines = ["torch fp32", "torch bf16"] + [e for e in result["engines"] if e != "torch"]
    lines = [f"CPU: {result['cpu']['model']} ({', '.join(result['cpu']['flags'])}), {result['threads']} threads; "
             f"torch {result['torch']}; peak {result['peak_how']}", "",
             "| backbone | px | " + " | ".join(engines) + " | best / torch today | best: share of its precision's peak |",
             "|---|---|" + "---|" * len(engines) + "---|---|"]
    for row in result["frozen"]:
        rates = row["rates"]
        today = max((rates[k] for k in ("torch fp32", "torch bf16") if isinstance(rates.get(k), float)), default=None)
        cells = [f"{rates[e]:,.0f}" if isinstance(rates.get(e), float) else "-" for e in engines]
        best = rates.get(row["best"]) if row["best"] else None
        ratio = f"{best / today:.1f}x" if best and today else "-"
        share = (f"{100 * row['best_share_of_peak']:.0f}% ({row['best_precision']})"
                 if row.get("best_share_of_peak") is not None else "-")
        lines.append(f"| {row['backbone']} | {row['size']} | " + " | ".join(cells) + f" | {ratio} | {share} |")
    return "\n".join(lines)


def run(args) -> int:
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    try:
        resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    except ValueError:
        raise UserInputError(f"--resolutions must be integers separated by commas, got {args.resolutions!r}") from None
    if not backbones or not resolutions or min(resolutions) < 16:
        raise UserInputError("give at least one backbone and resolutions of 16 px or more")
    from pretrained import list_backbones

    unknown = [b for b in backbones if b not in list_backbones()]
    if unknown:
        raise UserInputError(f"unknown backbone(s) {unknown}; known: {', '.join(list_backbones())}")
    result = measure(backbones, resolutions, args.batch, args.repeats, args.train_seconds,
                     args.threads or (os.cpu_count() or 1))
    print()
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
        print(f"\nwrote {args.out}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("speed", help="images/s per backbone, resolution and inference engine here",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES, help=f"comma-separated (default {DEFAULT_BACKBONES})")
    parser.add_argument("--resolutions", default=DEFAULT_RESOLUTIONS,
                        help=f"comma-separated square sizes in px (default {DEFAULT_RESOLUTIONS})")
    parser.add_argument("--batch", type=int, default=64, help="images per frozen pass (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per engine (default 3)")
    parser.add_argument("--train-seconds", type=float, default=3.0,
                        help="seconds of training steps per setting (default 3; 0 skips training)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default: every CPU)")
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.set_defaults(func=run)
