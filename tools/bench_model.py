"""Benchmark one SRT training step (forward, backward, Adam) in several execution modes, side by side.

    python tools/bench_model.py --shape msn --steps 7 --threads 2

All rows start from the same weights and see the same batch; their steps are interleaved round-robin
(so a slower or busier stretch of the machine hits every row alike); warm-up steps (compilation
included) are excluded; the table gives the median and fastest step, the ratios of medians and of
minima to the baseline, the achieved GFLOP/s (FLOPs of the reference computation counted by
``torch.utils.flop_counter``, over the median), the peak resident memory a step adds, and each row's
first loss (all rows compute the same model from the same weights). Every row times the trainer's
step: ``srt.loss.srt_loss`` (the loss ``srt.train`` optimises) over the model, compiled as the trainer
compiles it (``torch.compile(model)``), then backward and Adam.

CPU rows: ``fp32 eager explicit`` (the reference's way: explicit softmax attention, all 183 input planes
through the first convolution, torch's default Adam; the baseline), ``fp32 eager sdpa`` (ours), ``bf16 eager``
(ours under bf16 autocast) and ``bf16 compiled`` (ours, bf16 autocast + torch.compile: the default
training step). With CUDA: bf16 rows at real batch sizes with rays/s, tokens/s and model FLOP
utilisation, and the largest MSN batch that fits with and without activation checkpointing.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from srt import runtime  # noqa: E402
from srt.loss import srt_loss  # noqa: E402
from srt.model import SRT, ModelConfig, count_parameters  # noqa: E402

SHAPES = {  # name: (batch, input views, image size, target rays)
    'nmr': (2, 1, 64, 2048),
    'msn': (1, 5, 128, 8192),
}
GPU_BATCH = {'nmr': 64, 'msn': 16}  # per-GPU scenes at the real training shapes
SRT_CONFIG = {'encoder_kwargs': {'pos_start_octave': -5}, 'decoder': 'lightfield',
              'decoder_kwargs': {'pos_start_octave': -5}}
PEAK_TFLOPS_BF16 = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0}


@dataclasses.dataclass
class Variant:
    name: str
    attention: str = 'auto'  # our default: SDPA, explicit for short attention on the CPU
    fold_camera_code: bool = True
    channels_last: bool = True
    bf16: bool = False
    compile: bool = False
    fused_adam: bool = True
    checkpointing: bool = False


CPU_VARIANTS = [
    Variant('fp32 eager explicit (reference way)', attention='explicit', fold_camera_code=False,
            channels_last=False, fused_adam=False),
    Variant('fp32 eager (ours)'),
    Variant('bf16 autocast eager (ours)', bf16=True),
    Variant('bf16 autocast + compile (ours, default)', bf16=True, compile=True),
]
GPU_VARIANTS = [
    Variant('bf16 eager explicit', attention='explicit', fold_camera_code=False, channels_last=False,
            bf16=True),
    Variant('bf16 eager sdpa', attention='sdpa', bf16=True),
    Variant('bf16 compile sdpa (default)', attention='sdpa', bf16=True, compile=True),
    Variant('bf16 compile sdpa + act. ckpt', attention='sdpa', bf16=True, compile=True, checkpointing=True),
]


def make_batch(shape: str, device: torch.device, batch: Optional[int] = None,
               seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random batch in the model's input format (unit rays, images in [0, 1])."""
    b, v, size, r = SHAPES[shape]
    b = batch or b
    g = torch.Generator().manual_seed(seed)
    out = {'input_images': torch.rand(b, v, 3, size, size, generator=g),
           'input_camera_pos': torch.randn(b, v, 3, generator=g),
           'input_rays': F.normalize(torch.randn(b, v, size, size, 3, generator=g), dim=-1),
           'target_camera_pos': torch.randn(b, r, 3, generator=g),
           'target_rays': F.normalize(torch.randn(b, r, 3, generator=g), dim=-1),
           'target_pixels': torch.rand(b, r, 3, generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so that RSS before a step is what is in use."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples the process's resident set size in a thread; ``peak`` is the largest seen (bytes)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._page = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096

    def current(self) -> int:
        try:
            with open('/proc/self/statm') as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the process peak so far
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    def __enter__(self) -> 'PeakRSS':
        self.start = self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


class Runner:
    """One row: its own copy of the weights and optimizer, and the trainer's step over them."""

    def __init__(self, variant: Variant, base: SRT, batch: Dict[str, torch.Tensor],
                 device: torch.device) -> None:
        self.variant, self.batch, self.device = variant, batch, device
        self.model = copy.deepcopy(base)
        self.model.set_attention(variant.attention)
        self.model.set_checkpointing(variant.checkpointing)
        self.model.encoder.fold_camera_code = variant.fold_camera_code
        self.model.encoder.channels_last = variant.channels_last
        self.model.train()
        # fused=False is torch's default Adam (the reference's); fused=True runs one kernel per dtype.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=variant.fused_adam)
        # The trainer's step: its loss (srt.loss.srt_loss) over the model, compiled as it compiles it.
        self.step_model = torch.compile(self.model) if variant.compile else self.model
        self.autocast = runtime.autocast(device, 'bf16' if variant.bf16 else 'fp32')
        self.times: List[float] = []
        self.first_loss: Optional[float] = None
        self.step_rss = 0  # bytes of resident memory a step adds (peak during the step minus before)
        self.step_gpu_mem = 0  # bytes, peak GPU memory allocated during a step

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = srt_loss(self.step_model, self.batch, {}, self.autocast)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def timed_step(self, record: bool) -> float:
        sync(self.device)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        loss = self.step()
        sync(self.device)
        elapsed = time.perf_counter() - start
        if self.first_loss is None:
            self.first_loss = float(loss)
        if record:
            self.times.append(elapsed)
            if self.device.type == 'cuda':
                self.step_gpu_mem = max(self.step_gpu_mem, torch.cuda.max_memory_allocated(self.device))
        return elapsed

    def measure_memory(self) -> None:
        """One more step, untimed, from a trimmed heap: the resident memory it adds at its peak."""
        trim_heap()
        with PeakRSS() as rss:
            self.step()
            sync(self.device)
        self.step_rss = rss.peak - rss.start


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def step_flops(base: SRT, batch: Dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + backward of the model computed the reference's way (matmuls,
    convolutions, attention): the nominal work every row does (ours skips some of it). Counted on
    the meta device, so nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode
    model = copy.deepcopy(base).to('meta')
    model.set_attention('explicit')
    model.encoder.fold_camera_code = False
    meta = {k: v.to('meta') for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        pixels, _ = model(meta['input_images'], meta['input_camera_pos'], meta['input_rays'],
                          meta['target_camera_pos'], meta['target_rays'])
        (pixels - meta['target_pixels']).square().mean().backward()
    return counter.get_total_flops()


def run_rows(variants: List[Variant], base: SRT, batch: Dict[str, torch.Tensor], device: torch.device,
             warmup: int, steps: int) -> List[Runner]:
    """Warm every row up, then time ``steps`` rounds of one step per row, round-robin."""
    runners = []
    for variant in variants:
        runner = Runner(variant, base, batch, device)
        start = time.perf_counter()
        for _ in range(warmup):
            runner.timed_step(record=False)
        print(f'  warmed up {variant.name}: {warmup} steps in {time.perf_counter() - start:.1f} s',
              flush=True)
        runners.append(runner)
    for _ in range(steps):
        for runner in runners:
            runner.timed_step(record=True)
    for runner in runners:
        runner.measure_memory()
    return runners


def print_table(runners: List[Runner], flops: int,
                extra: Optional[Callable[[Optional[Runner]], str]] = None) -> None:
    """One line per row; ratios are to the first row (the baseline), of medians and of minima."""
    base_median, base_min = statistics.median(runners[0].times), min(runners[0].times)
    header = (f'{"variant":44} {"median s":>9} {"min s":>7} {"ratio":>6} {"ratio":>6} {"GFLOP/s":>8} '
              f'{"step RSS":>9} {"loss[0]":>9}')
    print(header + ('  ' + extra(None) if extra else ''))
    print(f'{"":44} {"":>9} {"":>7} {"median":>6} {"min":>6}')
    for r in runners:
        med, fastest = statistics.median(r.times), min(r.times)
        row = (f'{r.variant.name:44} {med:9.3f} {fastest:7.3f} {med / base_median:5.2f}x '
               f'{fastest / base_min:5.2f}x {flops / med / 1e9:8.1f} {r.step_rss / 2**20:7.0f}MB '
               f'{r.first_loss:9.5f}')
        print(row + ('  ' + extra(r) if extra else ''))


def bench_cpu(args: argparse.Namespace) -> None:
    device = torch.device('cpu')
    for shape in (['nmr', 'msn'] if args.shape == 'both' else [args.shape]):
        b, v, size, r = SHAPES[shape]
        torch.manual_seed(args.seed)
        base = SRT(ModelConfig.from_dict(SRT_CONFIG))
        batch = make_batch(shape, device)
        print(f'\n== {shape}: batch {b}, {v} input view(s) {size}x{size}, {r} target rays per scene; '
              f'config srt (pos_start_octave -5); {torch.get_num_threads()} threads')
        print(f'parameters: encoder {count_parameters(base.encoder):,}, decoder '
              f'{count_parameters(base.decoder):,}, total {count_parameters(base):,}')
        flops = step_flops(base, batch)
        print(f'model FLOPs per step (forward + backward): {flops / 1e9:.1f} G')
        runners = run_rows(CPU_VARIANTS, base, batch, device, args.warmup, args.steps)
        print_table(runners, flops)
        del runners


def largest_batch(base: SRT, variant: Variant, device: torch.device, limit: int = 4096) -> int:
    """The largest MSN batch whose training step runs without running out of GPU memory."""
    def fits(n: int) -> bool:
        runner = None
        torch._dynamo.reset()  # a fresh compile per probe (else dynamo's recompile limit falls back to eager)
        try:
            runner = Runner(variant, base, make_batch('msn', device, batch=n), device)
            runner.step()
            sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del runner
            gc.collect()
            torch.cuda.empty_cache()
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def bench_gpu(args: argparse.Namespace) -> None:
    device = torch.device('cuda')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
    for shape in (['nmr', 'msn'] if args.shape == 'both' else [args.shape]):
        _, v, size, r = SHAPES[shape]
        b = args.gpu_batch or GPU_BATCH[shape]
        torch.manual_seed(args.seed)
        base = SRT(ModelConfig.from_dict(SRT_CONFIG)).to(device)
        batch = make_batch(shape, device, batch=b)
        print(f'\n== GPU {name}: {shape} batch {b}, {v} view(s) {size}x{size}, {r} rays per scene')
        flops = step_flops(base, batch)
        with torch.no_grad():
            z = base.encoder(batch['input_images'], batch['input_camera_pos'], batch['input_rays'])
            tokens = z.shape[1]

        def extra(runner: Optional[Runner]) -> str:
            if runner is None:
                return f'{"rays/s":>10} {"tokens/s":>10} {"MFU":>6} {"peak mem":>9}'
            med = statistics.median(runner.times)
            mfu = f'{flops / med / 1e12 / peak:6.1%}' if peak else '     ?'
            return (f'{b * r / med:10.0f} {b * (tokens + r) / med:10.0f} {mfu} '
                    f'{runner.step_gpu_mem / 2**30:7.1f}GB')
        runners = run_rows(GPU_VARIANTS, base, batch, device, args.warmup, args.steps)
        print_table(runners, flops, extra)
        del runners
        torch.cuda.empty_cache()
    torch.manual_seed(args.seed)
    base = SRT(ModelConfig.from_dict(SRT_CONFIG)).to(device)
    for ckpt in (False, True):
        variant = Variant(f'bf16 {"compile" if args.fit_compile else "eager"} sdpa'
                          f'{" + act. ckpt" if ckpt else ""}', bf16=True, compile=args.fit_compile,
                          checkpointing=ckpt)
        print(f'largest MSN batch, {variant.name}: {largest_batch(base, variant, device)}', flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', choices=['nmr', 'msn', 'both'], default='both', help='input/ray shape')
    p.add_argument('--steps', type=int, default=7, help='timed steps per row (median and min reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per row first (compilation included)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                   help='auto: the GPU rows when CUDA is available, else the CPU rows')
    p.add_argument('--gpu-batch', type=int, default=None,
                   help='scenes per GPU step (default: nmr 64, msn 16)')
    p.add_argument('--fit-compile', action='store_true',
                   help='GPU: search the largest batch with the compiled step (one compile per probe; '
                        'default: eager, which needs a little more memory than compiled)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {platform.processor() or platform.machine()}, '
          f'cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs')
    use_cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    if use_cuda:
        bench_gpu(args)
    else:
        bench_cpu(args)
    print(f'\nprocess peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB')


if __name__ == '__main__':
    main()
