"""``defectd build-engine`` and ``defectd engines``: build/validate an engine, list backends."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from defectd.cli.app import app
from defectd.cli.console import report_console
from defectd.cli.options import JsonSummary, JsonTable
from defectd.errors import ConfigError


@app.command("build-engine")
def build_engine(
    *,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Model: .onnx with its card beside it.")
    ],
    backend: Annotated[
        str,
        typer.Option(
            help="tensorrt, openvino, ort, auto (best for this machine), or triton (write a "
            "Triton model repository: --repo)."
        ),
    ] = "auto",
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32, fp16 (tensorrt), bf16 (openvino) or int8 (needs a QDQ model, "
            "or <stem>.int8.onnx beside the model). Default: the card's precision."
        ),
    ] = None,
    min_batch: Annotated[int, typer.Option("--min-batch", help="Smallest batch served.")] = 1,
    opt_batch: Annotated[
        int | None,
        typer.Option("--opt-batch", help="TensorRT tunes kernels for this batch (default max)."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch served.")] = 16,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for CPU backends (default: all cores).")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="TensorRT plans + timing cache, OpenVINO compiled blobs "
            "(default $DEFECTD_CACHE_DIR or ~/.cache/defectd).",
        ),
    ] = None,
    as_json: JsonSummary = False,
    repo: Annotated[
        Path | None,
        typer.Option(help="triton: the model repository to write into (made if missing)."),
    ] = None,
    triton_kind: Annotated[
        str,
        typer.Option(
            "--triton-kind",
            help="triton: onnxruntime_onnx (GPU server), tensorrt_plan (GPU server, --plan), "
            "python (ONNX Runtime on a CPU server).",
        ),
    ] = "onnxruntime_onnx",
    name: Annotated[
        str, typer.Option(help="triton: model name in the repository (default: the card's).")
    ] = "",
    instances: Annotated[
        int, typer.Option(help="triton: model instances per device (instance_group count).")
    ] = 1,
    instance_kind: Annotated[
        str | None, typer.Option("--instance-kind", help="triton: gpu or cpu (default by kind).")
    ] = None,
    preferred_batch: Annotated[
        list[int] | None,
        typer.Option("--preferred-batch", help="triton: a preferred dynamic batch (repeatable)."),
    ] = None,
    max_queue_delay_us: Annotated[
        int,
        typer.Option("--max-queue-delay-us", help="triton: how long a batch may wait to fill."),
    ] = 1000,
    trt_plan: Annotated[
        Path | None,
        typer.Option("--plan", help="triton tensorrt_plan: the plan built on the server GPU."),
    ] = None,
    tensorrt_accelerator: Annotated[
        bool,
        typer.Option(
            "--tensorrt-accelerator",
            help="triton onnxruntime_onnx: let ONNX Runtime build TensorRT engines on the server.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="triton: replace the model's repository entry.")
    ] = False,
) -> None:
    """Build (TensorRT) or compile (OpenVINO, ONNX Runtime) an engine and validate it.

    TensorRT plans are cached by ONNX sha256, TensorRT version, GPU and batch profile.

    The engine then runs once at the smallest and the largest batch to check its output.

    With --backend triton: write a Triton model repository entry for the model instead
    (config.pbtxt with dynamic batching and instance groups, the model file, the sha256 the
    station checks); see docs/scale-out.md.
    """
    if backend == "triton":
        _triton_repository(
            model,
            repo,
            triton_kind,
            precision=precision,
            max_batch=max_batch,
            threads=threads,
            name=name,
            instances=instances,
            instance_kind=instance_kind,
            preferred_batch=tuple(preferred_batch or ()),
            max_queue_delay_us=max_queue_delay_us,
            plan=trt_plan,
            tensorrt_accelerator=tensorrt_accelerator,
            force=force,
            as_json=as_json,
        )
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from defectd.engines import open_engine
    from defectd.engines.tensorrt_backend import TensorRTEngine, default_cache_dir

    if min_batch < 1 or max_batch < min_batch:
        raise ConfigError(
            f"--min-batch {min_batch} / --max-batch {max_batch}: need 1 <= min <= max"
        )
    cache = cache_dir or default_cache_dir()
    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=as_json,
        transient=True,
    )
    tasks: dict[str, Any] = {}
    lock = threading.Lock()

    def on_progress(phase: str, done: int, total: int) -> None:
        with lock:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=max(total, 1))
            progress.update(tasks[phase], completed=done, total=max(total, 1))

    t0 = time.perf_counter()
    with progress:
        opening = progress.add_task(f"opening {model.name} ({backend})", total=None)
        engine = open_engine(
            model,
            backend=backend,
            precision=precision,
            min_batch=min_batch,
            max_batch=max_batch,
            opt_batch=opt_batch,
            threads=threads,
            cache_dir=cache,
            build_progress=on_progress,
        )
        progress.update(opening, total=1, completed=1, description=f"opened {engine.name}")
        build_s = time.perf_counter() - t0
        spec = engine.spec
        check = progress.add_task("validating", total=2)
        latency: dict[str, float] = {}
        try:
            for n in sorted({spec.min_batch, spec.max_batch}):
                x = np.zeros((n, *spec.chw), np.float32)
                t = time.perf_counter()
                out = engine.infer(x)
                latency[str(n)] = round((time.perf_counter() - t) * 1e3, 2)
                if (
                    out.shape != (n, spec.outputs, spec.height, spec.width)
                    or not np.isfinite(out).all()
                ):
                    raise ConfigError(f"{model}: engine {engine.name} returned a bad output")
                progress.advance(check)
        finally:
            plan = str(engine.plan_file) if isinstance(engine, TensorRTEngine) else None
            engine.close()
    summary = {
        "model": str(model),
        "engine": engine.name,
        "precision": engine.precision,
        "version": engine.version,
        "batch": [spec.min_batch, spec.max_batch],
        "input": list(spec.chw),
        "open_s": round(build_s, 3),
        "first_run_ms": latency,
        "plan": plan,
        "cache_dir": str(cache),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console = report_console()  # the summary goes to stdout; progress went to stderr
    console.print(
        f"[bold]{engine.name}[/bold] {engine.version}: input (N, {', '.join(map(str, spec.chw))}), "
        f"batch {spec.min_batch}..{spec.max_batch}, opened in {build_s:.1f} s"
        + (f", plan {plan}" if plan else "")
    )
    for size, ms in latency.items():
        console.print(f"  batch {size}: first run {ms:.1f} ms")


def _triton_repository(
    model: Path,
    repo: Path | None,
    kind: str,
    *,
    precision: str | None,
    max_batch: int,
    threads: int | None,
    name: str,
    instances: int,
    instance_kind: str | None,
    preferred_batch: tuple[int, ...],
    max_queue_delay_us: int,
    plan: Path | None,
    tensorrt_accelerator: bool,
    force: bool,
    as_json: bool,
) -> None:
    from defectd.engines.triton_repo import KINDS, RepoOptions, write_repository

    if repo is None:
        raise ConfigError("--backend triton writes a model repository: give --repo DIR")
    if kind not in KINDS:
        raise ConfigError(f"--triton-kind {kind!r}: choose one of {', '.join(KINDS)}")
    if instance_kind not in (None, "gpu", "cpu"):
        raise ConfigError(f"--instance-kind {instance_kind!r}: gpu or cpu")
    if precision is not None:
        raise ConfigError(
            "--precision: a Triton repository serves the model file as it is; give the "
            "QDQ model (--model model.int8.onnx) for int8, a plan built for fp16"
        )
    options = RepoOptions(
        name=name or None,
        max_batch=max_batch,
        preferred_batch=preferred_batch,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        instance_kind=instance_kind,  # type: ignore[arg-type]
        accelerator="tensorrt" if tensorrt_accelerator else None,
        intra_op_threads=threads or 0,
    )
    written = write_repository(model, repo, kind, options, plan=plan, force=force)
    summary = {
        "model": str(model),
        "repository": str(written.root),
        "name": written.name,
        "kind": written.kind,
        "config": str(written.config),
        "sha256": written.sha256,
        "missing": list(written.missing),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console = report_console()
    console.print(f"[bold]{written.name}[/bold] ({written.kind}) written to {written.model_dir}")
    console.print(
        f'  station config: backend = "triton", \\[model.triton] model_name = '
        f'"{written.name}"; sha256 {written.sha256[:12]}... is checked at start'
    )
    for path in written.missing:
        console.print(
            f"  [yellow]missing[/yellow]: {path}: build it on the server's GPU from "
            f"{written.model_dir / 'source.onnx'} (defectd build-engine --backend tensorrt, or "
            "trtexec --onnx=... --saveEngine=...)"
        )


@app.command("engines")
def engines(
    *,
    as_json: JsonTable = False,
) -> None:
    """List the inference backends, whether they run on this machine, and their precisions."""
    from rich.table import Table

    from defectd.engines import available_backends, choose_backend

    infos = available_backends()
    auto, reason = choose_backend(Path("model.onnx"))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "auto": auto,
                    "reason": reason,
                    "backends": [
                        {
                            "name": i.name,
                            "available": i.available,
                            "version": i.version,
                            "precisions": list(i.precisions),
                            "detail": i.detail,
                        }
                        for i in infos
                    ],
                }
            )
        )
        return
    table = Table(title="inference backends")
    for col in ("backend", "runs here", "version", "precisions", "detail"):
        table.add_column(col)
    for i in infos:
        table.add_row(
            i.name, "yes" if i.available else "no", i.version, " ".join(i.precisions), i.detail
        )
    console = report_console()
    console.print(table)
    console.print(f"auto -> [bold]{auto}[/bold]: {reason}")
